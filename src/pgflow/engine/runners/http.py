"""The runner of HTTP steps: one request, answered with a JSON envelope that later steps can test (``$resp.ok``).

The envelope is ``{"status", "ok", "headers", "body", "encoding", "duration_ms"}`` plus ``"json"`` when the
body parses as JSON. ``body`` is text, or base64 with ``encoding: "base64"`` for binary content. Network
errors and the ``retry_on`` statuses (default 5xx) raise, so the step is retried per its policy; every other
response, 4xx included, completes the step with ``ok`` false.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson

from ... import settings
from ...context import resolve_secrets
from ...errors import NonRetryableError
from ...flow import SECRETS
from ...limits import RateLimited, retry_after_seconds
from ...references import compile_text, value_of
from ...shape import StepShape
from ..task import ClaimedTask
from . import time_limit


class RetryableStatus(Exception):
    """A response whose status is in ``retry_on``: the step is tried again."""


class HttpError(Exception):
    """A network-level failure (retried), its message stripped of secret values."""


class EgressDenied(NonRetryableError):
    """The egress policy forbids this request (never retried)."""


#: never reachable from HTTP steps: link-local (incl. cloud metadata at 169.254.169.254) and metadata hosts
ALWAYS_DENIED = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32"))


@dataclass
class EgressPolicy:
    """Where HTTP steps may go and how much they may bring back (environment of the worker):

    - ``PGFLOW_HTTP_ALLOW``: comma-separated hosts (``api.example.com``, ``*.example.org``) and CIDRs
      (``10.0.0.0/8``, ``127.0.0.1``). Empty or unset: any host except the always-denied ranges.
    - link-local and cloud-metadata addresses are always denied, whatever the allow-list says;
    - ``PGFLOW_HTTP_MAX_BYTES`` (default 10 MiB): larger responses fail the step;
    - ``PGFLOW_HTTP_MAX_TIMEOUT`` (default 60 s): caps each node's timeout.
    """

    hosts: tuple[str, ...] = ()
    networks: tuple[Any, ...] = ()
    max_bytes: int = 10 * 1024 * 1024
    max_timeout: float = 60.0

    @classmethod
    def from_settings(cls) -> EgressPolicy:
        current = settings.current()
        hosts, networks = [], []
        for item in current.http_allow:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.append(item.lower())
        return cls(tuple(hosts), tuple(networks), current.http_max_bytes, current.http_max_timeout)

    def check(self, url: str) -> None:
        """Raise EgressDenied unless every address ``url``'s host resolves to is allowed."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EgressDenied(f"only http(s) URLs with a host are allowed, not {parts.scheme or '?'}://")
        host = parts.hostname.lower()
        try:
            infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
        except socket.gaierror as exc:
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from None
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
        for address in addresses:
            if any(address in net for net in ALWAYS_DENIED):
                raise EgressDenied(f"{host} resolves to {address}: link-local/metadata addresses are never allowed")
        if not self.hosts and not self.networks:
            return
        if any(fnmatch.fnmatch(host, pattern) for pattern in self.hosts):
            return
        if all(any(address in net for net in self.networks) for address in addresses):
            return
        raise EgressDenied(f"{host} is not in the HTTP allow-list (PGFLOW_HTTP_ALLOW)")

    def timeout(self, requested: float | None) -> float:
        return min(float(requested or 30.0), self.max_timeout)

    def read_limited(self, response: httpx.Response) -> bytes:
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise EgressDenied(f"response larger than {self.max_bytes:,} bytes (PGFLOW_HTTP_MAX_BYTES)")
            chunks.append(chunk)
        return b"".join(chunks)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _url_text(value: Any) -> str:
    return quote(_as_text(value), safe="")


def substitute_text(template: str, scope: dict[str, Any], url: bool = False) -> str:
    """Replace ``$name.path`` in a URL or header; in a URL each value is percent-encoded."""
    return compile_text(template).substitute(scope, _url_text if url else _as_text)


def substitute_body(body: Any, scope: dict[str, Any]) -> Any:
    """A JSON body: a string that is exactly one reference becomes that value; others are templated."""
    if isinstance(body, dict):
        return {k: substitute_body(v, scope) for k, v in body.items()}
    if isinstance(body, list):
        return [substitute_body(v, scope) for v in body]
    if isinstance(body, str):
        template = compile_text(body)
        whole = template.whole
        return value_of(whole, scope) if whole else template.substitute(scope, _as_text)
    return body


def run(step: StepShape, task: ClaimedTask, scope: dict[str, Any]) -> dict[str, Any]:
    """Perform an HTTP step (outside any transaction: at least once) and return its envelope. Secrets are
    resolved on this worker, for this request only, and never appear in its errors."""
    secrets = resolve_secrets(task.secret_refs)
    with time_limit(step.timeout):
        return request(step.spec, {**scope, SECRETS: secrets}, task.attempt, step.max_attempts,
                       redact=list(secrets.values()))


def request(spec: dict[str, Any], scope: dict[str, Any], attempt: int, max_attempts: int,
            redact: list[str] | None = None) -> dict[str, Any]:
    """Perform the request described by an http node (within the egress policy) and return its envelope.
    Values in ``redact`` (secrets) never appear in error messages."""
    url = substitute_text(spec["url"], scope, url=True)
    headers = {k: substitute_text(str(v), scope) for k, v in (spec.get("headers") or {}).items()}
    body = substitute_body(spec.get("body"), scope)
    retry_on = set(spec.get("retry_on") or range(500, 600))
    policy = EgressPolicy.from_settings()
    started = time.perf_counter()
    try:
        policy.check(url)
        with httpx.Client(timeout=policy.timeout(spec.get("timeout")), follow_redirects=False) as client, \
                client.stream(spec.get("method", "GET"), url, headers=headers,
                              content=body if isinstance(body, str | bytes) else None,
                              json=None if body is None or isinstance(body, str | bytes) else body) as response:
            content = policy.read_limited(response)
    except httpx.HTTPError as exc:
        raise HttpError(_redacted(f"{type(exc).__name__}: {exc} ({spec['url']})", redact)) from None
    envelope = envelope_of(response, content, (time.perf_counter() - started) * 1000)
    if response.status_code == 429 and "retry-after" in response.headers:  # park it, spending no attempt
        raise RateLimited(f"HTTP 429 from {spec['url']}",
                          retry_after=retry_after_seconds(response.headers["retry-after"]))
    if response.status_code in retry_on:
        raise RetryableStatus(f"HTTP {response.status_code} from {spec['url']} (attempt {attempt} of {max_attempts})")
    return envelope


def _redacted(text: str, secrets: list[str] | None) -> str:
    for secret in secrets or []:
        if secret:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


def envelope_of(response: httpx.Response, content: bytes, duration_ms: float) -> dict[str, Any]:
    try:
        body, encoding = content.decode("utf-8"), "text"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(content).decode(), "base64"
    envelope = {
        "status": response.status_code,
        "ok": 200 <= response.status_code < 300,
        "headers": dict(response.headers),
        "body": body,
        "encoding": encoding,
        "duration_ms": round(duration_ms, 3),
    }
    if encoding == "text" and "json" in response.headers.get("content-type", ""):
        with contextlib.suppress(orjson.JSONDecodeError):
            envelope["json"] = orjson.loads(content)
    return envelope
