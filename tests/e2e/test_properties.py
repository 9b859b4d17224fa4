"""Property-based tests (hypothesis): whatever a user builds or types, pgflow either accepts it — and then can
run it — or refuses it with its own clear error, never with another exception, a crash or a wedged engine.

(a) DAG flows from the Python API: valid, or FlowDefinitionError; a valid shape is JSON and its version stable.
(b) control-flow trees from pgflow.tree builders and raw node dicts: accepted by pgflow.tree_shape, or refused
    with SQLSTATE 22023/22004 and a "pgflow:" message; what is accepted, the coordinator and workers can run.
(c) SQL operator expressions typed as text: a shape, or a parser error, or a clean pgflow error; no crash.
(d) end to end: accepted random trees and DAG flows reach a terminal state, leave no live message, and the
    coordinator and worker processes survive.

Examples are derandomized (the same on every run) and never stored (no .hypothesis directory)."""

from __future__ import annotations

import contextlib
import inspect
import json
import keyword
import math
import re
import time
import typing
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import wait_until
from hypothesis import HealthCheck, Phase, assume, event, example, given, note, settings
from hypothesis import strategies as st

import pgflow
from pgflow import INPUT, Flow, FlowDefinitionError
from pgflow import tree as t
from pgflow.client import register_tree
from pgflow.db.codec import configure
from pgflow.engine.tree import next_fire
from pgflow.registry import REGISTRY
from pgflow.shape import FlowShape

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")  # hypothesis, on failures only

BASE = {"deadline": None, "database": None, "derandomize": True, "print_blob": False,
        "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                  HealthCheck.filter_too_much, HealthCheck.data_too_large]}
NO_SHRINK = [Phase.explicit, Phase.generate]  # end-to-end examples are slow: report the first failure as found

PGFLOW_SQLSTATES = {"22023", "22004"}  # invalid_parameter_value, null_value_not_allowed
PARSER_SQLSTATES = {"42601", "42883", "42725"}  # syntax error, no such function/operator, ambiguous operator
QUEUE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")

# no NUL (PostgreSQL text cannot hold it) and no lone surrogates (not encodable as UTF-8)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


@pytest.fixture(autouse=True)
def _keep_registry():
    """Flows register themselves by name in-process: do not let random flows shadow the sample ones."""
    saved = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(saved)


# ============================================================================================ (a) DAG flows

VALID_NAMES = ["a", "b", "c", "load", "step_2"]
BAD_NAMES = ["input", "item", "vars", "ctx", "secrets", "1x", "a-b", "", " ", "é", "a b", None, 5]
step_names = st.one_of(st.sampled_from(VALID_NAMES), st.sampled_from(BAD_NAMES), TEXT)
junk_values = st.one_of(
    st.integers(-3, 12), st.integers(2 ** 62, 2 ** 80), st.floats(), st.booleans(), st.none(),
    st.sampled_from(["pgflow", "q1", "Bad Queue", "", "x" * 41, "1"]), st.lists(st.integers(0, 3), max_size=2),
)
OPTION_KEYS = ["queue", "max_attempts", "backoff_base", "backoff_cap", "timeout"]
STATEMENTS = ["SELECT 1 AS n", "SELECT $input AS v", "SELECT $input.k? AS v", "SELECT $item AS v",
              "SELECT $vars.k? AS v", "SELECT {dep} AS v", "SELECT {dep}.n? AS v", "SELECT $nope", "SELECT $1",
              "SELECT '", "SELECT $$x", 'SELECT "x', "/* open", "SELECT 100% AS pct", "SELECT '$notref' AS s",
              "SELECT $a$ $x $a$ AS s", "SELECT $input.* ", "SELECT $x.a.*", "", "   ", None, 42]
RETURN_HINTS = [None, list, list[int], tuple, typing.Any, int, dict, str, "NotDefinedAnywhere"]


@st.composite
def dag_specs(draw):
    """A recipe for a flow: flow options and a list of builder calls with possibly bad arguments."""
    flow_name = draw(st.one_of(st.sampled_from(["prop_flow", "prop_other"]), st.sampled_from(["1flow", "", None])))
    flow_options = draw(st.dictionaries(st.sampled_from(OPTION_KEYS), junk_values, max_size=2))
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        known = [s["name"] for s in steps] + VALID_NAMES[:2]
        ref = st.one_of(st.sampled_from(known), st.sampled_from(["nope", INPUT]), st.integers(0, 5).map(
            lambda i: ("step", i)), st.sampled_from([None, 3.5]))
        after = draw(st.one_of(st.lists(ref, max_size=3), ref, st.just(5)))
        kind = draw(st.sampled_from(["step", "map", "sql", "sql_map"]))
        over = draw(ref) if kind in ("map", "sql_map") else None
        options = draw(st.dictionaries(st.sampled_from([*OPTION_KEYS, "bogus"]), junk_values, max_size=2))
        params = draw(st.lists(st.sampled_from(["ctx", "input", "vars", "x", "a", "b", "load", "item"]),
                               max_size=4, unique=True))
        steps.append({
            "kind": kind, "name": draw(step_names), "after": after, "over": over, "options": options,
            "flatten": draw(st.booleans()) if over is not None else draw(st.sampled_from([False, False, True])),
            "params": params, "defaults": draw(st.integers(0, len(params))), "kwargs": draw(st.booleans()),
            "hint": draw(st.sampled_from(RETURN_HINTS)), "statement": draw(st.sampled_from(STATEMENTS)),
        })
    return {"name": flow_name, "options": flow_options, "steps": steps}


def _function(name, params, defaults, kwargs, hint):
    """A step function with the given signature: the last ``defaults`` parameters (never the first, ctx) get a
    default; with ``kwargs`` it also takes ``**extra``."""
    def fn(*args, **kw):
        return None

    names = [p for p in params if p.isidentifier() and not keyword.iskeyword(p)]
    with_default = min(defaults, max(len(names) - 1, 0))  # trailing parameters, never the first (ctx)
    fixed = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               default=None if i > 0 and i >= len(names) - with_default else inspect.Parameter.empty)
             for i, p in enumerate(names)]
    if kwargs:
        fixed.append(inspect.Parameter("extra", inspect.Parameter.VAR_KEYWORD))
    fn.__signature__ = inspect.Signature(fixed)
    fn.__name__ = fn.__qualname__ = name if isinstance(name, str) and name.isidentifier() else "fn"
    fn.__annotations__ = {} if hint is None else {"return": hint}
    return fn


