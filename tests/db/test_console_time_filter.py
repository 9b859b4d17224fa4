"""The console's time filter, at the database: pgflow.first_instance_after(t, owner) is the smallest id of the
owner's instances created at or after t (or a bound that selects the same rows), whether it searches every
instance or only the owner's (the path taken for a role that sees only its own rows)."""

from __future__ import annotations

import random

from conftest import run_sql

OWNERS = ["alice", "bob"]


def fill(dsn: str, n: int) -> None:
    """n instances, one a minute going forward, owned at random by alice or bob (rows written as the test's
    superuser: the function is what is under test, not the start path)."""
    rng = random.Random(7)
    owners = [rng.choice(OWNERS) for _ in range(n)]
    run_sql(dsn, """INSERT INTO pgflow.flows (flow_name, version, shape) VALUES ('f', 'v1', '{"steps": []}')
                    ON CONFLICT DO NOTHING""")
    run_sql(dsn, """INSERT INTO pgflow.instances (flow_name, flow_version, status, input, created_at, owner)
                    SELECT 'f', 'v1', 'completed', '{}', timestamptz '2026-01-01' + make_interval(mins => g::int), o
                    FROM unnest(%s::name[]) WITH ORDINALITY AS u(o, g)""", (owners,))


def test_the_owner_search_and_the_whole_search_select_the_same_rows(dsn):
    fill(dsn, 500)
    probes = ["2025-12-31", "2026-01-01 00:01", "2026-01-01 03:17:30", "2026-01-01 04:00", "2026-01-01 08:20",
              "2026-01-01 08:21", "2027-01-01"]
    for owner in OWNERS:
        for at in probes:
            expected = run_sql(dsn, """SELECT array_agg(id ORDER BY id) FROM pgflow.instances
                                       WHERE owner = %s AND created_at >= %s""", (owner, at))[0][0] or []
            for search_owner in (owner, None):
                bound = run_sql(dsn, "SELECT pgflow.first_instance_after(%s, %s)", (at, search_owner))[0][0]
                got = [] if bound is None else [r[0] for r in run_sql(
                    dsn, "SELECT id FROM pgflow.instances WHERE owner = %s AND id >= %s ORDER BY id", (owner, bound))]
                assert got == expected, (owner, at, search_owner, bound)


def test_an_owner_with_no_instances_gets_none(dsn):
    fill(dsn, 20)
    assert run_sql(dsn, "SELECT pgflow.first_instance_after(%s, 'carol')", ("2025-01-01",)) == [(None,)]
