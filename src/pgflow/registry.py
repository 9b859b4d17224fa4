"""Where a process finds flow code: the flows defined in it (by name), and code named ``module:attribute``.

Workers look a flow up here first and import its recorded ``module:attribute`` otherwise; the CLI loads the
``FLOW`` argument of ``pgflow start`` and the ``--import`` modules of ``pgflow worker`` the same way.

A worker imports only trusted code: a module name comes from a stored shape, which a user writes, and
importing runs the module. Trusted are the modules already imported, the ``--import`` modules of the worker
(and their submodules) and those listed in ``PGFLOW_PYTHON_MODULES``; anything else is refused before any
import, and the worker's current directory is not on ``sys.path``.
"""

from __future__ import annotations

import importlib
import os
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


#: module names (and their submodules) a worker was told to trust (its --import modules)
TRUSTED: set[str] = set()


def trust(modules: tuple[str, ...] | list[str]) -> None:
    """Let a worker import these modules and their submodules by name (the worker's --import list)."""
    TRUSTED.update(modules)


def forget_current_directory() -> None:
    """Take the current directory off ``sys.path`` (``python -m`` and :func:`import_module` put it there):
    a worker must not import whatever a module named in a shape finds in the directory it was started in."""
    here = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", here)]


def _is_trusted(name: str) -> bool:
    from . import settings

    prefixes = TRUSTED | set(settings.current().python_modules)
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_trusted(name: str) -> ModuleType:
    """A module a stored shape names, imported only if trusted (see module docs); ImportError otherwise."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    if not name or not _is_trusted(name):
        raise ImportError(f"module {name!r} is not trusted by this worker (start the worker with --import "
                          f"{name.partition('.')[0] or name} or list it in PGFLOW_PYTHON_MODULES)")
    return importlib.import_module(name)


def import_module(name: str) -> ModuleType:
    """Import a module as ``python -m`` would: modules in the current directory are importable too (the
    ``pgflow`` console script does not put it on ``sys.path``)."""
    if "" not in sys.path:
        sys.path.insert(0, "")
    return importlib.import_module(name)


def import_attribute(ref: str, trusted_only: bool = False) -> Any:
    """The object named ``module:qualified.name``; ImportError or AttributeError when there is none (or,
    with ``trusted_only``, when its module is not trusted)."""
    module_name, _, qualname = ref.partition(":")
    target: Any = import_trusted(module_name) if trusted_only else import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def load_flow(ref: str, trusted_only: bool = False) -> Flow | Node:
    """Import a flow (or a control-flow workflow node) from ``module:attribute`` (the CLI's FLOW
    argument; a worker passes ``trusted_only``), with a clear error."""
    from .flow import Flow
    from .tree import Node

    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise FlowDefinitionError(f"FLOW must look like module:attribute, not {ref!r}")
    try:
        module = import_trusted(module_name) if trusted_only else import_module(module_name)
    except ImportError as exc:
        raise FlowDefinitionError(f"cannot import module {module_name!r} for flow {ref!r}: {exc}") from exc
    flow = getattr(module, attr, None)
    if not isinstance(flow, Flow | Node):
        raise FlowDefinitionError(f"{ref!r} is not a pgflow Flow or workflow node (found {type(flow).__name__})")
    return flow
