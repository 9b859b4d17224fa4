"""Authoring DAG flows: named steps defined in Python code (they live in git, not in the database).

A step is a Python function, a SQL statement, or a *map* of either (one task per element of an earlier
step's output list, followed by fan-in: dependents receive the ordered list of task outputs). The shape of
a flow (steps, dependencies, options, SQL text) is hashed into a version; an instance runs the version it
started with, because the coordinator reads that version's shape from the database.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import orjson

from . import registry
from .errors import FlowDefinitionError
from .limits import Limit, check_limit_key
from .references import SqlTemplate, compile_sql

INPUT = "input"  # reserved name: the flow's input, as a parameter, a $reference or ``map(over=INPUT)``
ITEM = "item"  # reserved name: a map task's element in SQL ($item)
VARS = "vars"  # reserved name: the starting user's variables ($vars.name, ctx.vars)
SECRETS = "secrets"  # reserved name: secrets by reference, for HTTP steps only ($secrets.name)
#: what a SQL step also sees of its task ($instance_id, $step, $attempt, $idempotency_key)
TASK_VALUES = ("instance_id", "step", "attempt", "idempotency_key")
RESERVED = {INPUT, ITEM, VARS, SECRETS, "ctx", *TASK_VALUES}
MAX_PRIORITY = 1000
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUEUE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")


@dataclass
class Step:
    """One node of a flow. Calling it calls the underlying Python function (handy in unit tests)."""

    flow: Flow
    name: str
    kind: str  # "python" | "sql"
    deps: tuple[str, ...]
    fn: Callable[..., Any] | None = None
    sql: SqlTemplate | None = None
    over: str | None = None  # set for maps: a step name or INPUT
    flatten: bool = False
    queue: str | None = None
    max_attempts: int | None = None
    backoff_base: float | None = None
    backoff_cap: float | None = None
    timeout: float | None = None
    bindings: tuple[tuple[str, str], ...] = field(default=())  # (parameter, source name) for Python steps
    wants_all: bool = False  # the function takes **kwargs: it gets every dependency
    batch_size: int | None = None  # a batched map: each task gets a list of up to batch_size elements
    split_on_failure: bool = False  # a failing batch is bisected instead of retried whole
    priority: int = 0  # higher runs first (added to the start's priority)
    limit: Limit | str | None = None  # the limit this step's tasks consume (see pgflow.limits)
    limit_key: str | None = None  # the limit counted per this key ($input.x or, in a map, $item.x)
    cost: float | Callable[[Any], float] | None = None  # a task's cost in the limit's cost units

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            raise TypeError(f"step {self.name!r} is a SQL step; it runs in the database")
        return self.fn(*args, **kwargs)

    @property
    def is_map(self) -> bool:
        return self.over is not None

    def option(self, key: str) -> Any:
        """This step's setting, falling back to the flow's default."""
        value = getattr(self, key)
        return getattr(self.flow, key) if value is None else value

    def spec(self) -> dict[str, Any]:
        """The step's part of the flow shape (what the version hash covers)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "deps": list(self.deps),
            "over": self.over,
            "flatten": self.flatten,
            "queue": self.option("queue"),
            "max_attempts": self.option("max_attempts"),
            "backoff_base": self.option("backoff_base"),
            "backoff_cap": self.option("backoff_cap"),
            "timeout": self.option("timeout"),
            "sql": self.sql.source if self.sql else None,
            **self._claim_spec(),
        }

    def _claim_spec(self) -> dict[str, Any]:
        """Batching, priority and limit options, only when set (a flow without them keeps its version)."""
        spec: dict[str, Any] = {}
        if self.batch_size is not None:
            spec["batch_size"] = self.batch_size
        if self.split_on_failure:
            spec["split_on_failure"] = True
        if self.priority:
            spec["priority"] = self.priority
        if self.limit is not None:
            spec["limit"] = self.limit.spec() if isinstance(self.limit, Limit) else {"name": self.limit}
            spec["limit_key"] = self.limit_key
            if self.cost is not None:
                spec["cost"] = "function" if callable(self.cost) else self.cost
        return spec


StepRef = Step | str


