"""Autoscaling on queue depth, done locally the way KEDA does it in Kubernetes: the scaler of
tests/support/autoscaler.py (the one tests/deploy/test_autoscale.py drives) adds and removes worker processes
while a fan-out runs; this scenario runs it as a demo and prints each scaling decision and its checks."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2] / "tests"


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(TESTS))  # the scaler and its workload are the tests' (one copy, shared)
    from support import autoscaler

    return autoscaler.main(argv)
