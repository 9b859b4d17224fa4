"""Exceptions raised by pgflow. Each says what was wrong and, where it helps, what to do about it."""


class PgflowError(Exception):
    """Base class for every error pgflow raises on purpose."""


class FlowDefinitionError(PgflowError):
    """A flow's shape is invalid: cycle, unknown dependency, duplicate name, bad parameter binding..."""


class InstanceNotFound(PgflowError):
    """No instance has the given id (or it was removed by retention)."""


class InstanceNotFinished(PgflowError):
    """The instance has no result yet (it is pending or running)."""


class InstanceFailed(PgflowError):
    """The instance failed or was cancelled; ``error`` holds the stored reason."""

    def __init__(self, instance_id: int, status: str, error: str | None):
        super().__init__(f"instance {instance_id} {status}: {error}")
        self.instance_id = instance_id
        self.status = status
        self.error = error


class PayloadTooLarge(PgflowError):
    """An input or output is larger than the configured limit (PGFLOW_MAX_PAYLOAD_BYTES)."""


class NotSerializable(PgflowError):
    """An input or output that JSON cannot represent (sets, arbitrary objects...)."""


class NonRetryableError(PgflowError):
    """Raise from a step to fail it at once, without spending its remaining attempts."""


class StepTimeout(PgflowError):
    """A step ran longer than its ``timeout``."""


class DatabaseUnavailable(PgflowError):
    """The PostgreSQL server could not be reached."""