def _resolve(ref, built):
    if isinstance(ref, tuple):  # ("step", i): the Step object an earlier call returned, when there is one
        return built[ref[1]] if ref[1] < len(built) else "missing"
    return ref


def build_flow(spec):
    """Build the flow; returns (flow or None, errors). Every builder call must succeed or raise
    FlowDefinitionError (with a message) and, when it raises, leave the flow's steps unchanged."""
    errors = []
    try:
        flow = Flow(spec["name"], **spec["options"])
    except FlowDefinitionError as exc:
        assert str(exc).strip(), "FlowDefinitionError without a message"
        return None, [exc]
    built = []
    for s in spec["steps"]:
        after = [_resolve(r, built) for r in s["after"]] if isinstance(s["after"], list) else _resolve(
            s["after"], built)
        over = _resolve(s["over"], built)
        before = dict(flow.steps)
        try:
            if s["kind"] in ("sql", "sql_map"):
                deps = [d.name if hasattr(d, "name") else d for d in (after if isinstance(after, list) else [after])]
                dep = "$" + str(deps[0]) if deps and isinstance(deps[0], str) else "$nope"
                statement = s["statement"].replace("{dep}", dep) if isinstance(s["statement"], str) else s["statement"]
                step = flow.sql(s["name"], statement, after=after, over=over if s["kind"] == "sql_map" else None,
                                flatten=s["flatten"], **s["options"])
            else:
                fn = _function(s["name"], s["params"], s["defaults"], s["kwargs"], s["hint"])
                if s["kind"] == "map":
                    step = flow.map(fn, over=over, flatten=s["flatten"], name=s["name"], after=after, **s["options"])
                else:
                    step = flow.step(fn, name=s["name"], after=after, **s["options"])
            built.append(step)
        except FlowDefinitionError as exc:
            assert str(exc).strip(), "FlowDefinitionError without a message"
            assert flow.steps == before, "a refused step was registered anyway"
            errors.append(exc)
    return flow, errors


def _acyclic_and_closed(steps: dict[str, list[str]]) -> bool:
    if any(d not in steps for deps in steps.values() for d in deps):
        return False
    indegree = {n: len(deps) for n, deps in steps.items()}
    ready = [n for n, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        done = ready.pop()
        seen += 1
        for n, deps in steps.items():
            if done in deps:
                indegree[n] -= 1
                if indegree[n] == 0:
                    ready.append(n)
    return seen == len(steps)


@settings(max_examples=400, **BASE)
@given(spec=dag_specs())
def test_random_dag_definitions_validate_or_raise_flow_definition_error(spec):
    note(repr(spec))
    flow, _ = build_flow(spec)
    if flow is None:
        return
    graph = {name: list(step.deps) for name, step in flow.steps.items()}
    try:
        shape, version = flow.shape, flow.version
    except FlowDefinitionError as exc:
        assert str(exc).strip()
        assert not graph or not _acyclic_and_closed(graph), f"a valid DAG was refused: {exc}"
        return
    assert graph and _acyclic_and_closed(graph), "an invalid DAG (unknown dependency or cycle) was accepted"
    assert re.fullmatch(r"[0-9a-f]{16}", version)
    # what the database stores is JSON: the shape must survive strict JSON unchanged (no NaN, no infinity)
    try:
        stored = json.loads(json.dumps(shape, allow_nan=False))
    except ValueError as exc:
        raise AssertionError(f"the shape is not strict JSON ({exc}): {shape}") from None
    assert stored == shape, "the shape changes when stored"
    parsed = FlowShape.from_json(flow.name, version, None, stored)  # as the coordinator reads it
    assert set(parsed.steps) == set(flow.steps)
    # the same definition, built again, has the same version; the version is a function of the shape
    again, _ = build_flow(spec)
    assert again.version == version and again.shape == shape


def test_known_definition_edge_cases_raise_flow_definition_error():
    """Minimal cases hypothesis found (kept explicit so each is reported on its own)."""
    def fn(ctx):
        return 1

    cases = {
        "after=5": lambda: Flow("prop_e1").step(fn, after=5),
        "max_attempts=2**70": lambda: _shape_of(Flow("prop_e2", max_attempts=2 ** 70)),
        "step backoff_cap=2**70": lambda: _shape_of(Flow("prop_e3"), backoff_cap=2 ** 70),
        "flow backoff_base=10**400": lambda: Flow("prop_e4", backoff_base=10 ** 400),
        "flow backoff_cap=None": lambda: Flow("prop_e8", backoff_cap=None),
        "timeout=nan": lambda: _strict_shape(Flow("prop_e5", timeout=math.nan)),
        "step timeout=inf": lambda: _strict_shape(Flow("prop_e6"), timeout=math.inf),
        "map(over=None) is a map": lambda: _is_map(Flow("prop_e7").map(lambda ctx, x=None: x, name="m", over=None)),
    }
    problems = []
    for what, make in cases.items():
        try:
            make()
            problems.append(f"{what}: accepted")
        except FlowDefinitionError:
            pass
        except Exception as exc:  # noqa: BLE001 - the point is to see which other exception escapes
            problems.append(f"{what}: {type(exc).__name__}: {exc}")
    assert not problems, "\n".join(problems)


def _is_map(step):
    assert step.is_map, "flow.map(over=None) silently built a plain step"


def test_flatten_over_a_sql_map_is_accepted():
    """A SQL map's fan-in is a list of lists (one list of rows per task): flatten applies to it."""
    flow = Flow("prop_flatten")
    flow.sql("rows", "SELECT n FROM generate_series(1, 3) AS n")
    flow.sql("pairs", "SELECT $item.n AS n, $item.n * 10 AS m", over="rows")
    flow.sql("each", "SELECT $item.m AS m", over="pairs", flatten=True)
    assert flow.version


def _shape_of(flow, **options):
    flow.step(lambda ctx: 1, name="only", **options)
    return flow.version


def _strict_shape(flow, **options):
    flow.step(lambda ctx: 1, name="only", **options)
    json.dumps(flow.shape, allow_nan=False)  # ValueError: NaN/inf is silently stored as null
    return flow.version


# ============================================================================================ (b) trees

NODE_TYPES = ["sql", "python", "http", "seq", "join", "race", "name", "if", "has_rows", "loop", "break", "sleep",
              "schedule", "wait_signal"]
_SAMPLE_CRONS = (
    st.sampled_from(["* * * * *", "*/5 * * * *", "0 0 * * mon", "0 0 30 2 *", "61 * * * *", "* * * *",
                     "99999999999 * * * *", "1-99999999999 * * * *", "* * * * sat-sun", "*/0 * * * *", "",
                     "  * * * * *  ", "* * * dec-jan *", "5-1 * * * *", "0-59/100 * * * *"]))
CRONS = st.one_of(_SAMPLE_CRONS, _SAMPLE_CRONS, st.text("0123456789*/,- adefjmnostuw", max_size=20))
SQL_TEXTS = st.one_of(
    st.sampled_from(["SELECT 1 AS n", "SELECT $input AS v", "SELECT $x.n? AS n", "SELECT $x AS v", "SELECT $nope",
                     "SELECT $1", "SELECT '; DROP TABLE canary; --' AS s", "SELECT 'it''s' AS s", "SELECT $$ $q $$",
                     "SELECT 1 -- it's\n, $nope, 'x'", "SELECT E'\\'', $nope, 'x'", "", "   ", "{", "SELECT 100%"]),
    TEXT,
)
NUMBERS = st.one_of(st.integers(-5, 100), st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([0, 0.5, -1, 1e300, 1e12, 2 ** 31, 2 ** 63 - 1]))
# JSON values that may appear where a node expects something else (no NaN: JSON cannot carry it)
JSONISH = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, st.sampled_from(["false", "true", "no", "NaN", "GET"]),
                    st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.sampled_from(["t", "x"]),
                                                                             st.integers(0, 3), max_size=2))
