"""The engine's decisions without a database or processes: the coordinator's DAG scheduling, the tree
evaluator (a state in, decisions out), task messages, settings; and the layout rules the code keeps (no SQL
text in Python modules, every named query defined and used, the worker importing neither the coordinator
nor the client)."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgflow import settings
from pgflow import tree as t
from pgflow.db.queries import named_blocks, query_files
from pgflow.engine import coordinator as c
from pgflow.engine import tree as ev
from pgflow.engine.messages import decode, task_message
from pgflow.engine.worker import ReadSizes
from pgflow.flow import Flow
from pgflow.shape import FlowShape, StepShape
from pgflow.statuses import StepStatus

SRC = Path(__file__).resolve().parents[2] / "src" / "pgflow"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------- DAG decisions

def dag(flow: Flow) -> c.DagInstance:
    return c.DagInstance(1, FlowShape.from_json(flow.name, flow.version, None, flow.shape), {"n": 1}, None)


def diamond() -> Flow:
    flow = Flow("unit_diamond")
    top = flow.sql("top", "SELECT 1")
    left = flow.sql("left", "SELECT 2", after=[top])
    right = flow.sql("right", "SELECT 3", after=[top])
    flow.sql("bottom", "SELECT 4", after=[left, right])
    return flow


def test_a_step_is_ready_once_all_its_dependencies_completed():
    inst = dag(diamond())
    assert [s.name for s in c.ready_steps(inst)] == ["top"]
    inst.states["top"] = StepStatus.COMPLETED
    assert [s.name for s in c.ready_steps(inst)] == ["left", "right"]
    inst.states.update(left=StepStatus.COMPLETED, right=StepStatus.RUNNING)
    assert c.ready_steps(inst) == []  # bottom waits for right; top and left have rows already
    inst.states["right"] = "completed"  # as read from the database: plain text
    assert [s.name for s in c.ready_steps(inst)] == ["bottom"]
    assert not c.is_complete(inst)
    inst.states["bottom"] = StepStatus.COMPLETED
    assert c.is_complete(inst)
    assert c.completion(inst) == {"id": 1, "terminal": ["bottom"], "single": True}


def test_several_terminal_steps_give_an_object():
    flow = Flow("unit_two_ends")
    flow.sql("a", "SELECT 1")
    flow.sql("b", "SELECT 2")
    assert c.completion(dag(flow)) == {"id": 1, "terminal": ["a", "b"], "single": False}


def test_map_elements_are_a_list_or_a_clear_failure():
    step = StepShape("square", "python", ("numbers",), "numbers", False, "pgflow", 3, 1.0, 60.0, None, None)
    assert c.map_elements(step, [1, 2]) == ([1, 2], None)
    assert c.map_elements(step, {"a": 1}) == ([], "step square maps over step numbers's output, which is dict, "
                                                   "not a list")
    flat = StepShape("embed", "python", ("chunk",), "chunk", True, "pgflow", 3, 1.0, 60.0, None, None)
    assert c.map_elements(flat, [[1], [], [2, 3]]) == ([1, 2, 3], None)
    assert c.map_elements(flat, [[1], 2])[1] == "step embed flattens step chunk's output, which is not a list of lists"
    over_input = StepShape("each", "sql", (), "input", False, "pgflow", 3, 1.0, 60.0, None, "SELECT $item")
    assert "maps over the flow input, which is str" in c.map_elements(over_input, "x")[1]


def test_the_first_failure_of_an_instance_is_its_error():
    rows = [(1, "a", "completed", None), (1, "b", "failed", "boom"), (1, "c", "failed", "later"),
            (2, "a", "running", None)]
    assert c.step_failures(rows) == {1: "step b failed: boom"}
    failures, finished = c.map_outcomes([(1, "m", 3, "m[2]: bad"), (2, "m", 0, None), (3, "m", 1, None)])
    assert failures == {1: "step m[2]: bad"} and finished == [(2, "m")]


def test_a_map_has_a_task_per_element_or_per_slice_indexed_by_its_first_element():
    step = StepShape("square", "python", ("numbers",), "numbers", False, "pgflow", 3, 1.0, 60.0, None, None)
    assert c.map_tasks(step, ["a", "b", "c"]) == [(0, "a"), (1, "b"), (2, "c")]
    batched = StepShape("embed", "python", ("chunk",), "chunk", True, "pgflow", 3, 1.0, 60.0, None, None,
                        batch_size=3)
    assert c.map_tasks(batched, list(range(7))) == [(0, [0, 1, 2]), (3, [3, 4, 5]), (6, [6])]
    assert c.map_tasks(batched, [1, 2]) == [(0, [1, 2])]
    assert c.map_tasks(batched, []) == [] == c.map_tasks(step, [])


def test_map_quotas_count_the_maps_admitted_in_one_fan_out():
    """The queue-depth quota counts tasks (a batched map's slices), including the maps of the same owner
    admitted earlier in the batch; the width quota counts elements."""
    quota = c.MapQuotas(width=10, depth=8, queued=3)
    assert quota.admit("bob", "m", 4, 4) is None and quota.queued == 7
    refused = quota.admit("bob", "m", 4, 2)
    assert "would queue 2 tasks while role bob has 7 on queues" in refused and "quota of 8" in refused
    assert quota.admit("bob", "m", 10, 1) is None and quota.queued == 8  # 10 elements in one batched task
    assert "maps over 11 elements" in quota.admit("bob", "m", 11, 1)
    assert c.MapQuotas(None, None, 0).admit("owner", "m", 10**6, 10**6) is None


def test_a_fresh_count_keeps_the_maps_admitted_in_the_same_fan_out():
    quota = c.MapQuotas(width=None, depth=10, queued=9, counted_at=1.0)  # a reused, older count
    assert quota.admit("bob", "m", 1, 1) is None
    assert quota.admit("bob", "m", 3, 3) is not None  # 10 + 3 by the old count
    quota.recount(2, 5.0)  # the queues drained meanwhile: 2 on them now, plus the map admitted above
    assert (quota.queued, quota.counted_at) == (3, 5.0)
    assert quota.admit("bob", "m", 3, 3) is None and quota.queued == 6


def test_queued_counts_are_reused_only_while_recent():
    counts = c.QueuedCounts(ttl=2.0)
    assert counts.reusable("bob", 100.0) is None
    counts.keep("bob", c.MapQuotas(width=None, depth=10, queued=7, counted_at=100.0))
    assert counts.reusable("bob", 101.9) == (7, 100.0)
    assert counts.reusable("bob", 102.0) is None and counts.reusable("alice", 101.0) is None


def test_an_instance_is_complete_only_when_every_step_completed():
    inst = dag(diamond())
    inst.states.update({"top": StepStatus.COMPLETED, "left": StepStatus.COMPLETED, "right": StepStatus.COMPLETED,
                        "bottom": StepStatus.RUNNING})
    assert not c.is_complete(inst) and c.ready_steps(inst) == []
    inst.states["bottom"] = StepStatus.FAILED
    assert not c.is_complete(inst)
    inst.states["bottom"] = StepStatus.COMPLETED
    assert c.is_complete(inst)


# ---------------------------------------------------------------------------------------------- tree evaluator

def state(node: t.Node, rows: dict | None = None, signals: list | None = None, now: datetime = NOW,
          named: str = "unit") -> tuple[ev.TreeState, dict]:
    """A tree's evaluator state, with leaf shapes as the database's tree_shape would list them."""
    leaves, stack = {}, [("r", node.data)]
    while stack:
        path, n = stack.pop()
        if n["t"] in t.LEAVES:
            leaves[path] = StepShape(path, n["t"], (), None, False, "pgflow", 3, 1.0, 60.0, None, n.get("sql"), n)
        stack += [(f"{path}.{i}", child) for i, child in enumerate(n.get("c", []))]
    return ev.TreeState(7, named, "v1", {"order": 3}, {}, leaves, now, dict(rows or {}), list(signals or [])), node.data


def of(kind: type, decisions: list) -> list:
    return [d for d in decisions if isinstance(d, kind)]


def test_a_sequence_queues_its_first_leaf_then_the_next_with_the_named_result_in_scope():
    node = t.sql("SELECT 1 AS a").named("first") >> "SELECT $first"
    first = ev.evaluate(*state(node))
    assert first.result.status == "running"
    [queued] = of(ev.Enqueue, first.decisions)
    assert queued.step == "r.0.0" and queued.message["scope"] == {"input": {"order": 3}, "vars": {}}
    assert decode(queued.message).instance_id == 7
    done = ev.Row(StepStatus.COMPLETED, [{"a": 1}], [["a", "integer"]], finished_at=NOW)
    second = ev.evaluate(*state(node, {"r.0.0": done}))
    [queued] = of(ev.Enqueue, second.decisions)
    assert queued.step == "r.1"
    assert queued.message["scope"]["first"] == [{"a": 1}] and queued.message["columns"] == {"first": [["a", "integer"]]}
    last = ev.evaluate(*state(node, {"r.0.0": done, "r.1": ev.Row(StepStatus.COMPLETED, [{"a": 1}])}))
    assert last.result.done and last.result.output == [{"a": 1}] and of(ev.Enqueue, last.decisions) == []


def test_a_failed_leaf_fails_the_tree_with_its_error():
    node = t.sql("SELECT 1") >> "SELECT 2"
    result = ev.evaluate(*state(node, {"r.0": ev.Row(StepStatus.FAILED, error="division by zero")})).result
    assert result.status == "failed" and result.error == "step r.0 (sql: SELECT 1) failed: division by zero"


def test_the_first_branch_to_finish_wins_a_race_and_the_others_are_skipped():
    node = t.race(t.sql("SELECT 'slow'"), t.sql("SELECT 'fast'"))
    rows = {"r.0": ev.Row(StepStatus.RUNNING), "r.1": ev.Row(StepStatus.COMPLETED, [{"v": "fast"}], finished_at=NOW)}
    evaluation = ev.evaluate(*state(node, rows))
    assert evaluation.result.done and evaluation.result.output == [{"v": "fast"}]
    assert of(ev.SkipBranch, evaluation.decisions) == [ev.SkipBranch("r.0")]
    race_row = [w for w in of(ev.WriteRow, evaluation.decisions) if w.path == "r"][-1]
    assert race_row.status == StepStatus.COMPLETED and race_row.output == {"winner": 1, "value": [{"v": "fast"}]}


@pytest.mark.parametrize("value, branch, skipped", [([{"ok": 0}], "else", "r.1"), ([{"ok": 5}], "then", "r.2"),
                                                    ([], "else", "r.1"), ([{"a": 1, "b": 0}], "then", "r.2")])
def test_an_if_takes_one_branch_by_the_truth_of_its_condition(value, branch, skipped):
    node = t.if_(t.sql("SELECT x"), t.sql("SELECT 'yes'"), t.sql("SELECT 'no'"))
    evaluation = ev.evaluate(*state(node, {"r.0": ev.Row(StepStatus.COMPLETED, value)}))
    assert ev.WriteRow("r", StepStatus.RUNNING, {"branch": branch}, None, None) in evaluation.decisions
    assert of(ev.SkipBranch, evaluation.decisions) == [ev.SkipBranch(skipped)]
    [queued] = of(ev.Enqueue, evaluation.decisions)
    assert queued.step == ("r.1" if branch == "then" else "r.2")


def test_a_sleep_waits_until_it_is_due(monkeypatch):
    monkeypatch.setattr(settings, "_current", settings.Settings.from_env({"PGFLOW_TIME_SCALE": "60"}))
    node = t.sleep(600) >> "SELECT 1"
    first = ev.evaluate(*state(node))
    due = NOW + timedelta(seconds=10)  # 600 s at 60x
    assert first.result.status == "waiting"
    assert ev.WriteRow("r.0", StepStatus.WAITING, None, due, None) in first.decisions
    assert ev.Wake(due) in first.decisions and of(ev.Enqueue, first.decisions) == []
    waiting = {"r.0": ev.Row(StepStatus.WAITING, due=due)}
    assert of(ev.Enqueue, ev.evaluate(*state(node, waiting, now=due - timedelta(seconds=1))).decisions) == []
    fired = ev.evaluate(*state(node, waiting, now=due))
    assert ev.WriteRow("r.0", StepStatus.COMPLETED, {"slept": 600}, None, due) in fired.decisions
    assert [q.step for q in of(ev.Enqueue, fired.decisions)] == ["r.1"]


def test_a_signal_wait_takes_the_oldest_signal_of_its_name():
    node = t.wait_for_signal("go").named("decision") >> "SELECT $decision.v"
    signals = [ev.Signal(11, "other", {"v": 0}), ev.Signal(12, "go", {"v": 1}), ev.Signal(13, "go", {"v": 2})]
    evaluation = ev.evaluate(*state(node, signals=signals))
    assert of(ev.ConsumeSignal, evaluation.decisions) == [ev.ConsumeSignal(12, "r.0.0")]
    [queued] = of(ev.Enqueue, evaluation.decisions)
    assert queued.message["scope"]["decision"] == {"v": 1}
    nothing = ev.evaluate(*state(node, signals=signals[:1]))
    assert nothing.result.status == "waiting" and of(ev.ConsumeSignal, nothing.decisions) == []


def test_a_loop_forgets_a_finished_iteration_and_counts_it():
    node = t.loop(t.sql("SELECT 1"))
    began = NOW - timedelta(seconds=5)  # the iteration began long enough ago: the next one begins now
    evaluation = ev.evaluate(*state(node, {"r": ev.Row(StepStatus.RUNNING, {"iteration": 4, "last": None,
                                                                             "began": began.isoformat()}),
                                           "r.0": ev.Row(StepStatus.COMPLETED, [{"x": 1}])}))
    assert evaluation.result.status == "running"
    assert evaluation.decisions[:2] == [ev.ForgetIteration("r"),
                                        ev.WriteRow("r", StepStatus.RUNNING, {"iteration": 5, "last": [{"x": 1}],
                                                                              "began": NOW.isoformat()}, NOW, None)]
    assert ev.Wake(NOW) in evaluation.decisions


def test_loop_iterations_begin_at_least_the_minimum_interval_apart():
    node = t.loop(t.sql("SELECT 1"))
    began = NOW - timedelta(seconds=0.25)
    finished = ev.evaluate(*state(node, {"r": ev.Row(StepStatus.RUNNING, {"iteration": 1, "began": began.isoformat()}),
                                         "r.0": ev.Row(StepStatus.COMPLETED, [{"x": 1}])}))
    due = began + ev.scaled(ev.LOOP_MIN_INTERVAL)
    assert finished.result.status == "waiting" and ev.Wake(due) in finished.decisions
    assert not [d for d in finished.decisions if isinstance(d, ev.Enqueue)]  # the body is not queued yet
    early = ev.evaluate(*state(node, {"r": ev.Row(StepStatus.RUNNING, {"iteration": 2, "began": due.isoformat()},
                                                  due=due)}))
    assert early.result.status == "waiting" and early.decisions == []


def test_every_node_type_has_a_handler():
    """The builders' node types are exactly the leaves plus the dispatch table's keys."""
    built = {t.seq("SELECT 1", "SELECT 2"), t.join("SELECT 1", "SELECT 2"), t.race("SELECT 1", "SELECT 2"),
             t.if_("SELECT 1", "SELECT 2"), t.has_rows("x"), t.loop("SELECT 1"), t.brk(), t.sleep(1),
             t.wait_for_schedule("* * * * *"), t.wait_for_signal("s"), t.sql("SELECT 1").named("x"),
             t.sql("SELECT 1"), t.python("os:getcwd"), t.http("https://example.com")}
    assert {n.data["t"] for n in built} == set(ev.HANDLERS) | set(t.LEAVES)
    assert set(ev.HANDLERS) >= ev.RECORDS_ITSELF


# ---------------------------------------------------------------------------------------------- messages, settings

def test_task_messages_round_trip_and_refuse_malformed_bodies():
    body = task_message("f", "v1", 5, "square", 2, {"x": 1})
    assert body == {"flow": "f", "version": "v1", "instance": 5, "step": "square", "task": 2, "item": {"x": 1}}
    decoded = decode(body)
    assert (decoded.flow, decoded.instance_id, decoded.task_index, decoded.item) == ("f", 5, 2, {"x": 1})
    assert decode({**body, "instance": True}) is None
    assert decode({**body, "task": -2}) is None
    assert decode({**body, "scope": []}) is None
    assert decode({"f": "f", "v": "v1", "i": 5, "s": "square", "t": -1}) is None  # the old short keys


def test_settings_are_validated_with_the_variable_named():
    defaults = settings.Settings.from_env({})
    assert (defaults.dsn, defaults.max_payload_bytes, defaults.synchronous_commit, defaults.time_scale) == \
        (None, 16 * 1024 * 1024, "off", 1.0)
    assert settings.Settings.from_env({"PGFLOW_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert settings.Settings.from_env({"PGFLOW_HTTP_ALLOW": " a.com, 10.0.0.0/8 ,"}).http_allow == ("a.com",
                                                                                                   "10.0.0.0/8")
    for name, value in [("PGFLOW_TIME_SCALE", "0"), ("PGFLOW_TIME_SCALE", "fast"), ("PGFLOW_MAX_PAYLOAD_BYTES", "-1"),
                        ("PGFLOW_SYNCHRONOUS_COMMIT", "maybe"), ("PGFLOW_LOG_FORMAT", "xml")]:
        with pytest.raises(settings.SettingsError, match=f"{name}={value!r}"):
            settings.Settings.from_env({name: value})


# ---------------------------------------------------------------------------------------------- layout rules

def python_modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


SQL_WORDS = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|LISTEN|UNLISTEN|VACUUM|ALTER|CREATE|DROP|SET|COPY|"
                       r"DEALLOCATE)\b", re.IGNORECASE)


def test_no_sql_text_in_python_modules():
    """Every statement is a named query in sql/queries/ (or a call of a SQL function there)."""
    found = []
    for path in python_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args:
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                first = node.args[0]
                literal = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
                if isinstance(first, ast.JoinedStr):
                    literal = "".join(v.value for v in first.values if isinstance(v, ast.Constant))
                if name in ("execute", "executemany", "SQL", "copy", "exec_") and literal and SQL_WORDS.match(literal):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {literal[:50]!r}")
    assert found == []


def _queries_imported(path: Path, text: str) -> re.Match | None:
    """A module that runs its package's queries with ``from .app import Q``: the ``Q = Queries(...)`` there."""
    imported = re.search(r"^from \.(\w+) import (?:\w+, )*Q\b", text, re.MULTILINE)
    if imported is None:
        return None
    return re.search(r'^Q = Queries\("(\w+)"\)', (path.parent / f"{imported[1]}.py").read_text(), re.MULTILINE)


def test_every_named_query_exists_and_is_used():
    used_by_file: dict[str, set[str]] = {}
    for path in python_modules():
        text = path.read_text()
        file = re.search(r'^Q = Queries\("(\w+)"\)', text, re.MULTILINE) or _queries_imported(path, text)
        if file:
            names = set(re.findall(r'Q\.(?:execute|all|all_dicts|one|value)\([^,()]+, "(\w+)"', text))
            names |= set(re.findall(r'Q\.composed\("(\w+)"', text)) | set(re.findall(r'Q\["(\w+)"\]', text))
            names |= {n for pair in re.findall(r'(?:Q\.\w+\([^,()]+, |name = )"(\w+)" if \w+ else "(\w+)"', text)
                      for n in pair}
            used_by_file.setdefault(file[1], set()).update(names)
    assert set(used_by_file) == set(query_files())
    for file, used in used_by_file.items():
        defined = set(named_blocks(file))
        assert used - defined == set(), f"sql/queries/{file}.sql lacks {used - defined}"
        assert defined - used == set(), f"sql/queries/{file}.sql defines unused {defined - used}"


def imports_of(module: str) -> set[str]:
    """The pgflow modules ``module`` imports, transitively (at any depth of the file, lazy imports too). The
    package's ``__init__`` (the public API, run by any import of a submodule) is not followed."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = SRC.parent / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = SRC.parent / name.replace(".", "/") / "__init__.py"
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                if not target.startswith("pgflow"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    exists = (SRC.parent / (sub.replace(".", "/") + ".py")).exists() or \
                        (SRC.parent / sub.replace(".", "/") / "__init__.py").exists()
                    todo.append(sub if exists else target)
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("pgflow")]
        todo = [m for m in todo if m != "pgflow"]
    return {m for m in seen if m.startswith("pgflow")}


def test_the_worker_imports_neither_the_coordinator_nor_the_client():
    for worker_side in ("pgflow.engine.worker", "pgflow.engine.supervisor"):
        reached = imports_of(worker_side)
        assert "pgflow.engine.runners.python" in reached  # the walk follows imports
        assert not reached & {"pgflow.engine.coordinator", "pgflow.engine.maintenance", "pgflow.client"}, reached


def test_a_worker_reads_about_a_quarter_second_of_work_at_once():
    """Slow tasks are read one at a time (twenty one-second tasks held by one worker would leave the
    others idle at the tail); fast ones in full batches; a queue not seen yet in full batches."""
    sizes = ReadSizes(batch_size=20)
    assert sizes.size("q") == 20
    sizes.observe("q", tasks=20, seconds=0.02)  # 1 ms per task
    assert sizes.size("q") == 20
    sizes.observe("slow", tasks=4, seconds=4.0)  # 1 s per task
    assert sizes.size("slow") == 1
    sizes.observe("mid", tasks=10, seconds=0.5)  # 50 ms per task: 5 of them make 0.25 s
    assert sizes.size("mid") == 5
    sizes.observe("mid", tasks=0, seconds=3.0)  # nothing ran (a stop): no sample
    assert sizes.size("mid") == 5
    assert sizes.size("q") == 20  # per queue
