"""The runner of Python steps: finds a step's function and calls it with its context and bound values
(outside any transaction: at least once)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from ...errors import FlowDefinitionError, NonRetryableError
from ...flow import Step
from ...registry import REGISTRY, import_attribute, load_flow
from ...shape import StepShape
from ..task import ClaimedTask
from . import time_limit

Bindings = tuple[tuple[str, str], ...]  # (parameter, name of the value it receives)


class PythonRunner:
    """Finds the function behind a step: flows defined in this process first, else the flow's
    ``module:attribute`` reference recorded when it was registered; for control-flow leaves, the
    ``module:function`` named in the node (which must be marked with ``@pgflow.tree.task``)."""

    def __init__(self) -> None:
        self._leaves: dict[str, tuple[Callable, Bindings, bool]] = {}

    def run(self, flow_ref: str | None, step: StepShape, task: ClaimedTask, scope: dict[str, Any]) -> Any:
        """Call the step's function and return its output."""
        if task.is_leaf:  # a control-flow leaf: a module-level function bound by parameter names
            fn, bindings, wants_all = self.leaf_function(step.spec["fn"])
            kwargs = {p: scope[source] for p, source in bindings if source in scope}
            missing = [p for p, source in bindings if source not in scope]
            if missing:
                raise NonRetryableError(f"{step.spec['fn']}: no value for parameter(s) {missing}")
        else:
            code = self.dag_step(task.flow, flow_ref, step.name)
            fn, wants_all = code.fn, code.wants_all
            kwargs = {p: scope[source] for p, source in code.bindings}
        if wants_all:
            for name, value in scope.items():
                kwargs.setdefault(name, value)
        with time_limit(step.timeout):
            result = fn(task.context(step, scope), **kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(_awaited(result))
        return result

    def leaf_function(self, ref: str) -> tuple[Callable, Bindings, bool]:
        """The function, its (parameter, scope name) bindings, and whether it takes **kwargs."""
        if ref not in self._leaves:
            try:
                target = import_attribute(ref, trusted_only=True)
            except (ImportError, AttributeError) as exc:
                raise NonRetryableError(f"cannot load Python step {ref!r}: {exc}") from exc
            if not getattr(target, "__pgflow_task__", False):
                # a workflow names its functions itself: only those marked for it may run (not os:system)
                raise NonRetryableError(f"{ref} is not marked with @pgflow.tree.task, so workflows may not call it")
            params = list(inspect.signature(target).parameters.values())[1:]  # after ctx
            bindings = tuple((p.name, p.name) for p in params
                             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty)
            self._leaves[ref] = (target, bindings, any(p.kind == p.VAR_KEYWORD for p in params))
        return self._leaves[ref]

    @staticmethod
    def dag_step(flow_name: str, ref: str | None, step_name: str) -> Step:
        """The Python step of a DAG flow, as this worker's code defines it."""
        flow = REGISTRY.get(flow_name)
        if flow is None and ref:
            try:
                flow = load_flow(ref, trusted_only=True)
            except FlowDefinitionError as exc:
                raise NonRetryableError(str(exc)) from None
        if flow is None:
            raise NonRetryableError(f"flow {flow_name!r} is not importable by this worker (defined in "
                                    "__main__?): start the worker with --import MODULE")
        step = flow.steps.get(step_name)
        if step is None or step.fn is None:
            raise NonRetryableError(f"flow {flow_name!r} as loaded by this worker has no Python step "
                                    f"{step_name!r} (the code changed since the instance started?)")
        return step


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
