"""Python functions used as steps of control-flow workflows in the tests (workers import them by name)."""

from __future__ import annotations

from pgflow import tree as t

#: started from the CLI test: waits for signal "go", then selects its data
approval = t.wait_for_signal("go").named("s") >> "SELECT $s.v AS v"


@t.task
def total(ctx, counts):
    """Sum the n of each joined count (a join's result is the list of its branches' results)."""
    return sum(rows[0]["n"] for rows in counts)


@t.task
def greet(ctx, input, vars):
    return f"{vars.get('greeting', 'hello')}, {input['who']} (attempt {ctx.attempt})"
