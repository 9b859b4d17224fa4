"""Flows and workflow functions for the hardening tests (test_poison.py, test_chaos.py, test_properties.py).
Worker processes import this module (``--import support.poison_flows``, or through the
``support.poison_flows:attribute`` reference recorded when a flow is first started)."""

from __future__ import annotations

import ctypes
import os
import time

from pgflow import Flow
from pgflow import tree as t
from support.sample_flows import record_run

# workers only call workflow functions marked with pgflow.tree.task
_task = t.task


# --- steps that take their worker process down --------------------------------------------------------------

segfault = Flow("segfault", max_attempts=2, backoff_base=0.05, backoff_cap=0.1)


@segfault.step()
def dereference_null(ctx, input):
    record_run(ctx)
    ctypes.string_at(0)  # SIGSEGV: the process dies without running any Python cleanup
    return "unreachable"


hard_exit = Flow("hard_exit", max_attempts=2, backoff_base=0.05, backoff_cap=0.1)


@hard_exit.step()
def exit_3(ctx, input):
    record_run(ctx)
    os._exit(3)


# --- a step whose first attempt fails and whose retry is far away (its message is invisible meanwhile) -------

slow_retry = Flow("slow_retry", max_attempts=3, backoff_base=40, backoff_cap=40)


@slow_retry.step()
def later(ctx, input):
    record_run(ctx)
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails; the retry is 20-40 s away")
    return ctx.attempt


# --- the chaos pipeline: fan-out with recorded Python effects and an exactly-once SQL map ---------------------

pipeline = Flow("pipeline", max_attempts=12, backoff_base=0.05, backoff_cap=0.5)


@pipeline.step()
def items(ctx, input) -> list[int]:
    return list(range(input["n"]))


@pipeline.map(over=items)
def process(ctx, i, input):
    record_run(ctx)
    time.sleep(input.get("sleep", 0.01))
    return {"i": i, "sq": i * i}


# one row per (run, item), in the acknowledgement transaction: exactly once, whatever gets killed
mark = pipeline.sql("mark", "INSERT INTO chaos_marks (run, item) VALUES ($input.run, $item.i) RETURNING item",
                    over=process)


@pipeline.step(after=[process, mark])
def summary(ctx, process, mark):
    return {"count": len(process), "sum": sum(p["sq"] for p in process), "marked": len(mark)}


# --- functions for control-flow workflows (pgflow.python('support.poison_flows:...')) ------------------------

@_task
def echo(ctx, input):
    return input


@_task
def fail(ctx):
    raise ValueError("poison_flows.fail always fails")


@_task
def attempt(ctx):
    return ctx.attempt
