"""Flows of the console tests (workers import this module: ``--import support.console_flows``). Each fails until a
flag file named in its input exists, so a test can fix the cause and then retry."""

from __future__ import annotations

import os

from pgflow import Flow

gate = Flow("console_gate", max_attempts=2, backoff_base=0.05, backoff_cap=0.1)


@gate.step()
def prepare(ctx, input):
    return input["n"]


@gate.step(after=[prepare])
def guarded(ctx, prepare, input):
    if not os.path.exists(input["flag"]):
        raise RuntimeError(f"gate closed: {input['flag']} is missing")
    return {"doubled": prepare * 2, "attempt": ctx.attempt}


gated_map = Flow("console_map", max_attempts=1)


@gated_map.step()
def spread(ctx, input) -> list[dict]:
    return [{"i": i, "flag": input["flag"]} for i in range(input["n"])]


@gated_map.map(over=spread)
def check(ctx, item):
    if item["i"] == 7 and not os.path.exists(item["flag"]):
        raise RuntimeError("element 7 waits for its flag")
    return item["i"]


@gated_map.step(after=[check])
def added(ctx, check):
    return sum(check)