NAMES = st.one_of(st.sampled_from(["x", "y", "input", "vars", "item", "1bad", "", "a b"]), TEXT)
LEAF_OPTIONS = st.dictionaries(st.sampled_from(["max_attempts", "timeout", "queue", "backoff_base", "backoff_cap",
                                                "retry_on"]), JSONISH, max_size=2)


_PLAIN_LEAVES = st.sampled_from([
    t.sql("SELECT 1 AS n"), t.sql("SELECT $input AS v"), t.python("support.poison_flows:echo"), t.sleep(1),
    t.wait_for_schedule("* * * * *"), t.wait_for_signal("go", 5), t.http("http://127.0.0.1:9/x"), "SELECT 2 AS n",
])
# option values the validator might mishandle, on otherwise plain leaves
_ODD_OPTIONS = st.dictionaries(
    st.sampled_from(["max_attempts", "timeout", "queue", "backoff_base", "backoff_cap"]),
    st.one_of(JSONISH, st.sampled_from([1.5, 1e10, -5, 0, "3", "abc", True, None, 2 ** 63 - 1])), min_size=1,
    max_size=2)


def _leaf_builders():
    return st.one_of(
        _PLAIN_LEAVES, _PLAIN_LEAVES, _PLAIN_LEAVES,
        st.tuples(_PLAIN_LEAVES, _ODD_OPTIONS).map(lambda p: t.as_node(p[0]).options(**p[1])),
        SQL_TEXTS.map(t.sql),
        st.sampled_from(["support.poison_flows:echo", "m:f", "not a ref", "", "os:system"]).map(t.python),
        st.builds(t.http, st.sampled_from(["http://127.0.0.1:9/x", "", "not a url"]),
                  st.sampled_from(["GET", "post", "BREW", ""])),
        NUMBERS.map(t.sleep),
        CRONS.map(t.wait_for_schedule),
        st.builds(t.wait_for_signal, NAMES, st.one_of(st.none(), NUMBERS)),
        NAMES.map(t.has_rows),
        st.just(t.brk()),
        SQL_TEXTS,  # plain text is a SQL step
    )


def _raw_nodes(children):
    """Raw node dicts with arbitrary fields (as pgflow.tree.Node({...}) or a JSON literal would give)."""
    fields = {"c": st.one_of(st.lists(children.map(lambda c: t.as_node(c).data), max_size=3), JSONISH),
              "sql": JSONISH | SQL_TEXTS, "name": NAMES,
              "seconds": JSONISH, "timeout": JSONISH, "cron": CRONS | JSONISH, "while": JSONISH, "fn": JSONISH,
              "url": JSONISH, "method": JSONISH, "max_attempts": JSONISH, "queue": JSONISH, "backoff_base": JSONISH}
    return st.builds(
        lambda kind, extra: {"t": kind, **extra},
        st.one_of(st.sampled_from(NODE_TYPES), st.sampled_from(["bogus", 5, None, ""])),
        st.fixed_dictionaries({}, optional=fields),
    ).map(t.Node)


