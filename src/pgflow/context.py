"""What a running step is given: its :class:`StepContext`, and the values of the secrets it may use."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import NonRetryableError


@dataclass
class StepContext:
    """What a running step knows about itself; passed as the first argument of every Python step."""

    instance_id: int
    flow: str
    step: str
    task_index: int
    attempt: int
    max_attempts: int
    input: Any
    vars: dict[str, Any] = field(default_factory=dict)
    secret_refs: dict[str, str] = field(default_factory=dict, repr=False)
    indices: range | None = None  # a batched map task: the positions of its elements in the map

    def secret(self, name: str) -> str:
        """A secret variable's value, read now from where its reference points (environment or file):
        the value is never stored by pgflow. Do not return it from the step."""
        if name not in self.secret_refs:
            raise KeyError(f"no secret named {name!r} granted to this instance's owner (an administrator grants "
                           "them: pgflow.grant_secret)")
        return resolve_secrets({name: self.secret_refs[name]})[name]

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and redeliveries of this task: use it to make side effects idempotent."""
        return idempotency_key(self.instance_id, self.step, self.task_index)


def idempotency_key(instance_id: int, step: str, task_index: int) -> str:
    """``pgflow:<instance>:<step>[<task>]``: the same on every attempt of a task."""
    task = "" if task_index < 0 else f"[{task_index}]"
    return f"pgflow:{instance_id}:{step}{task}"


def resolve_secrets(refs: dict[str, str] | None) -> dict[str, str]:
    """Secret values from their references: ``env:NAME`` (the worker's environment, e.g. a Kubernetes
    Secret as env) or ``file:/path`` (e.g. a mounted Secret volume)."""
    values = {}
    for name, ref in (refs or {}).items():
        kind, _, where = ref.partition(":")
        try:
            values[name] = os.environ[where] if kind == "env" else Path(where).read_text().strip()
        except (KeyError, OSError) as exc:
            raise NonRetryableError(f"secret {name!r}: cannot resolve {ref!r} on this worker ({type(exc).__name__})"
                                    ) from None
    return values


def redacted(text: str, secrets: list[str] | None) -> str:
    """``text`` with every secret value, as it is and URL-encoded, replaced by ``***``, whatever its case
    (a host name or an error message may have lower-cased it)."""
    values = {v for secret in secrets or () if secret for v in (secret, quote(secret, safe=""))}
    for value in sorted(values, key=len, reverse=True):
        text = re.sub(re.escape(value), "***", text, flags=re.IGNORECASE)
    return text