def version_hash(shape: Any) -> str:
    """The version of a stored shape (a DAG flow's, or a control-flow workflow's as the database validated
    it): a hash of its canonical JSON, so the same shape always gets the same version."""
    return hashlib.sha256(orjson.dumps(shape, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _step_name(ref: StepRef) -> str:
    if isinstance(ref, Step):
        return ref.name
    if isinstance(ref, str):
        return ref
    if callable(ref):
        raise FlowDefinitionError(
            f"{getattr(ref, '__name__', ref)!r} is a plain function, not a step: pass the object the "
            "@flow.step decorator returned, or the step's name"
        )
    raise FlowDefinitionError(f"a dependency must be a step or a step name, not {ref!r}")


MAX_SECONDS = 86400.0  # backoffs and timeouts: the same bounds as the database's validator
MAX_ATTEMPTS = 1000


def _check_seconds(name: str, value: Any, what: str, required: bool = False) -> Any:
    """A positive, finite number of seconds up to a day (None allowed unless required)."""
    if value is None and not required:
        return None
    if (not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= MAX_SECONDS
            or not math.isfinite(value)):  # (bounds first: math.isfinite overflows on a huge int)
        raise FlowDefinitionError(f"{what}: {name} must be a positive number of seconds up to {MAX_SECONDS:g}, "
                                  f"not {value!r}")
    return value


class Flow:
    """A workflow definition: a DAG of steps added with :meth:`step`, :meth:`map` and :meth:`sql`.

    Defaults given here apply to every step that does not set its own: ``queue`` (the pgmq queue workers
    read), ``max_attempts``, exponential backoff with jitter between ``backoff_base`` and ``backoff_cap``
    seconds, and ``timeout`` in seconds (None: no limit).
    """

    def __init__(
        self,
        name: str,
        *,
        queue: str = "pgflow",
        max_attempts: int = 3,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        timeout: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise FlowDefinitionError(f"flow name {name!r} must be an identifier (letters, digits, _)")
        self.name = name
        self.queue = _check_queue(queue, f"flow {name!r}")
        self.max_attempts = _check_attempts(max_attempts, f"flow {name!r}")
        self.backoff_base = float(_check_seconds("backoff_base", backoff_base, f"flow {name!r}", required=True))
        self.backoff_cap = float(_check_seconds("backoff_cap", backoff_cap, f"flow {name!r}", required=True))
        self.timeout = _check_seconds("timeout", timeout, f"flow {name!r}")
        self.steps: dict[str, Step] = {}
        self.module = sys._getframe(1).f_globals.get("__name__", "__main__")
        registry.remember(self)

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, steps={list(self.steps)})"

    # ------------------------------------------------------------------------------------------ builders

    def step(self, fn: Callable | None = None, *, name: str | None = None, after: Iterable[StepRef] = (),
             **options: Any) -> Any:
        """Decorator adding a Python step. Its parameters after ``ctx`` are bound by name to the flow
        ``input`` and to the outputs of the steps listed in ``after``."""
        def decorate(func: Callable) -> Step:
            return self._add_python(func, name, after, None, False, options)

        return decorate(fn) if fn is not None else decorate

    def map(self, fn: Callable | None = None, *, over: StepRef, flatten: bool = False, name: str | None = None,
            after: Iterable[StepRef] = (), **options: Any) -> Any:
        """Decorator adding a fan-out step: the function runs once per element of ``over``'s output (a
        list; ``over=INPUT`` maps over the flow input). Its first parameter after ``ctx`` receives the
        element. With ``flatten=True`` the output must be a list of lists, mapped element by element.

        With ``batch_size=n`` each task gets a list of up to n elements (``ctx.indices`` says which) and
        returns a list of the same length; dependents still see one output per element, in order. A failing
        batch is retried whole, or bisected with ``split_on_failure=True`` (a poison element then fails
        alone). ``priority``, ``limit``, ``limit_key`` and ``cost`` apply to every step (see
        :mod:`pgflow.limits`)."""
        if over is None:
            raise FlowDefinitionError(f"flow {self.name!r}: map needs over= (a step, a step name or INPUT)")

        def decorate(func: Callable) -> Step:
            return self._add_python(func, name, after, over, flatten, options)

        return decorate(fn) if fn is not None else decorate

    def sql(self, name: str, statement: str, *, after: Iterable[StepRef] = (), over: StepRef | None = None,
            flatten: bool = False, **options: Any) -> Step:
        """Add a SQL step. ``$input``, ``$step``, ``$step.col``, ``$item`` and ``$name?`` in the statement
        become bound parameters. It runs in the worker's acknowledgement transaction: exactly once. Its
        output is the list of result rows (as objects), or ``{"rowcount": n}`` for statements without rows.
        With ``over`` it is a map: the statement runs once per element, which ``$item`` refers to (with
        ``batch_size``, ``$item`` is a list of elements and the statement returns one row per element, in
        order). ``$instance_id``, ``$step``, ``$attempt`` and ``$idempotency_key`` are the task's own."""
        if not isinstance(statement, str) or not statement.strip():
            raise FlowDefinitionError(f"SQL step {name!r}: the statement must be non-empty text")
        template = compile_sql(statement)
        step = self._new_step(name, "sql", after, over, flatten, options)
        step.sql = template
        known = {INPUT, VARS, *TASK_VALUES, *step.deps} | ({ITEM} if step.is_map else set())
        unknown = template.names - known
        if unknown:
            raise FlowDefinitionError(
                f"SQL step {name!r} refers to {', '.join('$' + u for u in sorted(unknown))}, which is not "
                f"its input or a dependency (it can use: {', '.join('$' + k for k in sorted(known))})"
            )
        return self._register(step)

    # ------------------------------------------------------------------------------------------ internals

    def _add_python(self, func: Callable, name: str | None, after: Iterable[StepRef], over: StepRef | None,
                    flatten: bool, options: dict[str, Any]) -> Step:
        if not callable(func):
            raise FlowDefinitionError(f"{func!r} is not a function")
        step = self._new_step(name or func.__name__, "python", after, over, flatten, options)
        step.fn = func
        step.bindings, step.wants_all = _bind_parameters(step, func)
        return self._register(step)

    def _new_step(self, name: str, kind: str, after: Iterable[StepRef], over: StepRef | None, flatten: bool,
                  options: dict[str, Any]) -> Step:
        where = f"flow {self.name!r}, step {name!r}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise FlowDefinitionError(f"{where}: a step name must be an identifier (letters, digits, _)")
        if name in RESERVED:
            raise FlowDefinitionError(f"{where}: {name!r} is reserved, choose another step name")
        if name in self.steps:
            raise FlowDefinitionError(f"{where}: duplicate step name {name!r}")
        unknown_options = set(options) - {"queue", "max_attempts", "backoff_base", "backoff_cap", "timeout",
                                          *CLAIM_OPTIONS}
        if unknown_options:
            raise FlowDefinitionError(f"{where}: unknown option(s) {sorted(unknown_options)}")
        if isinstance(after, str | Step):
            after = [after]
        try:
            deps = [_step_name(a) for a in after]
        except TypeError:
            raise FlowDefinitionError(f"{where}: after= must be a list of steps or step names, not {after!r}"
                                      ) from None
        over_name = None
        if over is not None:
            over_name = _step_name(over)
            if over_name != INPUT and over_name not in deps:
                deps.insert(0, over_name)
            over_step = self.steps.get(over_name)
            if flatten and over_step is not None and over_step.kind == "sql" and not over_step.is_map:
                raise FlowDefinitionError(f"{where}: flatten needs a list of lists, a SQL step returns rows")
            _check_over_returns_list(where, self.steps.get(over_name))
        elif flatten:
            raise FlowDefinitionError(f"{where}: flatten=True only applies to a map (give over=...)")
        if len(set(deps)) != len(deps):
            raise FlowDefinitionError(f"{where}: a dependency is listed twice in {deps}")
        if name in deps:
            raise FlowDefinitionError(f"{where}: a step cannot depend on itself")
        if "queue" in options:
            _check_queue(options["queue"], where)
        if "max_attempts" in options:
            _check_attempts(options["max_attempts"], where)
        for key in ("backoff_base", "backoff_cap", "timeout"):
            _check_seconds(key, options.get(key), where)
        _check_claim_options(where, kind, over_name is not None, options)
        return Step(flow=self, name=name, kind=kind, deps=tuple(deps), over=over_name, flatten=flatten,
                    **options)

    def _register(self, step: Step) -> Step:
        self.steps[step.name] = step
        for cached in ("shape", "version", "shape_json", "registration"):  # the shape changed: recompute lazily
            self.__dict__.pop(cached, None)
        return step

    # ------------------------------------------------------------------------------------------ shape

    def validate(self) -> None:
        """Raise FlowDefinitionError for unknown dependencies and cycles (possible with names as strings)."""
        if not self.steps:
            raise FlowDefinitionError(f"flow {self.name!r} has no steps")
        for step in self.steps.values():
            for dep in step.deps:
                if dep not in self.steps:
                    raise FlowDefinitionError(
                        f"flow {self.name!r}, step {step.name!r}: unknown dependency {dep!r} "
                        f"(steps: {', '.join(self.steps)})"
                    )
        _check_acyclic(self)

    @cached_property
    def shape(self) -> dict[str, Any]:
        """The flow's shape as stored in the database (validated)."""
        self.validate()
        return {"name": self.name, "steps": [s.spec() for s in self.steps.values()]}

    @cached_property
    def shape_json(self) -> str:
        """The shape serialized once, for registration at every start."""
        return orjson.dumps(self.shape).decode()

    @cached_property
    def version(self) -> str:
        """A hash of the shape: changes whenever steps, dependencies, SQL or options change."""
        return version_hash(self.shape)

    @cached_property
    def registration(self) -> dict[str, Any]:
        """What every start sends to register this flow version, computed once per shape (validating the
        flow the first time): a start of a known flow then costs no validation and no search for its code
        reference. The reference is fixed at the first start, as the database fixes it for the version."""
        return {"flow": self.name, "version": self.version, "ref": self.ref, "shape": self.shape_json}

    @property
    def ref(self) -> str | None:
        """``module:attribute`` from which a worker process can import this flow, if there is one."""
        module = sys.modules.get(self.module)
        if module is None or self.module == "__main__":
            return None
        for attr, value in vars(module).items():
            if value is self:
                return f"{self.module}:{attr}"
        return None


CLAIM_OPTIONS = ("batch_size", "split_on_failure", "priority", "limit", "limit_key", "cost")


def _check_claim_options(where: str, kind: str, is_map: bool, options: dict[str, Any]) -> None:
    """Batching, priority and limit options (see :class:`Step`)."""
    batch_size = options.get("batch_size")
    if batch_size is not None:
        if not is_map:
            raise FlowDefinitionError(f"{where}: batch_size only applies to a map (give over=...)")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= 100_000:
            raise FlowDefinitionError(f"{where}: batch_size must be an integer from 1 to 100000, not {batch_size!r}")
    if options.get("split_on_failure") and batch_size is None:
        raise FlowDefinitionError(f"{where}: split_on_failure needs batch_size")
    priority = options.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > MAX_PRIORITY:
        raise FlowDefinitionError(f"{where}: priority must be an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}")
    limit = options.get("limit")
    if limit is not None and not isinstance(limit, Limit | str):
        raise FlowDefinitionError(f"{where}: limit must be a pgflow.Limit or a limit's name, not {limit!r}")
    if isinstance(limit, str):
        Limit(limit, concurrency=1)  # the name's rules
    if limit is None and (options.get("limit_key") is not None or options.get("cost") is not None):
        raise FlowDefinitionError(f"{where}: limit_key and cost need limit=")
    check_limit_key(where, options.get("limit_key"), is_map)
    cost = options.get("cost")
    if cost is not None and not callable(cost) and (not isinstance(cost, int | float) or isinstance(cost, bool)
                                                    or not 0 <= cost < math.inf):
        raise FlowDefinitionError(f"{where}: cost must be a number >= 0 or a function of the element")
    if callable(cost) and kind != "python":
        raise FlowDefinitionError(f"{where}: a SQL step's cost is a number (a function needs a Python step)")


def _check_queue(queue: Any, where: str) -> str:
    if not isinstance(queue, str) or not _QUEUE.match(queue):
        raise FlowDefinitionError(f"{where}: queue {queue!r} must be lowercase letters, digits, _ (max 40)")
    return queue


def _check_attempts(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_ATTEMPTS:
        raise FlowDefinitionError(f"{where}: max_attempts must be an integer >= 1 (at most {MAX_ATTEMPTS}), "
                                  f"not {value!r}")
    return value


def _check_over_returns_list(where: str, over_step: Step | None) -> None:
    """Catch ``map(over=x)`` where x is annotated to return something that is not a list."""
    if over_step is None or over_step.fn is None or over_step.is_map:
        return
    try:
        hint = typing.get_type_hints(over_step.fn).get("return")
    except Exception:  # unresolvable annotations: nothing to check
        return
    if hint is None:
        return
    origin = typing.get_origin(hint) or hint
    if origin is Any or (isinstance(origin, type) and issubclass(origin, list | tuple)):
        return
    if getattr(origin, "__module__", "") == "collections.abc":  # Sequence[...], Iterable[...]
        return
    raise FlowDefinitionError(f"{where}: map over {over_step.name!r}, which is annotated to return {hint!r}, "
                              "not a list")


def _bind_parameters(step: Step, func: Callable) -> tuple[tuple[tuple[str, str], ...], bool]:
    """Decide, once, which value each parameter of a Python step receives."""
    where = f"flow {step.flow.name!r}, step {step.name!r}"
    params = list(inspect.signature(func).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not positional or positional[0].kind == positional[0].KEYWORD_ONLY:
        raise FlowDefinitionError(f"{where}: the function's first parameter must be the step context (ctx)")
    rest = positional[1:]
    bindings: list[tuple[str, str]] = []
    if step.is_map:
        if not rest:
            raise FlowDefinitionError(f"{where}: a map function takes (ctx, element, ...)")
        bindings.append((rest[0].name, ITEM))
        rest = rest[1:]
    sources = {INPUT, VARS, *step.deps}
    for p in rest:
        if p.name in sources:
            bindings.append((p.name, p.name))
        elif p.default is p.empty:
            raise FlowDefinitionError(
                f"{where}: parameter {p.name!r} names no dependency; parameters after ctx are bound to "
                f"'input' or to a step listed in after= (here: {', '.join(sorted(sources))})"
            )
    wants_all = any(p.kind == p.VAR_KEYWORD for p in params)
    return tuple(bindings), wants_all


def _check_acyclic(flow: Flow) -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise FlowDefinitionError(f"flow {flow.name!r} has a cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for dep in flow.steps[name].deps:
            visit(dep, path + [name])
        state[name] = 2

    for name in flow.steps:
        visit(name, [])
