"""The status vocabularies of instances and steps: the Python side of the database's status checks.

Every place that names a status uses these enums (StrEnum: a member equals its string, so ``"completed"``
and ``InstanceStatus.COMPLETED`` compare equal and serialize the same).
"""

from __future__ import annotations

from enum import StrEnum


class InstanceStatus(StrEnum):
    """Where an instance is in its life: pending until a coordinator first looks at it."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    """A step row's state (a DAG step, a map task, or a node of a control-flow tree)."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    MAPPING = "mapping"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


#: steps that have not ended: cancelled when their instance fails or is cancelled
OPEN_STEP_STATUSES = frozenset({StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.MAPPING,
                                StepStatus.WAITING})
#: instances that have ended for good
TERMINAL_INSTANCE_STATUSES = frozenset({InstanceStatus.COMPLETED, InstanceStatus.FAILED, InstanceStatus.CANCELLED})
