"""HTTP steps: one request, answered with a JSON envelope that later steps can test (``$resp.ok``).

The envelope is ``{"status", "ok", "headers", "body", "encoding", "duration_ms"}`` plus ``"json"`` when the
body parses as JSON. ``body`` is text, or base64 with ``encoding: "base64"`` for binary content. Network
errors and the ``retry_on`` statuses (default 5xx) raise, so the step is retried per its policy; every other
response, 4xx included, completes the step with ``ok`` false.
"""

from __future__ import annotations

import base64
import contextlib
import re
import time
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from .dsl import Reference, resolve

_REFERENCE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z_][A-Za-z0-9_]*)*)(\?)?")


class RetryableStatus(Exception):
    """A response whose status is in ``retry_on``: the step is tried again."""


def _reference(match: re.Match) -> Reference:
    return Reference(match.group(1), tuple(p for p in match.group(2).split(".") if p), bool(match.group(3)))


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def substitute_text(template: str, scope: dict[str, Any], url: bool = False) -> str:
    """Replace ``$name.path`` in a URL or header; in a URL each value is percent-encoded."""
    def value(match: re.Match) -> str:
        text = _as_text(resolve(_reference(match), scope))
        return quote(text, safe="") if url else text

    return _REFERENCE.sub(value, template)


def substitute_body(body: Any, scope: dict[str, Any]) -> Any:
    """A JSON body: a string that is exactly one reference becomes that value; others are templated."""
    if isinstance(body, dict):
        return {k: substitute_body(v, scope) for k, v in body.items()}
    if isinstance(body, list):
        return [substitute_body(v, scope) for v in body]
    if isinstance(body, str):
        whole = _REFERENCE.fullmatch(body)
        return resolve(_reference(whole), scope) if whole else substitute_text(body, scope)
    return body


def request(spec: dict[str, Any], scope: dict[str, Any], attempt: int, max_attempts: int) -> dict[str, Any]:
    """Perform the request described by an http node and return its envelope."""
    url = substitute_text(spec["url"], scope, url=True)
    headers = {k: substitute_text(str(v), scope) for k, v in (spec.get("headers") or {}).items()}
    body = substitute_body(spec.get("body"), scope)
    retry_on = set(spec.get("retry_on") or range(500, 600))
    started = time.perf_counter()
    with httpx.Client(timeout=spec.get("timeout") or 30.0, follow_redirects=False) as client:
        response = client.request(spec.get("method", "GET"), url, headers=headers,
                                  content=body if isinstance(body, str | bytes) else None,
                                  json=None if body is None or isinstance(body, str | bytes) else body)
    envelope = envelope_of(response, (time.perf_counter() - started) * 1000)
    if response.status_code in retry_on:
        raise RetryableStatus(f"HTTP {response.status_code} from {spec['url']} (attempt {attempt} of {max_attempts})")
    return envelope


def envelope_of(response: httpx.Response, duration_ms: float) -> dict[str, Any]:
    content = response.content
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
