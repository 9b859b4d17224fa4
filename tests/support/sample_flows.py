"""Flows used by the tests. Worker processes import this module (``--import support.sample_flows``)."""

from __future__ import annotations

import os
import time

import psycopg

from pgflow import INPUT, Flow, NonRetryableError

# --- shapes -------------------------------------------------------------------------------------------

chain = Flow("chain")


@chain.step()
def first(ctx, input):
    return input["n"] + 1


@chain.step(after=[first])
def second(ctx, first):
    return first * 10


@chain.step(after=[second])
def third(ctx, second, input):
    return {"value": second + 1, "label": input["label"], "key": ctx.idempotency_key}


diamond = Flow("diamond")


@diamond.step()
def top(ctx, input):
    return input


@diamond.step(after=[top])
def left(ctx, top):
    return top * 2


@diamond.step(after=[top])
def right(ctx, top):
    return top * 3


@diamond.step(after=[left, right])
def bottom(ctx, left, right):
    return [left, right]


wide = Flow("wide")


@wide.step()
def numbers(ctx, input) -> list[int]:
    return list(range(input))


@wide.map(over=numbers)
def square(ctx, n):
    return {"n": n, "sq": n * n, "index": ctx.task_index}


@wide.step(after=[square])
def total(ctx, square):
    return {"count": len(square), "sum": sum(s["sq"] for s in square),
            "in_order": all(s["n"] == i == s["index"] for i, s in enumerate(square))}


input_map = Flow("input_map")


@input_map.map(over=INPUT)
def double(ctx, x):
    return x * 2


sql_flow = Flow("sql_flow")
sql_insert = sql_flow.sql("insert", "INSERT INTO people (name, note) VALUES ($input.name, $input.note) "
                                    "RETURNING id, name, note, '100%' AS literal")
sql_rows = sql_flow.sql("rows", "SELECT name FROM people WHERE id = $insert.id", after=[sql_insert])


@sql_flow.map(over=sql_rows)
def shout(ctx, row):
    return row["name"].upper()


sql_each = sql_flow.sql("each", "SELECT upper($item) AS name", over=shout)


# --- failures -------------------------------------------------------------------------------------------

flaky = Flow("flaky", max_attempts=4, backoff_base=0.2, backoff_cap=0.4)


@flaky.step()
def wobble(ctx, input):
    if ctx.attempt < input["succeed_on"]:
        raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
    return ctx.attempt


broken = Flow("broken", max_attempts=2, backoff_base=0.05, backoff_cap=0.1)


@broken.step()
def explode(ctx, input):
    raise ValueError("boom: " + str(input))


@broken.step(after=[explode])
def never(ctx, explode):
    return "unreachable"


fatal = Flow("fatal", max_attempts=5)


@fatal.step()
def refuse(ctx, input):
    raise NonRetryableError("no point retrying")


slow = Flow("slow", max_attempts=2, backoff_base=0.05, backoff_cap=0.1)


@slow.step(timeout=0.5)
def dawdle(ctx, input):
    time.sleep(30)


big_output = Flow("big_output")


@big_output.step()
def balloon(ctx, input):
    return "x" * input


not_json = Flow("not_json", max_attempts=3)


@not_json.step()
def gives_set(ctx, input):
    return {1, 2}


# --- long-running, with observable side effects -----------------------------------------------------------

def create_effect_tables(dsn: str) -> None:
    """The tables the steps below record their effects in: py_runs (each run of a Python step: idempotency
    key, attempt) and sql_effects (each row a SQL step wrote)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE py_runs (key text NOT NULL, attempt int NOT NULL)")
        conn.execute("CREATE TABLE sql_effects (instance_id int NOT NULL, value int NOT NULL)")


def _effects() -> psycopg.Connection:
    return psycopg.connect(os.environ["PGFLOW_TEST_EFFECTS_DSN"], autocommit=True)


def record_run(ctx) -> None:
    """Count executions of a Python step (its own connection: survives the step's rollback)."""
    with _effects() as conn:
        conn.execute("INSERT INTO py_runs (key, attempt) VALUES (%s, %s)", (ctx.idempotency_key, ctx.attempt))


effects = Flow("effects", max_attempts=5, backoff_base=0.05, backoff_cap=0.2)


@effects.step()
def work(ctx, input):
    record_run(ctx)
    time.sleep(input.get("sleep", 0.2))
    return input["i"]


effects_sql = effects.sql("effect", "INSERT INTO sql_effects (instance_id, value) VALUES ($input.i, $work)",
                          after=[work])


pause = Flow("pause")


@pause.step()
def hold(ctx, input):
    time.sleep(input)
    return "held"


@pause.step(after=[hold])
def after_hold(ctx, hold):
    with _effects() as conn:
        conn.execute("INSERT INTO py_runs (key, attempt) VALUES (%s, %s)", (ctx.idempotency_key, ctx.attempt))
    return "ran"


# --- versions ----------------------------------------------------------------------------------------------

versioned_v1 = Flow("versioned")


@versioned_v1.step()
def alpha(ctx, input):
    return "alpha"


VERSION_1 = versioned_v1.version
SHAPE_1 = versioned_v1.shape

versioned = Flow("versioned")  # same name, a new shape: the code workers now run


@versioned.step()
def alpha(ctx, input):  # noqa: F811
    return "alpha"


@versioned.step(after=[alpha])
def beta(ctx, alpha):
    return alpha + "+beta"


# --- autoscaling (tests/deploy/test_autoscale.py, tests/support/autoscaler.py) -----------------------------------

fanout = Flow("fanout", queue="scale", max_attempts=5, backoff_base=0.05, backoff_cap=0.2)


@fanout.step()
def spread(ctx, input) -> list[int]:
    return list(range(input["tasks"]))


@fanout.map(over=spread)
def crunch(ctx, i, input):
    """One map task: its side effect (a py_runs row), then between ``input["sleep"]`` = [low, high] seconds
    of "work" (spread evenly over the tasks)."""
    record_run(ctx)
    low, high = input["sleep"]
    time.sleep(low + (high - low) * (i * 37 % 31) / 30)
    return i


@fanout.step(after=[crunch])
def gather(ctx, crunch):
    return {"count": len(crunch), "sum": sum(crunch)}


# --- a queue no flow named before its workers started (tests/e2e/test_queues.py) --------------------------------

on_ops = Flow("on_ops", queue="ops")


@on_ops.step()
def operate(ctx, input):
    return {"operated": input}
