"""Throughput benchmark (kept as an entry point; the harness is loadtests/run.py): K instances of a 3-step
chain of no-op Python steps, W worker processes and one coordinator, against the same server's raw commit
rate measured in the same run.

    python loadtests/throughput.py [--instances 2000] [--workers 2] [--dsn DSN] [any option of run.py chain]

is ``python loadtests/run.py chain --instances 2000 --sequential 50 ...``: it prints steps/s (first start to
last completion), instance latency p50/p99, the raw commit rate (1 and 16 clients) and the ratio, and the
scheduling latency at low load; it writes loadtests/results/chain-<timestamp>.json and .png.
This is a measurement, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"--instances": "2000", "--sequential": "50"}
    for option, value in defaults.items():
        if not any(a == option or a.startswith(option + "=") for a in argv):
            argv += [option, value]
    return run.main(["chain", *argv])


if __name__ == "__main__":
    sys.exit(main())
