"""pgflow: durable, fault-tolerant DAG workflows whose only infrastructure is PostgreSQL.

Define a :class:`Flow` in Python, :func:`start` instances (optionally inside your own transaction), and run
``pgflow coordinator`` plus ``pgflow worker`` processes. See the README for a tour.
"""

from . import tree
from .client import (
    cancel,
    explain,
    list_instances,
    load_flow,
    result,
    set_secret,
    set_variable,
    signal,
    start,
    start_many,
    status,
    wait,
)
from .errors import (
    DatabaseUnavailable,
    FlowDefinitionError,
    InstanceFailed,
    InstanceNotFinished,
    InstanceNotFound,
    NonRetryableError,
    NotSerializable,
    PayloadTooLarge,
    PgflowError,
    StepTimeout,
)
from .flows import INPUT, Flow, Step, StepContext
from .store import init_schema, resolve_dsn

__all__ = [
    "INPUT", "DatabaseUnavailable", "Flow", "FlowDefinitionError", "InstanceFailed", "InstanceNotFinished",
    "InstanceNotFound", "NonRetryableError", "NotSerializable", "PayloadTooLarge", "PgflowError", "Step",
    "StepContext", "StepTimeout", "cancel", "init_schema", "list_instances", "load_flow", "resolve_dsn",
    "result", "start", "status", "wait", "explain", "signal", "set_variable", "set_secret", "start_many", "tree",
]
__version__ = "0.1.0"
