"""Where a process finds flow code: the flows defined in it (by name), and code named ``module:attribute``.

Workers look a flow up here first and import its recorded ``module:attribute`` otherwise; the CLI loads the
``FLOW`` argument of ``pgflow start`` and the ``--import`` modules of ``pgflow worker`` the same way.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import FlowDefinitionError

if TYPE_CHECKING:
    from .flow import Flow
    from .tree import Node

#: every Flow constructed in this process, by name (the last one defined under a name wins)
REGISTRY: dict[str, Flow] = {}


def remember(flow: Flow) -> None:
    """Record a flow defined in this process (called by ``Flow()``)."""
    REGISTRY[flow.name] = flow


def import_module(name: str) -> ModuleType:
    """Import a module as ``python -m`` would: modules in the current directory are importable too (the
    ``pgflow`` console script does not put it on ``sys.path``)."""
    if "" not in sys.path:
        sys.path.insert(0, "")
    return importlib.import_module(name)


def import_attribute(ref: str) -> Any:
    """The object named ``module:qualified.name``; ImportError or AttributeError when there is none."""
    module_name, _, qualname = ref.partition(":")
    target: Any = import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def load_flow(ref: str) -> Flow | Node:
    """Import a flow (or a control-flow workflow node) from ``module:attribute`` (the CLI's FLOW
    argument), with a clear error."""
    from .flow import Flow
    from .tree import Node

    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise FlowDefinitionError(f"FLOW must look like module:attribute, not {ref!r}")
    try:
        module = import_module(module_name)
    except ImportError as exc:
        raise FlowDefinitionError(f"cannot import module {module_name!r} for flow {ref!r}: {exc}") from exc
    flow = getattr(module, attr, None)
    if not isinstance(flow, Flow | Node):
        raise FlowDefinitionError(f"{ref!r} is not a pgflow Flow or workflow node (found {type(flow).__name__})")
    return flow
