"""Batched maps, limits (rates, cost, concurrency per key, RateLimited), task values in SQL steps and worker
hooks, with a real coordinator and real worker processes (issue 14)."""

from __future__ import annotations

import pytest
from conftest import run_sql, wait_until
from support import claim_flows as cf

import pgflow
from pgflow import InstanceFailed


@pytest.fixture
def claims(dsn, engine_factory):
    """A coordinator and a worker (2 processes) that import support.claim_flows, logging into claim_log."""
    run_sql(dsn, cf.LOG_TABLE)
    engine = engine_factory(CLAIM_TEST_DSN=dsn)
    engine.coordinator()
    engine.worker("--import", "support.claim_flows")
    return engine


def finished(dsn: str, instance_id: int, timeout: float = 60.0) -> pgflow.InstanceInfo:
    return pgflow.wait(instance_id, timeout=timeout, dsn=dsn)


def log_rows(dsn: str, step: str) -> list[tuple]:
    return run_sql(dsn, "SELECT task_index, attempt, items, indices FROM claim_log WHERE step = %s "
                        "ORDER BY task_index, attempt", (step,))


def test_a_batched_map_gets_slices_and_the_fan_in_one_output_per_element(dsn, claims):
    iid = pgflow.start(cf.batched, list(range(10)), dsn=dsn)
    assert finished(dsn, iid).status == "completed"
    assert pgflow.result(iid, dsn=dsn) == [n * 2 for n in range(10)]
    rows = log_rows(dsn, "double")
    assert [(r[0], r[2], r[3]) for r in rows] == [
        (0, [0, 1, 2, 3], [0, 1, 2, 3]), (4, [4, 5, 6, 7], [4, 5, 6, 7]), (8, [8, 9], [8, 9])]
    tasks = run_sql(dsn, "SELECT count(*) FROM pgflow.steps WHERE instance_id = %s AND step_name = 'double' "
                         "AND task_index >= 0", (iid,))[0][0]
    assert tasks == 3


def test_a_failing_batch_is_retried_as_a_batch(dsn, claims):
    iid = pgflow.start(cf.whole, list(range(12)), dsn=dsn)
    assert finished(dsn, iid).status == "completed"
    assert pgflow.result(iid, dsn=dsn) == [-n for n in range(12)]
    attempts = {(r[0], r[1]): r[2] for r in log_rows(dsn, "flaky")}
    assert attempts[(5, 1)] == attempts[(5, 2)] == [5, 6, 7, 8, 9]  # the same slice, twice
    assert (0, 2) not in attempts and (10, 2) not in attempts


def test_split_on_failure_isolates_the_poison_element(dsn, claims):
    iid = pgflow.start(cf.poison, list(range(16)), dsn=dsn)
    with pytest.raises(InstanceFailed, match=r"careful\[13\]"):
        finished(dsn, iid)
        pgflow.result(iid, dsn=dsn)
    rows = run_sql(dsn, "SELECT task_index, status, output FROM pgflow.steps WHERE instance_id = %s "
                        "AND step_name = 'careful' AND task_index >= 0 ORDER BY task_index", (iid,))
    failed = [r for r in rows if r[1] == "failed"]
    assert [r[0] for r in failed] == [13]
    done = {r[0]: r[2] for r in rows if r[1] == "completed"}
    outputs = [x for index in sorted(done) for x in done[index]]
    assert outputs == [n + 1 for n in range(16) if n != 13]  # every other element completed
    # the poison batch was bisected: 8 -> 4 -> 2 -> 1, and the single element used its attempts
    sizes = sorted({len(r[2]) for r in log_rows(dsn, "careful") if 13 in r[2]}, reverse=True)
    assert sizes == [8, 4, 2, 1]


def test_a_batch_must_return_one_output_per_element(dsn, claims):
    iid = pgflow.start(cf.wrong_length, [1, 2, 3, 4], dsn=dsn)
    with pytest.raises(InstanceFailed, match="must return a list of 3 outputs"):
        finished(dsn, iid)
        pgflow.result(iid, dsn=dsn)


def test_sql_steps_see_their_task_values_and_batched_sql_maps(dsn, claims):
    iid = pgflow.start(cf.task_values, None, dsn=dsn)
    finished(dsn, iid)
    assert pgflow.result(iid, dsn=dsn) == [{"iid": iid, "step": "who", "attempt": 1, "key": f"pgflow:{iid}:who"}]
    iid = pgflow.start(cf.sql_batched, [1, 2, 3, 4, 5, 6], dsn=dsn)
    finished(dsn, iid)
    out = pgflow.result(iid, dsn=dsn)
    assert [r["sq"] for r in out] == [1, 4, 9, 16, 25, 36]
    assert {r["key"] for r in out} == {f"pgflow:{iid}:square[0]", f"pgflow:{iid}:square[4]"}
    assert {(r["iid"], r["step"], r["attempt"]) for r in out} == {(iid, "square", 1)}


