"""Flow definition errors are caught when the flow is defined (or validated at start), with clear text."""

from __future__ import annotations

import pytest

from pgflow import INPUT, Flow, FlowDefinitionError


def test_duplicate_step_name():
    flow = Flow("dup")

    @flow.step()
    def a(ctx, input):
        return 1

    with pytest.raises(FlowDefinitionError, match="duplicate step name 'a'"):
        flow.sql("a", "SELECT 1")


def test_unknown_dependency_is_reported_with_known_steps():
    flow = Flow("unknown_dep")

    @flow.step(after=["ghost"])
    def a(ctx, ghost):
        return 1

    with pytest.raises(FlowDefinitionError, match="unknown dependency 'ghost'.*steps: a"):
        flow.validate()


def test_cycle_is_reported_with_its_path():
    flow = Flow("cyclic")

    @flow.step(after=["c"])
    def a(ctx, c):
        return 1

    @flow.step(after=[a])
    def b(ctx, a):
        return 1

    @flow.step(after=[b])
    def c(ctx, b):
        return 1

    with pytest.raises(FlowDefinitionError, match=r"cycle: (a -> c -> b -> a|c -> b -> a -> c|b -> a -> c -> b)"):
        flow.validate()
    with pytest.raises(FlowDefinitionError, match="cycle"):
        _ = flow.version


def test_self_dependency():
    flow = Flow("selfish")
    with pytest.raises(FlowDefinitionError, match="cannot depend on itself"):
        flow.sql("a", "SELECT 1", after=["a"])


def test_map_over_a_step_annotated_to_return_a_non_list():
    flow = Flow("bad_map")

    @flow.step()
    def count(ctx, input) -> int:
        return 3

    with pytest.raises(FlowDefinitionError, match="annotated to return .*int.*not a list"):
        @flow.map(over=count)
        def each(ctx, x):
            return x


def test_map_over_a_list_annotation_is_accepted():
    flow = Flow("good_map")

    @flow.step()
    def items(ctx, input) -> list[int]:
        return [1]

    @flow.map(over=items)
    def each(ctx, x):
        return x

    assert flow.shape["steps"][1]["over"] == "items"
    assert flow.shape["steps"][1]["deps"] == ["items"]


def test_parameters_must_name_dependencies():
    flow = Flow("params")

    @flow.step()
    def a(ctx, input):
        return 1

    with pytest.raises(FlowDefinitionError, match="parameter 'b' names no dependency"):
        @flow.step(after=[a])
        def c(ctx, b):
            return 1


def test_first_parameter_is_the_context():
    flow = Flow("noctx")
    with pytest.raises(FlowDefinitionError, match="first parameter must be the step context"):
        @flow.step()
        def a():
            return 1


def test_sql_reference_to_unknown_name():
    flow = Flow("sqlref")
    with pytest.raises(FlowDefinitionError, match=r"refers to \$nope"):
        flow.sql("a", "SELECT $nope")


def test_plain_function_as_dependency_is_explained():
    flow = Flow("plainfn")

    def helper(ctx):
        return 1

    with pytest.raises(FlowDefinitionError, match="plain function, not a step"):
        flow.sql("a", "SELECT 1", after=[helper])


@pytest.mark.parametrize("kwargs, message", [
    ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
    ({"timeout": -1}, "timeout must be a positive number"),
    ({"queue": "Bad-Queue"}, "queue 'Bad-Queue'"),
    ({"retries": 3}, "unknown option"),
])
def test_bad_step_options(kwargs, message):
    flow = Flow("opts")
    with pytest.raises(FlowDefinitionError, match=message):
        flow.sql("a", "SELECT 1", **kwargs)


def test_reserved_and_malformed_names():
    with pytest.raises(FlowDefinitionError, match="identifier"):
        Flow("has space")
    flow = Flow("names")
    with pytest.raises(FlowDefinitionError, match="reserved"):
        flow.sql("input", "SELECT 1")
    with pytest.raises(FlowDefinitionError, match="no steps"):
        Flow("empty").validate()


def test_flatten_needs_a_map_and_lists():
    flow = Flow("flat")
    rows = flow.sql("rows", "SELECT 1 AS x")
    with pytest.raises(FlowDefinitionError, match="flatten"):
        flow.sql("b", "SELECT 1", after=[rows], flatten=True)
    with pytest.raises(FlowDefinitionError, match="list of lists"):
        flow.sql("c", "SELECT $item", over=rows, flatten=True)


def test_version_is_a_stable_hash_of_the_shape():
    def build(extra_sql: str) -> Flow:
        flow = Flow("versions")

        @flow.step()
        def a(ctx, input):
            return 1

        flow.sql("b", extra_sql, after=[a])
        return flow

    one, same, other = build("SELECT 1"), build("SELECT 1"), build("SELECT 2")
    assert one.version == same.version
    assert one.version != other.version
    assert len(one.version) == 16


def test_registration_follows_the_shape_and_refuses_an_invalid_flow():
    """A start sends flow.registration, computed once per shape: a step added later makes a new version,
    and a flow that does not validate is refused every time (an error is never cached)."""
    flow = Flow("registration")

    @flow.step()
    def a(ctx, input):
        return 1

    first = flow.registration
    assert first["flow"] == "registration" and first["version"] == flow.version
    assert flow.registration is first
    flow.sql("b", "SELECT 1", after=[a])
    assert flow.registration["version"] == flow.version != first["version"]
    assert '"b"' in flow.registration["shape"]

    broken = Flow("registration_broken")

    @broken.step(after=["ghost"])
    def c(ctx, ghost):
        return 1

    for _ in range(2):
        with pytest.raises(FlowDefinitionError, match="unknown dependency 'ghost'"):
            _ = broken.registration


def test_map_over_input_is_recorded():
    flow = Flow("over_input")

    @flow.map(over=INPUT)
    def each(ctx, x):
        return x

    assert flow.shape["steps"][0]["over"] == "input"
    assert flow.shape["steps"][0]["deps"] == []
