"""Flows of the batching, limits, fairness and task-value tests (issue 14). Worker processes import this
module (``--import support.claim_flows``). Each function records what it saw in a table of the test database
(``claim_log``), so tests check real executions, not return values alone."""

from __future__ import annotations

import os
import time

import psycopg

from pgflow import INPUT, Flow, Limit, RateLimited

LOG_TABLE = """
CREATE TABLE IF NOT EXISTS claim_log (
    id bigserial PRIMARY KEY, flow text, step text, instance_id bigint, task_index integer, attempt integer,
    items jsonb, indices jsonb, started_at timestamptz DEFAULT clock_timestamp(),
    finished_at timestamptz, note text)
"""


def _log(ctx, items=None, note=None, finished=True) -> int:
    with psycopg.connect(os.environ["CLAIM_TEST_DSN"], autocommit=True) as conn:
        return conn.execute(
            "INSERT INTO claim_log (flow, step, instance_id, task_index, attempt, items, indices, note, finished_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, CASE WHEN %s THEN clock_timestamp() END) RETURNING id",
            (ctx.flow, ctx.step, ctx.instance_id, ctx.task_index, ctx.attempt, psycopg.types.json.Jsonb(items),
             psycopg.types.json.Jsonb(list(ctx.indices) if ctx.indices is not None else None), note, finished),
        ).fetchone()[0]


def _finish(row_id: int) -> None:
    with psycopg.connect(os.environ["CLAIM_TEST_DSN"], autocommit=True) as conn:
        conn.execute("UPDATE claim_log SET finished_at = clock_timestamp() WHERE id = %s", (row_id,))


# --- batched maps ----------------------------------------------------------------------------------------

batched = Flow("batched", max_attempts=2, backoff_base=0.05, backoff_cap=0.1)


@batched.map(over=INPUT, batch_size=4)
def double(ctx, numbers: list[int]) -> list[int]:
    _log(ctx, numbers)
    return [n * 2 for n in numbers]


@batched.step(after=[double])
def collect(ctx, double):
    return double


poison = Flow("poison_batch", max_attempts=2, backoff_base=0.05, backoff_cap=0.1)


@poison.map(over=INPUT, batch_size=8, split_on_failure=True)
def careful(ctx, numbers: list[int]) -> list[int]:
    _log(ctx, numbers)
    if 13 in numbers:
        raise ValueError("13 is poison")
    return [n + 1 for n in numbers]


whole = Flow("whole_batch", max_attempts=3, backoff_base=0.05, backoff_cap=0.1)


@whole.map(over=INPUT, batch_size=5)
def flaky(ctx, numbers: list[int]) -> list[int]:
    _log(ctx, numbers)
    if ctx.attempt == 1 and ctx.task_index == 5:
        raise ValueError("first attempt of the second batch fails")
    return [-n for n in numbers]


wrong_length = Flow("wrong_length", max_attempts=3)


@wrong_length.map(over=INPUT, batch_size=3)
def short(ctx, numbers: list[int]) -> list[int]:
    return numbers[:1]


sql_batched = Flow("sql_batched")
sql_square = sql_batched.sql("square", """
    SELECT (e.value::text)::int * (e.value::text)::int AS sq, $instance_id::bigint AS iid, $step AS step,
           $attempt::int AS attempt, $idempotency_key AS key
    FROM jsonb_array_elements($item) WITH ORDINALITY AS e(value, n) ORDER BY e.n
""", over=INPUT, batch_size=4)

task_values = Flow("task_values")
task_values.sql("who", "SELECT $instance_id::bigint AS iid, $step AS step, $attempt::int AS attempt, "
                       "$idempotency_key AS key")

# --- limits ------------------------------------------------------------------------------------------------

per_minute = Limit("test_rate", requests=120, per=6.0)  # 20 per second, paced every 50 ms
rate_flow = Flow("rate_flow")


@rate_flow.map(over=INPUT, limit=per_minute)
def paced(ctx, n: int) -> int:
    _log(ctx, n)
    return n


tenant_limit = Limit("test_tenant", concurrency=2)
tenant_flow = Flow("tenant_flow")


@tenant_flow.map(over=INPUT, limit=tenant_limit, limit_key="$item.tenant")
def busy(ctx, job: dict) -> int:
    row = _log(ctx, job, note=job["tenant"], finished=False)
    time.sleep(0.15)
    _finish(row)
    return job["n"]


told_to_wait = Flow("told_to_wait", max_attempts=1)


@told_to_wait.step()
def impatient(ctx, input):
    _log(ctx, None)
    with psycopg.connect(os.environ["CLAIM_TEST_DSN"], autocommit=True) as conn:
        calls = conn.execute("SELECT count(*) FROM claim_log WHERE instance_id = %s", (ctx.instance_id,)).fetchone()[0]
    if calls <= input["refusals"]:
        raise RateLimited("come back later", retry_after=0.2)
    return {"calls": calls, "attempt": ctx.attempt}


costly = Limit("test_cost", cost=400, per=4.0)  # 100 cost units per second
cost_flow = Flow("cost_flow")


@cost_flow.map(over=INPUT, limit=costly, cost=lambda n: n)
def spend(ctx, n: int) -> int:
    _log(ctx, n)
    return n


# --- fairness and priorities ---------------------------------------------------------------------------

fan = Flow("fair_fan", queue="fair")


@fan.map(over=INPUT)
def tick(ctx, n: int) -> int:
    time.sleep(0.002)
    return n


small_chain = Flow("fair_chain", queue="fair")


@small_chain.step()
def c1(ctx, input):
    return 1


@small_chain.step(after=[c1])
def c2(ctx, c1):
    return c1 + 1


@small_chain.step(after=[c2])
def c3(ctx, c2):
    return c2 + 1


urgent = Flow("urgent", queue="fair")


@urgent.step(priority=10)
def now(ctx, input):
    return "urgent"


# --- worker hooks ----------------------------------------------------------------------------------------

HOOK = {"pid": None, "calls": 0}


def init_hook() -> None:
    """--init support.claim_flows:init_hook: runs once per worker process before it takes work."""
    HOOK["pid"] = os.getpid()
    HOOK["calls"] += 1


hooks_flow = Flow("hooks_flow")


@hooks_flow.step()
def report(ctx, input):
    import sys

    torch = sys.modules.get("torch")
    return {"pid": os.getpid(), "hook_pid": HOOK["pid"], "calls": HOOK["calls"],
            "omp": os.environ.get("OMP_NUM_THREADS"), "mkl": os.environ.get("MKL_NUM_THREADS"),
            "torch_threads": torch.get_num_threads() if torch else None}

