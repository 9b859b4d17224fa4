"""The status vocabularies of instances and steps: the Python side of ``sql/schema/01_statuses.sql``.

The database defines them (the domains ``pgflow.instance_status`` and ``pgflow.step_status`` and the set
functions next to them); tests/db/test_schema.py checks that these enums and sets say the same, so Python code
can name statuses and sets without spelling them out again.
"""

from __future__ import annotations

from enum import StrEnum


class InstanceStatus(StrEnum):
    """What an instance is doing (``pgflow.instance_status``)."""

    PENDING = "pending"  # started, not looked at by a coordinator yet
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    """What a step row is doing (``pgflow.step_status``): a DAG step, a map task or a workflow node."""

    QUEUED = "queued"  # its message is on a queue, not yet claimed
    RUNNING = "running"  # claimed by a worker; for a composite node: some child is still open
    RETRYING = "retrying"  # an attempt failed; the message becomes visible again after the backoff
    MAPPING = "mapping"  # a map step whose element tasks are running
    WAITING = "waiting"  # a timer or signal wait, completed by the coordinator
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # its instance was cancelled or failed
    SKIPPED = "skipped"  # a branch an if did not take, a loser of a race


#: Instances that are not finished (``pgflow.open_instance_statuses()``).
OPEN_INSTANCE_STATUSES = frozenset({InstanceStatus.PENDING, InstanceStatus.RUNNING})
#: Instances that are finished for good.
TERMINAL_INSTANCE_STATUSES = frozenset(InstanceStatus) - OPEN_INSTANCE_STATUSES

#: Steps that are not finished (``pgflow.open_step_statuses()``): cancelling or failing an instance cancels them.
OPEN_STEP_STATUSES = frozenset({StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.MAPPING,
                                StepStatus.WAITING})
#: Steps that are finished for good.
TERMINAL_STEP_STATUSES = frozenset(StepStatus) - OPEN_STEP_STATUSES
#: Open steps with a message out on a queue, which a worker may claim (``pgflow.claimable_step_statuses()``).
CLAIMABLE_STEP_STATUSES = frozenset({StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRYING})
