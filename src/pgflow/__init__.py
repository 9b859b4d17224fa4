"""pgflow: durable, fault-tolerant DAG workflows whose only infrastructure is PostgreSQL.

Define a :class:`Flow` in Python, :func:`start` instances (optionally inside your own transaction), and run
``pgflow coordinator`` plus ``pgflow worker`` processes. See the README for a tour.
"""

from . import tree
from .client import (
    Client,
    InstanceHandle,
    InstanceInfo,
    StepInfo,
    cancel,
    discard_dead_letter,
    explain,
    grant_secret,
    list_instances,
    requeue_dead_letter,
    result,
    retry,
    set_variable,
    signal,
    start,
    start_many,
    start_registered,
    status,
    wait,
)
from .context import StepContext
from .db.connection import resolve_dsn
from .db.migrations import init_schema
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
from .flow import INPUT, Flow, Step
from .hooks import worker_init
from .limits import Limit, RateLimited
from .registry import load_flow
from .statuses import InstanceStatus, StepStatus

__all__ = [
    "INPUT", "Client", "DatabaseUnavailable", "Flow", "FlowDefinitionError", "InstanceFailed", "InstanceHandle",
    "InstanceInfo", "InstanceNotFinished", "InstanceNotFound", "InstanceStatus", "Limit", "NonRetryableError",
    "NotSerializable", "PayloadTooLarge", "PgflowError", "RateLimited", "Step", "StepContext", "StepInfo",
    "StepStatus", "StepTimeout", "cancel", "discard_dead_letter", "explain", "init_schema", "list_instances",
    "grant_secret", "load_flow", "requeue_dead_letter", "resolve_dsn", "result", "retry", "set_variable", "signal",
    "start", "start_many", "start_registered", "status", "tree", "wait", "worker_init",
]
__version__ = "0.1.0"
