"""The DBOS side of ``loadtests/run.py chain --compare dbos``: the same shape of work as pgflow's ``chain``
scenario (workflows of 3 no-op steps), queued on a DBOS Queue with the worker in this process.

    python loadtests/run.py dbos_compare --dsn DSN --workflows 2000 [--deadline 120] [--polling 1.0]

``--dsn`` names the database DBOS uses as its system database (run.py creates a fresh one and drops it
afterwards). Prints one JSON object on stdout: workflows, completed, seconds (first enqueue to last
completion), workflows/s and steps/s. The run is bounded: after ``--deadline`` seconds it stops waiting and
reports what completed by then (``timed_out: true``). Needs the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from urllib.parse import urlsplit, urlunsplit


def sqlalchemy_url(dsn: str) -> str:
    """DBOS wants a SQLAlchemy URL; pin the psycopg (3) driver, which is what this environment has."""
    parts = urlsplit(dsn)
    scheme = "postgresql+psycopg" if parts.scheme in ("postgres", "postgresql") else parts.scheme
    return urlunsplit((scheme, *parts[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadtests/run.py dbos_compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", required=True, help="postgresql:// URL of an empty database for DBOS")
    parser.add_argument("--workflows", type=int, default=2000)
    parser.add_argument("--deadline", type=float, default=120.0, help="stop waiting after this many seconds")
    parser.add_argument("--polling", type=float, default=1.0, help="queue polling interval (DBOS default 1.0)")
    parser.add_argument("--worker-concurrency", type=int, default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("DBOS__CLOUD", "false")
    logging.getLogger("dbos").setLevel(logging.WARNING)
    from dbos import DBOS, SetWorkflowID

    DBOS(config={"name": "pgflow_bench_dbos", "system_database_url": sqlalchemy_url(args.dsn),
                 "log_level": "WARNING", "run_admin_server": False})

    @DBOS.step()
    def one(i: int) -> None:
        return None

    @DBOS.step()
    def two(i: int) -> None:
        return None

    @DBOS.step()
    def three(i: int) -> None:
        return None

    @DBOS.workflow()
    def chain(i: int) -> int:
        one(i)
        two(i)
        three(i)
        return i

    DBOS.launch()
    try:
        queue = DBOS.register_queue("bench", polling_interval_sec=args.polling,
                                    worker_concurrency=args.worker_concurrency)
        started = time.monotonic()
        handles = []
        for i in range(args.workflows):
            with SetWorkflowID(f"bench-{i}"):
                handles.append(queue.enqueue(chain, i))
        enqueued = time.monotonic() - started
        deadline = started + args.deadline
        completed = 0
        timed_out = False
        # wait in order, but never past the deadline: poll the status instead of blocking on get_result
        for handle in handles:
            while True:
                status = handle.get_status().status
                if status in ("SUCCESS", "ERROR", "CANCELLED"):
                    completed += status == "SUCCESS"
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.02)
            if timed_out:
                break
        if timed_out:  # count what did finish, for a partial rate
            completed = sum(h.get_status().status == "SUCCESS" for h in handles)
        seconds = time.monotonic() - started
        print(json.dumps({
            "system": "dbos", "version": _version(), "workflows": args.workflows, "completed": completed,
            "seconds": seconds, "enqueue_seconds": enqueued, "timed_out": timed_out,
            "polling_interval_sec": args.polling,
            "workflows_per_second": completed / seconds, "steps_per_second": 3 * completed / seconds,
        }))
    finally:
        DBOS.destroy(workflow_completion_timeout_sec=0)
    return 0


def _version() -> str:
    from importlib.metadata import version

    return version("dbos")


if __name__ == "__main__":
    sys.exit(main())
