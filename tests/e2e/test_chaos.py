"""Chaos: while fan-out pipelines (Python map tasks that record each run, then an exactly-once SQL map), chains
and Python+SQL effect flows run, kill -9 worker processes, worker supervisors and coordinators at random
(seeded: the seed is printed; set PGFLOW_CHAOS_SEED to replay one) and restart PostgreSQL once or twice,
restarting what was killed. Then let everything settle and check that nothing was lost, duplicated or left
in flight, and that the engine is still up. About two minutes on an idle machine; every wait has a deadline."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from typing import Any

import psutil
import psycopg
import pytest
from conftest import restart_postgres, run_sql, wait_until
from psycopg import sql as pgsql
from support import poison_flows as pf
from support import sample_flows as sf

import pgflow

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("PGFLOW_CHAOS_SEED", "6061"))
CHAOS_SECONDS = 55.0
SETTLE_SECONDS = 300.0  # a deadline, not a pace: settling takes well under a minute on an idle machine
PIPELINE_ITEMS, TASK_SECONDS = 200, 0.1  # about 7 s of work per pipeline for 3 worker processes
EFFECTS_PER_WAVE = 5
CHAINS_PER_WAVE = 10


def with_database(dsn, fn, what, timeout=30.0):
    """Run ``fn`` once the server answers (it may be coming back from a restart)."""
    def answer() -> tuple[Any]:
        psycopg.connect(dsn, connect_timeout=5).close()
        return (fn(),)  # truthy even when fn's value is not

    return wait_until(answer, timeout, f"the database to come back ({what})", interval=0.5,
                      retry_on=(psycopg.OperationalError, pgflow.DatabaseUnavailable))[0]


class Chaos:
    """The engine under test and the random things done to it."""

    def __init__(self, dsn, engine, server, rng):
        self.dsn, self.engine, self.server, self.rng = dsn, engine, server, rng
        self.coordinators = [engine.coordinator(), engine.coordinator()]
        self.worker = self._worker()
        self.log: list[str] = []
        self.started = time.monotonic()
        self.restarts_left = rng.choice([1, 2])
        self.can_restart = True
        self.counts = {"child": 0, "supervisor": 0, "coordinator": 0, "postgres": 0}
        self.pipelines: dict[int, int] = {}  # instance id -> run
        self.effects: dict[int, int] = {}  # instance id -> i
        self.chains: dict[int, list[int]] = {}  # wave -> instance ids
        self.waves = 0

    def _worker(self):
        return self.engine.worker("--import", "support.poison_flows", concurrency=3)

    def note(self, text):
        line = f"{time.monotonic() - self.started:6.1f}s  {text}"
        self.log.append(line)
        print(line, flush=True)

    def kill_child(self):
        try:
            children = psutil.Process(self.worker.pid).children()
        except psutil.NoSuchProcess:
            children = []
        if not children:
            return self.note("no worker child to kill")
        victim = self.rng.choice(children)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGKILL)
        self.counts["child"] += 1
        self.note(f"kill -9 worker child {victim.pid}")

    def kill_supervisor(self):
        old = self.worker
        old.send_signal(signal.SIGKILL)
        old.wait(60)
        self.worker = self._worker()
        self.counts["supervisor"] += 1
        self.note(f"kill -9 worker supervisor {old.pid}; started {self.worker.pid} (its children drain)")

    def kill_coordinator(self):
        index = self.rng.randrange(len(self.coordinators))
        old = self.coordinators[index]
        old.send_signal(signal.SIGKILL)
        old.wait(60)
        self.coordinators[index] = self.engine.coordinator()
        self.counts["coordinator"] += 1
        self.note(f"kill -9 coordinator {old.pid}; started {self.coordinators[index].pid}")

    def restart_postgres(self):
        if not self.can_restart or self.restarts_left == 0:
            return self.kill_child()
        began = time.monotonic()
        try:
            restart_postgres(self.server)
        except pytest.skip.Exception as exc:  # a PGFLOW_TEST_DSN server this process cannot restart
            self.can_restart = False
            return self.note(f"cannot restart PostgreSQL here ({exc}); going on without")
        self.restarts_left -= 1
        self.counts["postgres"] += 1
        self.note(f"restarted PostgreSQL ({time.monotonic() - began:.1f} s)")

    def start_wave(self):
        """One more pipeline, a few Python+SQL effect flows and some chains (each start is one transaction,
        done right after a check that the server answers)."""
        wave = self.waves
        self.waves += 1

        def start():  # idempotent, should it be retried after a lost connection
            if wave not in self.pipelines.values():
                run = pgflow.start(pf.pipeline, {"n": PIPELINE_ITEMS, "run": wave, "sleep": TASK_SECONDS},
                                   dsn=self.dsn)
                self.pipelines[run] = wave
            for i in range(wave * EFFECTS_PER_WAVE, (wave + 1) * EFFECTS_PER_WAVE):
                if i not in self.effects.values():
                    self.effects[pgflow.start(sf.effects, {"i": i, "sleep": 0.1}, dsn=self.dsn)] = i
            while len(self.chains.setdefault(wave, [])) < CHAINS_PER_WAVE:
                n = len(self.chains[wave])
                self.chains[wave].append(pgflow.start(sf.chain, {"n": n, "label": f"wave-{wave}"}, dsn=self.dsn))

        with_database(self.dsn, start, "starting a wave")
        self.note(f"started wave {wave}: a pipeline of {PIPELINE_ITEMS} items, {EFFECTS_PER_WAVE} effect flows, "
                  f"{CHAINS_PER_WAVE} chains")

    def engine_alive(self):
        dead = [(p.pid, p.returncode) for p in [*self.coordinators, self.worker] if p.poll() is not None]
        assert not dead, f"engine processes died on their own: {dead}\n" + "\n".join(self.log)


@pytest.fixture
def chaos_db(effects_db):
    run_sql(effects_db, "CREATE TABLE chaos_marks (run int NOT NULL, item int NOT NULL)")
    return effects_db


def test_chaos(chaos_db, engine_factory, server):
    dsn = chaos_db
    rng = random.Random(SEED)
    print(f"\nchaos seed {SEED} (replay with PGFLOW_CHAOS_SEED={SEED})", flush=True)
    engine = engine_factory(PGFLOW_TEST_EFFECTS_DSN=dsn, PGFLOW_LOG_LEVEL="ERROR")
    chaos = Chaos(dsn, engine, server, rng)
    engine.worker_children(chaos.worker, 3)

    # the workload, in waves: fan-out pipelines, Python+SQL effect flows and chains
    for _ in range(3):
        chaos.start_wave()

    actions = [chaos.kill_child] * 4 + [chaos.kill_supervisor, chaos.kill_coordinator]
    # PostgreSQL restarts at chosen moments (once or twice), the rest at random
    restart_at = sorted(rng.uniform(8, CHAOS_SECONDS - 8) for _ in range(chaos.restarts_left))
    deadline = chaos.started + CHAOS_SECONDS
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(1.0, 3.5))
        chaos.engine_alive()
        if restart_at and time.monotonic() - chaos.started >= restart_at[0]:
            restart_at.pop(0)
            chaos.restart_postgres()
        elif rng.random() < 0.2:
            chaos.start_wave()
        else:
            rng.choice(actions)()
    if chaos.restarts_left and chaos.can_restart:  # the restart moments were not reached (slow machine)
        chaos.restart_postgres()
    chaos.note(f"chaos over: {chaos.counts}")

    # settle: every instance terminal, then nothing in flight
    def unfinished():
        return run_sql(dsn, "SELECT id, flow_name, status FROM pgflow.instances WHERE status IN ('pending', 'running')")

    def settled() -> bool:
        chaos.engine_alive()
        return not with_database(dsn, unfinished, "settling")

    wait_until(settled, SETTLE_SECONDS, "every instance to finish after the chaos", interval=0.5,
               detail=lambda: f"unfinished: {unfinished()[:10]}\n" + "\n".join(chaos.log))
    chaos.note("every instance finished")
    queues = [q for (q,) in run_sql(dsn, "SELECT queue_name FROM pgflow.queues")]

    def in_flight():
        live = {q: run_sql(dsn, pgsql.SQL("SELECT count(*) FROM pgmq.{}").format(pgsql.Identifier("q_" + q)))[0][0]
                for q in queues}
        open_steps = run_sql(dsn, "SELECT status, count(*) FROM pgflow.steps"
                                  " WHERE status IN ('queued', 'running', 'retrying') GROUP BY 1")
        due = run_sql(dsn, "SELECT count(*) FROM pgflow.wakeups WHERE due_at <= now()")[0][0]
        return {"live messages": {q: n for q, n in live.items() if n}, "open steps": open_steps, "due wakeups": due}

    wait_until(lambda: not any(in_flight().values()), 120, "nothing in flight after settling", interval=0.5,
               detail=lambda: f"still in flight: {in_flight()}")

    # every instance completed, or failed with a stated reason
    instances = run_sql(dsn, "SELECT id, flow_name, status, error, output FROM pgflow.instances ORDER BY id")
    by_status: dict[str, int] = {}
    for iid, flow, status, error, _ in instances:
        by_status[status] = by_status.get(status, 0) + 1
        assert status in ("completed", "failed"), (iid, flow, status)
        if status == "failed":
            assert error and error.strip(), f"instance {iid} ({flow}) failed without a reason"
    chaos.note(f"instances: {by_status}; failures: "
               f"{sorted({e.split(':')[0] + ': ' + e[-80:] for _, _, s, e, _ in instances if s == 'failed'})[:5]}")
    started = len(chaos.pipelines) + len(chaos.effects) + sum(len(ids) for ids in chaos.chains.values())
    assert len(instances) == started, f"{len(instances)} instances, {started} started"
    completed = {iid: output for iid, _, status, _, output in instances if status == "completed"}

    # exactly once: the SQL map of each pipeline wrote one row per item, never two
    rows = run_sql(dsn, "SELECT run, item, count(*) FROM chaos_marks GROUP BY 1, 2")
    marks = {(run, item): n for run, item, n in rows}
    assert all(n == 1 for n in marks.values()), f"duplicated SQL effects: {[k for k, n in marks.items() if n > 1]}"
    for iid, run in chaos.pipelines.items():
        if iid in completed:
            assert completed[iid] == {"count": PIPELINE_ITEMS, "sum": sum(i * i for i in range(PIPELINE_ITEMS)),
                                      "marked": PIPELINE_ITEMS}
            assert all(marks.get((run, i)) == 1 for i in range(PIPELINE_ITEMS)), f"pipeline {run} lost SQL effects"
    effect_rows = dict(run_sql(dsn, "SELECT instance_id, count(*) FROM sql_effects GROUP BY 1"))
    assert all(n == 1 for n in effect_rows.values()), f"duplicated SQL effects: {effect_rows}"
    for iid, i in chaos.effects.items():
        if iid in completed:
            assert effect_rows.get(i) == 1 and completed[iid] == {"rowcount": 1}

    for ids in chaos.chains.values():
        for n, iid in enumerate(ids):
            if iid in completed:
                assert completed[iid]["value"] == (n + 1) * 10 + 1, (iid, completed[iid])

    # at least once, never more often than attempts: a Python effect ran at most once per attempt
    runs = run_sql(dsn, "SELECT key, count(*), count(DISTINCT attempt), max(attempt) FROM py_runs GROUP BY 1")
    limits = {"process": pf.pipeline.max_attempts, "work": sf.effects.max_attempts}
    for key, count, distinct, top in runs:
        step = key.split(":")[2].split("[")[0]
        assert count == distinct <= top <= limits[step], f"{key}: {count} runs, attempts up to {top}"
    assert len([r for r in runs if r[0].split(":")[2].startswith("process[")]) >= sum(
        PIPELINE_ITEMS for iid in chaos.pipelines if iid in completed)

    # the engine is still up, and still works
    chaos.engine_alive()
    final = pgflow.start(sf.chain, {"n": 1, "label": "after"}, dsn=dsn)
    st = pgflow.wait(final, 60, dsn=dsn)
    assert st.status == "completed", st.error
    chaos.note(f"done: {chaos.counts}")
    assert chaos.counts["child"] + chaos.counts["supervisor"] + chaos.counts["coordinator"] >= 5, chaos.counts
    if chaos.can_restart:
        assert chaos.counts["postgres"] >= 1
