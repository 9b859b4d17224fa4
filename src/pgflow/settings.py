"""Every ``PGFLOW_*`` environment variable, read in one place, once per process, and validated.

A bad value is reported with the variable's name and what it accepts the first time pgflow needs its settings,
instead of deep inside a worker. Tests that change the environment call :func:`reload`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import PgflowError

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
SYNCHRONOUS_COMMIT = ("on", "off", "local", "remote_write", "remote_apply")


class SettingsError(PgflowError):
    """A ``PGFLOW_*`` variable holds a value pgflow cannot use."""


def _flag(raw: str) -> bool:
    """A boolean variable: 1/true/on/yes or 0/false/off/no."""
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "on", "yes"):
        return True
    if lowered in ("0", "false", "off", "no"):
        return False
    raise ValueError(raw)


@dataclass(frozen=True)
class Settings:
    """pgflow's configuration from the environment (defaults in parentheses)."""

    dsn: str | None  # PGFLOW_DSN: the server (none: the embedded one)
    home: Path  # PGFLOW_HOME: local state, the embedded server's data (~/.local/share/pgflow)
    max_payload_bytes: int  # PGFLOW_MAX_PAYLOAD_BYTES: largest input or output (16 MiB)
    synchronous_commit: str  # PGFLOW_SYNCHRONOUS_COMMIT: of coordinator and worker transactions (off)
    time_scale: float  # PGFLOW_TIME_SCALE: timers run this many times faster (1)
    metrics_host: str  # PGFLOW_METRICS_HOST: where /metrics /healthz /readyz listen (127.0.0.1)
    metrics_flow_labels: bool  # PGFLOW_METRICS_FLOW_LABELS: name every user's flows in metrics labels (off)
    log_level: str  # PGFLOW_LOG_LEVEL: the CLI's default --log-level (WARNING)
    log_format: str  # PGFLOW_LOG_FORMAT: the CLI's default --log-format (text)
    http_allow: tuple[str, ...]  # PGFLOW_HTTP_ALLOW: hosts and CIDRs HTTP steps may reach (any)
    http_max_bytes: int  # PGFLOW_HTTP_MAX_BYTES: largest HTTP response (10 MiB)
    http_max_timeout: float  # PGFLOW_HTTP_MAX_TIMEOUT: cap of an HTTP node's timeout in seconds (60)
    python_modules: tuple[str, ...] = ()  # PGFLOW_PYTHON_MODULES: modules workers may import by name (none)
    http_resolve: tuple[tuple[str, str], ...] = ()  # PGFLOW_HTTP_RESOLVE: name=scheme://address:port overrides

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Read and validate the variables; SettingsError names the first bad one."""
        def read(name: str, default: T, parse: Callable[[str], T], accepts: str,
                 valid: Callable[[T], bool] = lambda _: True) -> T:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = parse(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r}: {accepts}") from None
            if not valid(value):
                raise SettingsError(f"{name}={raw!r}: {accepts}")
            return value

        def one_of(choices: tuple[str, ...], fold: Callable[[str], str] = str) -> Callable[[str], str]:
            def parse(raw: str) -> str:
                if fold(raw) not in choices:
                    raise ValueError(raw)
                return fold(raw)
            return parse

        return cls(
            dsn=env.get("PGFLOW_DSN") or None,
            home=Path(env.get("PGFLOW_HOME") or "~/.local/share/pgflow").expanduser(),
            max_payload_bytes=read("PGFLOW_MAX_PAYLOAD_BYTES", 16 * 1024 * 1024, int, "use a positive integer",
                                   _positive),
            synchronous_commit=read("PGFLOW_SYNCHRONOUS_COMMIT", "off", one_of(SYNCHRONOUS_COMMIT),
                                    "use " + ", ".join(SYNCHRONOUS_COMMIT)),
            time_scale=read("PGFLOW_TIME_SCALE", 1.0, float, "use a number > 0", _positive),
            metrics_host=env.get("PGFLOW_METRICS_HOST") or "127.0.0.1",
            metrics_flow_labels=read("PGFLOW_METRICS_FLOW_LABELS", False, _flag, "use 1/true/on or 0/false/off"),
            log_level=read("PGFLOW_LOG_LEVEL", "WARNING", one_of(LOG_LEVELS, str.upper),
                           "use " + ", ".join(LOG_LEVELS)),
            log_format=read("PGFLOW_LOG_FORMAT", "text", one_of(LOG_FORMATS, str.lower), "use text or json"),
            http_allow=_names(env.get("PGFLOW_HTTP_ALLOW", "")),
            http_max_bytes=read("PGFLOW_HTTP_MAX_BYTES", 10 * 1024 * 1024, int, "use a positive integer", _positive),
            http_max_timeout=read("PGFLOW_HTTP_MAX_TIMEOUT", 60.0, float, "use a number of seconds > 0", _positive),
            python_modules=_names(env.get("PGFLOW_PYTHON_MODULES", "")),
            http_resolve=_resolve_entries(env.get("PGFLOW_HTTP_RESOLVE", "")),
        )


def _names(raw: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped."""
    return tuple(filter(None, (item.strip() for item in raw.split(","))))


def _resolve_entries(raw: str) -> tuple[tuple[str, str], ...]:
    """PGFLOW_HTTP_RESOLVE: ``name=http://ADDRESS:PORT`` (or ``https://``, or ``none``) entries."""
    entries = []
    for item in _names(raw):
        name, _, target = item.partition("=")
        target = target.strip().rstrip("/")
        scheme, _, address = target.partition("://")
        valid = target == "none" or (scheme in ("http", "https") and address and "/" not in address)
        if not name.strip() or not valid:
            raise SettingsError(f"PGFLOW_HTTP_RESOLVE={raw!r}: use name=http://ADDRESS:PORT entries "
                                "(or https://, or name=none), comma-separated")
        entries.append((name.strip().lower(), target))
    return tuple(entries)


def _positive(value: Any) -> bool:
    return value > 0 and value != float("inf")


_current: Settings | None = None


def current() -> Settings:
    """The settings of this process, read from the environment on first use."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def reload() -> Settings:
    """Read the environment again (after a test changed it)."""
    global _current
    _current = Settings.from_env()
    return _current
