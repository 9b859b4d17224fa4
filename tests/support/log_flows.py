"""Flows for tests/e2e/test_logs_tracing.py (workers import this module: ``--import support.log_flows``)."""

from __future__ import annotations

import logging

from pgflow import Flow

chatty = Flow("chatty", max_attempts=2, backoff_base=0.05, backoff_cap=0.1)


@chatty.step()
def speak(ctx, input):
    logging.getLogger("support.log_flows").warning("speaking for %s", input)  # a step's own line
    return input


@chatty.step(after=[speak])
def stumble(ctx, speak):
    raise RuntimeError(f"cannot go on after {speak}")