def test_a_rate_limit_paces_starts_across_processes(dsn, claims):
    n = 60
    iid = pgflow.start(cf.rate_flow, list(range(n)), dsn=dsn)
    assert finished(dsn, iid).status == "completed"
    # 120 per 6 s (one start every 50 ms): any 1-second window holds at most 20 + burst - 1 = 20 starts
    starts = [r[0] for r in run_sql(dsn, "SELECT extract(epoch FROM started_at)::float8 FROM claim_log "
                                         "WHERE step = 'paced' ORDER BY started_at")]
    assert len(starts) == n
    most = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    assert most <= 21  # (+1: the log row is written a little after the admission)
    attempts = run_sql(dsn, "SELECT max(attempt) FROM pgflow.steps WHERE instance_id = %s", (iid,))[0][0]
    assert attempts == 1  # waiting for the limit spends no attempt


def test_a_cost_limit_paces_by_cost(dsn, claims):
    costs = [50] * 12  # 600 units at 100 per second
    iid = pgflow.start(cf.cost_flow, costs, dsn=dsn)
    assert finished(dsn, iid).status == "completed"
    starts = [r[0] for r in run_sql(dsn, "SELECT extract(epoch FROM started_at)::float8 FROM claim_log "
                                         "WHERE step = 'spend' ORDER BY started_at")]
    # 100 units per second: 2 tasks of 50 per second once their cost is known (a task is first assumed to
    # cost 5% of the budget: 20), so the 12 tasks take seconds, not one read batch
    assert starts[-1] - starts[0] >= 3.0
    late = [t for t in starts if t >= starts[0] + 2.0]  # after the estimate has learnt the real cost
    assert max(sum(1 for t in late if s <= t < s + 1.0) for s in late) <= 3


def test_concurrency_per_key_never_exceeds_the_limit(dsn, claims):
    jobs = [{"tenant": "a" if i % 3 else "b", "n": i} for i in range(18)]
    iid = pgflow.start(cf.tenant_flow, jobs, dsn=dsn)
    assert finished(dsn, iid).status == "completed"
    assert pgflow.result(iid, dsn=dsn) == list(range(18))
    rows = run_sql(dsn, "SELECT note, started_at, finished_at FROM claim_log WHERE step = 'busy'")
    for tenant in ("a", "b"):
        spans = [(s, f) for note, s, f in rows if note == tenant]
        overlap = max(sum(1 for s2, f2 in spans if s2 <= s < f2) for s, _ in spans)
        assert overlap <= 2, (tenant, overlap)
    # both tenants ran at once at some point: the limit is per key, not global
    a = [(s, f) for note, s, f in rows if note == "a"]
    b = [(s, f) for note, s, f in rows if note == "b"]
    assert any(s1 < f2 and s2 < f1 for s1, f1 in a for s2, f2 in b)


def test_rate_limited_parks_without_spending_attempts(dsn, claims):
    iid = pgflow.start(cf.told_to_wait, {"refusals": 3}, dsn=dsn)
    assert finished(dsn, iid).status == "completed"  # max_attempts=1, refused three times
    assert pgflow.result(iid, dsn=dsn) == {"calls": 4, "attempt": 1}


def test_worker_init_hook_and_one_compute_thread_per_process(dsn, engine_factory):
    run_sql(dsn, cf.LOG_TABLE)
    engine = engine_factory(CLAIM_TEST_DSN=dsn)
    engine.coordinator()
    engine.worker("--import", "support.claim_flows", "--init", "support.claim_flows:init_hook")
    outputs = [pgflow.result(i, dsn=dsn) for i in [pgflow.start(cf.hooks_flow, k, dsn=dsn) for k in range(6)]
               if finished(dsn, i)]
    for out in outputs:
        assert out["hook_pid"] == out["pid"] and out["calls"] == 1
        assert out["omp"] == "1" and out["mkl"] == "1"


def test_the_environment_wins_over_the_default_thread_count(dsn, engine_factory):
    engine = engine_factory(CLAIM_TEST_DSN=dsn, OMP_NUM_THREADS="3")
    engine.coordinator()
    engine.worker("--import", "support.claim_flows")
    iid = pgflow.start(cf.hooks_flow, 0, dsn=dsn)
    finished(dsn, iid)
    out = pgflow.result(iid, dsn=dsn)
    assert out["omp"] == "3" and out["mkl"] == "1" and out["calls"] == 0


def test_a_bad_init_hook_is_refused_at_start(dsn, engine_factory):
    engine = engine_factory()
    proc = engine.worker("--import", "support.claim_flows", "--init", "support.claim_flows:no_such_hook")
    wait_until(lambda: proc.poll() is not None, 30, "the worker to refuse its --init")
    assert proc.returncode != 0
    engine.procs.remove(proc)