def _composites(children):
    child = children
    return st.one_of(
        st.lists(child, min_size=1, max_size=3).map(lambda c: t.seq(*c)),
        st.lists(child, min_size=2, max_size=3).map(lambda c: t.join(*c)),
        st.tuples(child, st.sampled_from(["x", "y"])).map(lambda p: t.as_node(p[0]).named(p[1])),
        st.tuples(child, st.booleans()).map(lambda p: t.loop(t.seq(p[0], t.brk()) if p[1] else p[0])),
        st.tuples(child, child).map(lambda p: t.as_node(p[0]) >> p[1]),
        st.tuples(child, child).map(lambda p: p[0] & t.as_node(p[1])),
        st.tuples(child, child).map(lambda p: t.as_node(p[0]) | p[1]),
        st.lists(child, max_size=3).map(lambda c: t.seq(*c)),
        st.lists(child, max_size=3).map(lambda c: t.join(*c)),
        st.lists(child, max_size=3).map(lambda c: t.race(*c)),
        st.tuples(child, NAMES).map(lambda p: t.as_node(p[0]).named(p[1])),
        st.tuples(child, child, st.one_of(st.none(), child)).map(lambda p: t.if_(*p)),
        st.tuples(child, st.one_of(st.none(), child)).map(lambda p: t.loop(p[0], while_=p[1])),
        st.tuples(child).map(lambda p: t.brk(p[0])),
        st.tuples(child, LEAF_OPTIONS).map(lambda p: t.as_node(p[0]).options(**p[1])),
        _raw_nodes(child),
    )


trees = st.recursive(_leaf_builders(), _composites, max_leaves=6)
junk_top_level = st.one_of(JSONISH.map(t.Node), _raw_nodes(st.deferred(lambda: trees)))
any_tree = st.one_of(trees.map(t.as_node), trees.map(t.as_node), trees.map(t.as_node), junk_top_level)


COMPOSITES = ("seq", "join", "race", "name", "if", "loop", "break")


def _walk(node, path="r"):
    """Every (path, node) the coordinator can reach: it descends into the children of composite nodes."""
    yield path, node
    if isinstance(node, dict) and node.get("t") in COMPOSITES and isinstance(node.get("c"), list):
        for index, child in enumerate(node["c"]):
            yield from _walk(child, f"{path}.{index}")


def check_runnable(shape):
    """What the validator accepted, the coordinator and the workers must be able to run: the checks below
    mirror what they do with each node (a failure here is a crash or a stuck instance waiting to happen)."""
    assert set(shape) >= {"name", "tree", "steps"}, shape
    parsed = FlowShape.from_json("prop", "0" * 16, None, shape)
    now = datetime.now(UTC)
    for path, node in _walk(shape["tree"]):
        assert isinstance(node, dict) and node.get("t") in NODE_TYPES, f"the coordinator would evaluate {node!r}"
        if node["t"] in COMPOSITES:
            assert isinstance(node.get("c"), list), f"{path}: the coordinator indexes node['c'] of {node}"
        if node["t"] in ("sql", "python", "http"):
            assert path in parsed.steps, f"leaf {path} has no step"
    for step in shape["steps"]:
        where = f"leaf {step['name']} {step['spec']}"
        assert isinstance(step["max_attempts"], int) and step["max_attempts"] >= 1, where
        assert step["timeout"] is None or (isinstance(step["timeout"], int | float) and step["timeout"] > 0), where
        for key in ("backoff_base", "backoff_cap"):
            assert isinstance(step[key], int | float) and math.isfinite(step[key]) and step[key] >= 0, where
        assert isinstance(step["queue"], str) and QUEUE.match(step["queue"]), where
        spec = step["spec"]
        if spec["t"] == "sql":
            assert isinstance(spec["sql"], str) and spec["sql"].strip(), f"{where}: SQL must be text"
        elif spec["t"] == "python":
            assert isinstance(spec["fn"], str), where
        else:
            assert isinstance(spec.get("url"), str), where
            assert spec.get("method", "GET") in HTTP_METHODS, f"{where}: HTTP method"
    for _, node in _walk(shape["tree"]):
        kind, where = node["t"], f"node {node}"
        if kind == "sleep":
            _assert_due(now, node["seconds"], where)
        elif kind == "wait_signal":
            assert node.get("timeout") is None or isinstance(node["timeout"], int | float), f"{where}: timeout"
            if node.get("timeout") is not None:
                _assert_due(now, node["timeout"], where)
        elif kind == "schedule":
            with contextlib.suppress(ValueError):  # the coordinator fails the instance with the message: clean
                next_fire(node["cron"], now)
        elif kind == "loop":
            assert len(node["c"]) == (2 if node.get("while") else 1), f"{where}: Python reads 'while' differently"
        elif kind == "name":
            assert isinstance(node["name"], str), where


def _assert_due(now, seconds, where):
    """The coordinator computes now + timedelta(seconds=...): that must be a time it can represent."""
    assert isinstance(seconds, int | float) and not isinstance(seconds, bool), f"{where}: not a number"
    try:
        now + timedelta(seconds=seconds)
    except (OverflowError, ValueError) as exc:
        raise AssertionError(f"{where}: the coordinator cannot compute the due time ({exc})") from None


def _brief(exc):
    return (exc.diag.message_primary or str(exc))[:300]


def _validate(conn, data):
    """pgflow.tree_shape of a node's JSON: the shape, or None when refused cleanly."""
    text = json.dumps(data)
    try:
        with conn.transaction():
            return conn.execute("SELECT pgflow.tree_shape(%s::jsonb)", (text,)).fetchone()[0]
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        assert exc.sqlstate in PGFLOW_SQLSTATES, f"SQLSTATE {exc.sqlstate} ({type(exc).__name__}): {_brief(exc)}"
        message = exc.diag.message_primary or ""
        assert message.startswith("pgflow:") and len(message) > len("pgflow: "), message
        return None


@pytest.fixture
def validator(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        configure(conn)  # jsonb read as the engine reads it (orjson)
        conn.execute("SET statement_timeout = '10s'")
        conn.execute("CREATE TABLE canary (v int)")
        yield conn
        assert conn.execute("SELECT to_regclass('canary') IS NOT NULL").fetchone()[0], "the canary table is gone"


@settings(max_examples=300, **BASE)
@given(node=any_tree)
def test_random_trees_are_accepted_and_runnable_or_refused_cleanly(validator, node):
    note(json.dumps(node.data))
    shape = _validate(validator, node.data)
    # the Python front door says the same, with FlowDefinitionError (nothing is committed: rolled back)
    with validator.transaction(force_rollback=True):
        try:
            register_tree(validator, node, "prop")
            python_accepts = True
        except FlowDefinitionError as exc:
            assert str(exc).strip()
            python_accepts = False
    assert python_accepts == (shape is not None)
    event("accepted" if shape is not None else "refused")
    if shape is not None:
        check_runnable(shape)


_SQL1 = {"t": "sql", "sql": "SELECT 1 AS n"}
KNOWN_TREES = {
    # minimal cases found by the property above, each reported on its own
    "max_attempts_1.5": {**_SQL1, "max_attempts": 1.5},  # 22P02 from a cast in pgflow._leaves
    "max_attempts_1e10": {**_SQL1, "max_attempts": 1e10},  # 22003
    "backoff_base_text": {**_SQL1, "backoff_base": "abc"},  # 22P02
    "timeout_false": {**_SQL1, "timeout": False},  # 22P02
    "timeout_negative": {**_SQL1, "timeout": -5},  # accepted
    "loop_while_abc": {"t": "loop", "while": "abc", "c": [_SQL1]},  # 22P02
    "loop_while_false_text": {"t": "loop", "while": "false", "c": [_SQL1]},  # accepted; Python reads it as true
    "cron_huge_number": {"t": "schedule", "cron": "99999999999 * * * *"},  # 22003 in pgflow.valid_cron
    "sleep_1e12": {"t": "sleep", "seconds": 1e12},  # accepted; past datetime.max for the coordinator
    "sleep_1e300": {"t": "sleep", "seconds": 1e300},  # accepted; timedelta overflow in the coordinator
    "signal_timeout_text": {"t": "wait_signal", "name": "go", "timeout": "soon"},  # accepted; str / float
    "sql_as_number": {"t": "sql", "sql": 5},  # accepted; the coordinator's _describe splits it
    "break_with_junk_children": {"t": "loop", "c": [{"t": "break", "c": [5, 6]}]},  # children never validated
    "http_method_null": {"t": "http", "url": "http://127.0.0.1:9/x", "method": None},  # the worker calls .upper()
}


@pytest.mark.parametrize("data", list(KNOWN_TREES.values()), ids=list(KNOWN_TREES))
def test_known_trees_are_refused_cleanly_or_runnable(validator, data):
    shape = _validate(validator, data)
    if shape is not None:
        check_runnable(shape)


def test_a_very_deep_tree_is_refused_with_a_pgflow_error(validator):
    """Depth is bounded in the properties above; past a few hundred levels the validator's recursion hits
    PostgreSQL's stack limit (SQLSTATE 54001) instead of saying the tree is too deep."""
    text = '{"t": "seq", "c": [' * 600 + '{"t": "sql", "sql": "SELECT 1"}' + "]}" * 600
    with pytest.raises(psycopg.Error) as raised:
        validator.execute("SELECT pgflow.tree_shape(%s::jsonb)", (text,))
    assert raised.value.sqlstate in PGFLOW_SQLSTATES, f"SQLSTATE {raised.value.sqlstate}: {_brief(raised.value)}"
    assert validator.execute("SELECT 1").fetchone() == (1,)


# ============================================================================================ (c) SQL text

def quote(text):
    return "'" + text.replace("'", "''") + "'"


def dollar(text):
    return f"$q${text}$q$" if "$q$" not in text and not text.endswith("$") else quote(text)


def e_string(text):
    return "E" + quote(text.replace("\\", "\\\\"))


literal_texts = st.one_of(
    st.sampled_from(["SELECT 1", "SELECT 'a''b' AS q", "'; DROP TABLE canary; --", "SELECT $input", "SELECT $x",
                     "SELECT $$ $x $$", "$$", "SELECT 100%", "", "   ", "{", '{"t": "bogus"}',
                     '{"t":"sql","sql":"SELECT 1"}', '{"t": "seq", "c": []}', "SELECT $1", "\\", "SELECT E'\\''",
                     '"SELECT 1"', "[1, 2]", '{"t": "sleep", "seconds": 1e300}', "%s %(x)s"]),
    TEXT,
)
string_literals = st.one_of(literal_texts.map(quote), literal_texts.map(dollar), literal_texts.map(e_string))
number_literals = st.one_of(
    st.sampled_from(["0", "1", "-1", "0.5", "1e6", "1e300", "'NaN'", "'Infinity'", "'-Infinity'", "NULL"]),
    st.floats(-1e6, 1e6).map(repr),
)
cron_literals = CRONS.map(quote)
name_literals = NAMES.map(quote)
OPERATORS = ["~>", "|=>", "&", "|", "?>", "!>"]
JUNK = ["(", ")", "~>", "'unterminated", "$$", ";", "-- comment", ",", "@>"]


def _sql_leaves():
    return st.one_of(
        string_literals,
        number_literals.map(lambda n: f"pgflow.sleep({n})"),
        cron_literals.map(lambda c: f"pgflow.wait_for_schedule({c})"),
        st.tuples(name_literals, st.one_of(st.none(), number_literals)).map(
            lambda p: f"pgflow.wait_for_signal({p[0]})" if p[1] is None else f"pgflow.wait_for_signal({p[0]}, {p[1]})"),
        name_literals.map(lambda n: f"pgflow.has_rows({n})"),
        literal_texts.map(lambda s: f"pgflow.python({quote(s)})"),
        st.tuples(literal_texts, st.sampled_from(["'GET'", "'post'", "'BREW'", "NULL"])).map(
            lambda p: f"pgflow.http({quote(p[0])}, {p[1]})"),
        st.just("pgflow.break_loop()"),
        st.just("NULL"),
    )


def _sql_composites(child):
    return st.one_of(
        st.tuples(child, st.sampled_from(OPERATORS), child, st.booleans()).map(
            lambda p: f"({p[0]} {p[1]} {p[2]})" if p[3] else f"{p[0]} {p[1]} {p[2]}"),
        child.map(lambda c: f"(@> {c})"),
        st.tuples(child, name_literals).map(lambda p: f"({p[0]} |=> {p[1]})"),
        st.tuples(st.sampled_from(["seq", "join", "race"]), st.lists(child, min_size=1, max_size=3)).map(
            lambda p: f"pgflow.{p[0]}({', '.join(p[1])})"),
        st.tuples(child, child, st.one_of(st.none(), child)).map(
            lambda p: f"pgflow.if_then({p[0]}, {p[1]}" + ("" if p[2] is None else f", {p[2]}") + ")"),
        child.map(lambda c: f"pgflow.loop({c})"),
        st.tuples(child, child).map(lambda p: f"pgflow.loop_while({p[0]}, {p[1]})"),
        child.map(lambda c: f"pgflow.break_loop({c})"),
        child.map(lambda c: f"pgflow.sql({c})"),
        st.tuples(child, st.sampled_from(['{"max_attempts": 2}', '{"max_attempts": 1.5}', '{"timeout": -1}',
                                          '{"queue": "Bad"}', '{"backoff_base": "x"}', "[1]", "{}"])).map(
            lambda p: f"pgflow.with_options({p[0]}, {quote(p[1])})"),
    )


_well_formed = st.recursive(_sql_leaves(), _sql_composites, max_leaves=6)
sql_expressions = st.one_of(
    _sql_leaves(), _well_formed, _well_formed, _well_formed,  # mostly well-formed SQL, some with a junk token
    st.tuples(_well_formed, st.sampled_from(JUNK), st.booleans()).map(
        lambda p: f"{p[1]} {p[0]}" if p[2] else f"{p[0]} {p[1]}"),
)


@settings(max_examples=300, **BASE)
@given(expr=sql_expressions)
def test_random_sql_expressions_give_a_shape_or_a_clean_error(validator, expr):
    note(expr)
    event(check_expression(validator, expr))


KNOWN_EXPRESSIONS = {
    "signal_timeout_nan": "pgflow.wait_for_signal('go', 'NaN')",  # accepted; the timeout is the string "NaN"
    "signal_timeout_infinity": "'SELECT 1' ~> pgflow.wait_for_signal('go', 'Infinity')",
    "cron_huge_number": "pgflow.wait_for_schedule('1-99999999999 * * * *')",  # 22003
    "http_method_null": "pgflow.http('http://127.0.0.1:9/x', NULL)",
    "options_max_attempts_1.5": "pgflow.with_options('SELECT 1', '{\"max_attempts\": 1.5}')",  # 22P02
}


@pytest.mark.parametrize("expr", list(KNOWN_EXPRESSIONS.values()), ids=list(KNOWN_EXPRESSIONS))
def test_known_sql_expressions(validator, expr):
    check_expression(validator, expr)


def check_expression(conn, expr):
    """``SELECT pgflow.tree_shape(<expr>)``: a runnable shape, a parser error or a clean pgflow error; the
    server keeps answering. Returns the outcome (for hypothesis' statistics)."""
    shape, outcome = None, "accepted"
    try:
        with conn.transaction(force_rollback=True):
            shape = conn.execute(f"SELECT pgflow.tree_shape({expr})").fetchone()[0]
    except psycopg.OperationalError as exc:
        raise AssertionError(f"the connection died: {exc}") from None
    except psycopg.Error as exc:
        state, message = exc.sqlstate, exc.diag.message_primary or ""
        outcome = f"refused: SQLSTATE {state}"
        if state not in PARSER_SQLSTATES:
            assert state in (*PGFLOW_SQLSTATES, "P0001"), f"SQLSTATE {state} ({type(exc).__name__}): {_brief(exc)}"
            assert message.startswith("pgflow:") and len(message) > len("pgflow: "), message
    assert conn.execute("SELECT 1").fetchone() == (1,), "the server stopped answering"
    if shape is not None:
        check_runnable(shape)
    return outcome


# ============================================================================================ (d) end to end

@pytest.fixture
def e2e(dsn, engine_factory):
    """Coordinator (timers 60x faster) and a worker that can import support.poison_flows."""
    engine = engine_factory(PGFLOW_TIME_SCALE="60", PGFLOW_LOG_LEVEL="ERROR")
    engine.coordinator()
    engine.worker("--import", "support.poison_flows", concurrency=2)
    return engine


def _alive(engine):
    dead = [(p.args[3], p.returncode) for p in engine.procs if p.poll() is not None]
    assert not dead, f"engine processes died: {dead}"


def _settled(dsn, engine, iid, timeout=90.0):
    """Wait for a terminal state, then for the queue to hold no live message and the instance no open step."""
    def finished():
        _alive(engine)
        return (st := pgflow.status(iid, dsn=dsn)).finished and st

    st_ = wait_until(finished, timeout, f"instance {iid} to finish", interval=0.1,
                     detail=lambda: pgflow.explain(iid, dsn=dsn))
    assert st_.status in ("completed", "failed"), st_.status
    if st_.status == "failed":
        assert st_.error and st_.error.strip(), "failed without a stated error"
    with psycopg.connect(dsn, autocommit=True) as conn:
        def live():
            queued = conn.execute("SELECT count(*) FROM pgmq.q_pgflow").fetchone()[0]
            open_steps = conn.execute(
                "SELECT step_name, task_index, status FROM pgflow.steps WHERE instance_id = %s"
                " AND status IN ('queued', 'running', 'retrying')", (iid,)).fetchall()
            return {"live messages": queued, "open steps": open_steps}

        wait_until(lambda: live() == {"live messages": 0, "open steps": []}, 30,
                   f"no live message and no open step of the {st_.status} instance {iid}", interval=0.1,
                   detail=lambda: str(live()))
    _alive(engine)
    return st_


@st.composite
def runnable_trees(draw, depth=0, names=(), in_loop=False):
    """Well-formed trees that terminate: waits have timeouts, loops end with a break or a false condition,
    failing leaves retry quickly. Some of them fail, on purpose."""
    quick = {"max_attempts": draw(st.integers(1, 2)), "backoff_base": 0.05, "backoff_cap": 0.1}
    leaf_kinds = ["sql", "sql_ref", "sql_fail", "python", "python_fail", "sleep", "schedule", "signal"]
    kinds = leaf_kinds + (["break"] if in_loop else []) + (
        ["seq", "join", "race", "if", "named", "loop", "loop_while"] if depth < 3 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "sql":
        return t.sql(draw(st.sampled_from(["SELECT 1 AS n", "SELECT n FROM generate_series(1, 3) AS n",
                                           "SELECT $input AS v", "SELECT 'it''s' AS s WHERE false"]))).options(**quick)
    if kind == "sql_ref":
        name = draw(st.sampled_from(names)) if names else "nobody"
        return t.sql(f"SELECT coalesce(($input.k?)::int, 0) + coalesce(length(${name}?::text), 0) AS n"
                     if names else "SELECT $vars.k? AS v").options(**quick)
    if kind == "sql_fail":
        return t.sql("SELECT 1 / 0 AS n").options(**quick)
    if kind == "python":
        fn = draw(st.sampled_from(["support.poison_flows:echo", "support.poison_flows:attempt"]))
        return t.python(fn).options(**quick)
    if kind == "python_fail":
        return t.python("support.poison_flows:fail").options(**quick)
    if kind == "sleep":
        return t.sleep(draw(st.sampled_from([0, 1, 15, 30])))  # at 60x: at most half a second
    if kind == "schedule":
        return t.wait_for_schedule("* * * * *")  # the next minute: at most a second at 60x
    if kind == "signal":
        return t.wait_for_signal(draw(st.sampled_from(["go", "stop"])), timeout=draw(st.sampled_from([0, 5, 30])))
    if kind == "break":
        return t.brk(draw(st.one_of(st.none(), st.just("SELECT 'left' AS why"))))

    def sub():
        return runnable_trees(depth + 1, names, in_loop)
    if kind in ("seq", "join", "race"):
        children = draw(st.lists(sub(), min_size=2 if kind != "seq" else 1, max_size=3))
        return {"seq": t.seq, "join": t.join, "race": t.race}[kind](*children)
    if kind == "if":
        cond = t.has_rows(draw(st.sampled_from(names))) if names and draw(st.booleans()) else draw(
            st.sampled_from(["SELECT true", "SELECT false", "SELECT count(*) > 1 FROM generate_series(1, 2)"]))
        return t.if_(cond, draw(sub()), draw(st.one_of(st.none(), sub())))
    if kind == "named":
        name = draw(st.sampled_from(["x", "y", "z"]))
        named = draw(sub()).named(name)
        follow = draw(runnable_trees(depth + 1, (*names, name), in_loop))
        return named >> follow
    if kind == "loop":
        body = draw(runnable_trees(depth + 1, names, True))
        return t.loop(t.seq(body, t.brk("SELECT 'done' AS how")))
    return t.loop(draw(runnable_trees(depth + 1, names, True)), while_="SELECT false")


@settings(max_examples=25, phases=NO_SHRINK, **BASE)
@given(node=runnable_trees())
def test_random_trees_run_to_a_terminal_state(dsn, e2e, node):
    note(json.dumps(node.data))
    iid = pgflow.start(node, {"k": 2}, dsn=dsn)
    event(_settled(dsn, e2e, iid).status)


@settings(max_examples=8, phases=NO_SHRINK, **BASE)
@given(node=st.one_of(trees.map(t.as_node), _raw_nodes(st.deferred(lambda: trees))))
def test_accepted_junk_trees_never_take_the_coordinator_down(dsn, e2e, node):
    """Raw trees the validator accepts (odd option values included) may fail or wait forever, but the
    coordinator and workers must survive them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("SELECT pgflow.tree_shape(%s::jsonb)", (json.dumps(node.data),))
        except psycopg.Error:
            assume(False)  # refused (cleanly or not: test_random_trees_... judges that)
    note(json.dumps(node.data))
    iid = pgflow.start(node, {"k": 2}, dsn=dsn)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not pgflow.status(iid, dsn=dsn).finished:
        _alive(e2e)
        time.sleep(0.1)
    _alive(e2e)
    pgflow.cancel(iid, "example over", dsn=dsn)


@st.composite
def sql_dags(draw):
    """SQL-only DAG flows (workers need no code for them) over input [{"n": 1}, {"n": 2}]: sum steps, series
    steps, maps over earlier steps or the input (optionally flattened), and a few failing steps."""
    steps = []
    for i in range(draw(st.integers(1, 6))):
        earlier = [s["name"] for s in steps]
        kind = draw(st.sampled_from(["sum", "series", "map", "fail"] if earlier else ["sum", "series", "map"]))
        deps = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=2)) if earlier else []
        step = {"name": f"s{i}", "kind": kind, "deps": deps, "k": draw(st.integers(0, 3))}
        if kind == "map":
            step["over"] = draw(st.sampled_from([*earlier, INPUT]))
            step["flatten"] = False  # refused over a SQL map: see test_flatten_over_a_sql_map_is_accepted
        steps.append(step)
    return steps


def _dag_flow(name, steps):
    flow = Flow(name, max_attempts=2, backoff_base=0.05, backoff_cap=0.1)
    for s in steps:
        if s["kind"] == "sum":
            terms = " + ".join(f"coalesce((${d}.n?)::int, 0)" for d in s["deps"]) or "0"
            flow.sql(s["name"], f"SELECT {terms} + 1 AS n", after=s["deps"])
        elif s["kind"] == "series":
            flow.sql(s["name"], f"SELECT n FROM generate_series(1, {s['k']}) AS n", after=s["deps"])
        elif s["kind"] == "fail":
            flow.sql(s["name"], "SELECT 1 / 0 AS n", after=s["deps"])
        else:
            flow.sql(s["name"], "SELECT coalesce(($item.n?)::int, 0) * 2 AS n", over=s["over"], after=s["deps"],
                     flatten=s["flatten"])
    return flow


def _model(steps, input_):
    """The expected output of every step (None when the instance is expected to fail)."""
    if any(s["kind"] == "fail" for s in steps):
        return None

    def first_n(value):  # $name.n? of a value: the n of its first element (one level of list)
        if isinstance(value, list):
            if not value:
                return None
            value = value[0]
        return value.get("n") if isinstance(value, dict) else None

    out = {}
    for s in steps:
        if s["kind"] == "sum":
            out[s["name"]] = [{"n": sum(first_n(out[d]) or 0 for d in s["deps"]) + 1}]
        elif s["kind"] == "series":
            out[s["name"]] = [{"n": n} for n in range(1, s["k"] + 1)]
        else:
            items = input_ if s["over"] == INPUT else out[s["over"]]
            if s["flatten"]:
                items = [x for inner in items for x in inner]
            out[s["name"]] = [[{"n": (first_n(item) or 0) * 2}] for item in items]
    return out


@settings(max_examples=15, phases=NO_SHRINK, **BASE)
@given(steps=sql_dags())
def test_random_sql_dags_run_to_the_modelled_result(dsn, e2e, steps):
    note(repr(steps))
    flow = _dag_flow(f"prop_dag_{abs(hash(repr(steps))) % 10 ** 8}", steps)
    input_ = [{"n": 1}, {"n": 2}]
    iid = pgflow.start(flow, input_, dsn=dsn)
    status = _settled(dsn, e2e, iid)
    expected = _model(steps, input_)
    event(status.status)
    if expected is None:
        assert status.status == "failed" and "division by zero" in status.error, (status.status, status.error)
        return
    assert status.status == "completed", status.error
    with psycopg.connect(dsn) as conn:
        got = dict(conn.execute("SELECT step_name, output FROM pgflow.steps WHERE instance_id = %s AND task_index = -1",
                                (iid,)).fetchall())
    assert got == expected
    terminal = [s["name"] for s in steps if not any(s["name"] in (o["deps"] + [o.get("over")]) for o in steps)]
    assert status.output == (expected[terminal[0]] if len(terminal) == 1 else {n: expected[n] for n in terminal})


# ---------------------------------------------------------------------------------------------- (e) messages
# A worker reads and claims a batch in one statement (pgflow.read_tasks): the database claims exactly the
# messages pgflow.is_task_message accepts, and the worker runs exactly those pgflow.engine.messages.decode accepts.
# If the two disagreed, a claimed task could be dead-lettered (its instance stuck) or a poison message run.

_JSON_SCALARS = st.one_of(st.none(), st.booleans(), TEXT, st.floats(allow_nan=False, allow_infinity=False),
                          st.integers(min_value=-(2**70), max_value=2**70),
                          st.sampled_from([0, -1, -2, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 1.0, -1.0]))
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6)
_FIELD = st.one_of(_JSON_SCALARS, st.just({}), st.just({"a": 1}))
_BOUNDS = st.sampled_from([0, -1, -2, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 1.0, -1.0, True, "1"])
_valid = st.fixed_dictionaries(
    {"flow": TEXT, "version": TEXT, "step": TEXT, "instance": st.integers(1, 2**63 - 1),
     "task": st.integers(-1, 2**31 - 1)},
    optional={"item": _JSON, "scope": st.one_of(st.none(), st.just({"a": 1})),
              "columns": st.one_of(st.none(), st.just({}))})


@st.composite
def _one_field_off(draw):
    """A well-formed message with one field replaced by something else, or removed."""
    message = draw(_valid)
    key = draw(st.sampled_from(["flow", "version", "step", "instance", "task", "scope", "columns"]))
    if draw(st.booleans()) and key in message:
        del message[key]
    else:
        message[key] = draw(st.one_of(_BOUNDS, _FIELD))
    return message


messages = st.one_of(_JSON, _valid, _one_field_off())


_EDGE = {"flow": "flow", "version": "1", "step": "step", "instance": 1, "task": -1}


@settings(max_examples=500, **BASE)
@given(message=messages)
@example(message={**_EDGE, "task": 2**31 - 1})
@example(message={**_EDGE, "task": 2**31})
@example(message={**_EDGE, "task": -2})
@example(message={**_EDGE, "instance": 2**63 - 1})
@example(message={**_EDGE, "instance": 2**63})
@example(message={**_EDGE, "instance": 0})
@example(message={**_EDGE, "instance": 1.0})
@example(message={**_EDGE, "task": True})
@example(message={**_EDGE, "instance": "1"})
@example(message={**_EDGE, "scope": []})
@example(message={**_EDGE, "columns": "x"})
@example(message={**_EDGE, "scope": None, "columns": {}})
def test_the_database_and_the_worker_agree_on_what_a_task_message_is(validator, message):
    from pgflow.engine.messages import decode

    text = json.dumps(message)  # not orjson: a message written in SQL may hold numbers beyond 64 bits
    stored = validator.execute("SELECT %s::jsonb", (text,)).fetchone()[0]  # as a worker reads it
    in_sql = validator.execute("SELECT pgflow.is_task_message(%s::jsonb)", (text,)).fetchone()[0]
    event(f"task message: {in_sql}")
    assert in_sql == (decode(stored) is not None), stored
