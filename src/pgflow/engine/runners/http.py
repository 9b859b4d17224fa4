"""The runner of HTTP steps: one request, answered with a JSON envelope that later steps can test (``$resp.ok``).

The envelope is ``{"status", "ok", "headers", "body", "encoding", "duration_ms"}`` plus ``"json"`` when the
body parses as JSON. ``body`` is text, or base64 with ``encoding: "base64"`` for binary content. Network
errors and the ``retry_on`` statuses (default 5xx) raise, so the step is retried per its policy; every other
response, 4xx included, completes the step with ``ok`` false.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import orjson

from ... import settings
from ...context import redacted, resolve_secrets
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


#: never reachable from HTTP steps, whatever the allow-list says: link-local (incl. cloud metadata at
#: 169.254.169.254) and other metadata addresses
ALWAYS_DENIED = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32"))

#: special-purpose ranges (IANA registries) refused unless allow-listed, on top of what ``ipaddress`` calls
#: non-global (its answer varies between Python versions, e.g. for 192.0.0.0/24)
NOT_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4", "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48",
    "100::/64", "2001::/23", "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8"))

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def plain(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 address it is (checked as such)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Target:
    """Where a request goes: the URL with the checked address in place of the host name, the Host header
    and TLS server name of the original name (so the connection goes exactly where the check looked)."""

    url: str
    host: str
    host_header: str
    address: str
    sni: str | None


@dataclass
class Attempt:
    """What the audit trail records of one HTTP attempt (pgflow.http_audit)."""

    method: str
    host: str = ""
    address: str | None = None
    status: int | None = None
    error: str | None = None
    duration_ms: float | None = None


@dataclass
class EgressPolicy:
    """Where HTTP steps may go and how much they may bring back (environment of the worker):

    - ``PGFLOW_HTTP_ALLOW``: comma-separated hosts (``api.example.com``, ``*.example.org``) and CIDRs
      (``10.0.0.0/8``, ``127.0.0.1``). Unset: any host name whose addresses are all public (global); never
      loopback, private, link-local, shared, reserved, multicast or IPv4-mapped forms of them, and never a
      bare IP address. An allow-listed name may resolve to private addresses; an allow-listed CIDR opens its
      addresses (bare IPs included). Set, anything else is refused; ``none``: no HTTP request at all;
    - ``PGFLOW_HTTP_RESOLVE`` (operators only, for tests and development): ``name=http://ADDRESS:PORT``
      entries (``name`` may be a ``*.`` pattern) send requests for ``name`` to that address instead of its
      DNS answer (plain HTTP, or ``https://`` with TLS checked against the original name); ``*=none`` makes
      every other name unresolvable without any DNS query. The name still passes the allow-list; the
      address is the operator's choice, so it is not checked;
    - link-local and cloud-metadata addresses are always denied, whatever the allow-list says;
    - the name is resolved once, every address checked, and the connection made to the checked address
      (Host header and TLS name of the original name): no second lookup an attacker's DNS could answer
      differently;
    - ``PGFLOW_HTTP_MAX_BYTES`` (default 10 MiB): larger responses fail the step;
    - ``PGFLOW_HTTP_MAX_TIMEOUT`` (default 60 s): caps each node's timeout, a deadline for the whole
      request (connection, headers and body), not for each read.
    """

    hosts: tuple[str, ...] = ()
    networks: tuple[Any, ...] = ()
    max_bytes: int = 10 * 1024 * 1024
    max_timeout: float = 60.0
    disabled: bool = False
    resolve: tuple[tuple[str, str], ...] = ()  # (name pattern, "scheme://address:port" or "none")

    @classmethod
    def from_settings(cls) -> EgressPolicy:
        current = settings.current()
        hosts, networks = [], []
        disabled = [item.lower() for item in current.http_allow] == ["none"]
        for item in () if disabled else current.http_allow:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.append(item.lower())
        return cls(tuple(hosts), tuple(networks), current.http_max_bytes, current.http_max_timeout, disabled,
                   current.http_resolve)

    @property
    def open(self) -> bool:
        """No allow-list: public names only."""
        return not self.hosts and not self.networks

    def check(self, url: str, secrets: list[str] | None = None) -> list[Target]:
        """Resolve ``url``'s host once and check every address; the Targets to connect to (one per address,
        tried in order), or EgressDenied. A secret's value in the host is refused before any lookup (a DNS
        query would carry it out)."""
        if self.disabled:
            raise EgressDenied("outbound HTTP requests are disabled on this engine (PGFLOW_HTTP_ALLOW=none)")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EgressDenied(f"unsupported URL scheme {parts.scheme or '?'}://: only http(s) URLs with a host "
                               "are allowed")
        host = parts.hostname.lower()
        netloc_host = parts.netloc.rpartition("@")[2]
        if any(secret and secret.lower() in netloc_host.lower() for secret in secrets or ()):
            raise EgressDenied("a secret may not be part of a URL's host name (it would leave in a DNS query)")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        literal = _ip_literal(host)
        name_allowed = literal is None and any(fnmatch.fnmatch(host, pattern) for pattern in self.hosts)
        override = None if literal is not None else self._override(host)
        if override is not None:
            return [self._overridden(host, netloc_host, parts, override, name_allowed)]
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        for address in addresses:
            self._check_address(host, plain(address), bare=literal is not None, name_allowed=name_allowed)
        userinfo = parts.netloc.rpartition("@")[0]
        sni = host if parts.scheme == "https" and literal is None else None
        targets = []
        for address in dict.fromkeys(plain(a) for a in addresses):
            shown = f"[{address}]" if address.version == 6 else str(address)
            netloc = (userinfo + "@" if userinfo else "") + f"{shown}:{port}"
            targets.append(Target(urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), host, netloc_host,
                                  str(address), sni))
        return targets

    def _override(self, host: str) -> str | None:
        """The PGFLOW_HTTP_RESOLVE entry for ``host`` (exact names before patterns), else None."""
        for pattern, target in sorted(self.resolve, key=lambda entry: "*" in entry[0]):
            if fnmatch.fnmatch(host, pattern):
                return target
        return None

    def _overridden(self, host: str, netloc_host: str, parts: Any, override: str, name_allowed: bool) -> Target:
        """The Target of a name the operator mapped (PGFLOW_HTTP_RESOLVE): the allow-list still applies to
        the name; no DNS query is made."""
        if not self.open and not name_allowed:
            raise EgressDenied(f"{host} is not in the allowed hosts (PGFLOW_HTTP_ALLOW)")
        if override == "none":
            raise httpx.ConnectError(f"cannot resolve {host}: no address for it (PGFLOW_HTTP_RESOLVE)")
        to = urlsplit(override)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + to.netloc
        return Target(urlunsplit((to.scheme, netloc, parts.path, parts.query, "")), host, netloc_host,
                      to.netloc, host if to.scheme == "https" else None)

    def _check_address(self, host: str, address: Address, *, bare: bool, name_allowed: bool) -> None:
        if any(address in net for net in ALWAYS_DENIED):
            raise EgressDenied(f"{host} is {address}: link-local/metadata addresses are never allowed"
                               + (" (bare IP address targets are refused)" if bare else ""))
        if any(address in net for net in self.networks):
            return
        if bare:
            raise EgressDenied(f"{host}: bare IP address targets are refused unless allow-listed (PGFLOW_HTTP_ALLOW)")
        if name_allowed:
            return
        if not self.open:
            raise EgressDenied(f"{host} is not in the allowed hosts (PGFLOW_HTTP_ALLOW)")
        if not address.is_global or address.is_multicast or any(address in net for net in NOT_PUBLIC):
            raise EgressDenied(f"{host} resolves to {address}: loopback, private, link-local and reserved addresses "
                               "are refused unless allow-listed (PGFLOW_HTTP_ALLOW)")

    def timeout(self, requested: float | None) -> float:
        return min(float(requested or 30.0), self.max_timeout)

    def read_limited(self, response: httpx.Response, deadline: float) -> bytes:
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise EgressDenied(f"response larger than {self.max_bytes:,} bytes (PGFLOW_HTTP_MAX_BYTES)")
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("the request's total deadline passed while reading the body")
            chunks.append(chunk)
        return b"".join(chunks)


def _ip_literal(host: str) -> Address | None:
    """The address when ``host`` is written as one (dotted, bracketed IPv6, or the shorthand forms
    inet_aton accepts, e.g. 2852039166 or 0x7f.1), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


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


def multipart_parts(parts: Any, scope: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """A multipart/form-data body's parts ({name, data_b64, filename?, content_type?}) as httpx files. A
    part's ``data_b64`` is base64 (whitespace ignored: PostgreSQL's encode() wraps lines) or exactly one
    reference whose value is base64; text around a reference could only corrupt the bytes, so it fails."""
    if not isinstance(parts, list) or not parts:
        raise NonRetryableError("a multipart request needs a non-empty array of parts")
    files = []
    for part in parts:
        name = part.get("name") if isinstance(part, dict) else None
        if not isinstance(name, str) or not name:
            raise NonRetryableError("every multipart part needs a name")
        data = part.get("data_b64")
        if isinstance(data, str):
            template = compile_text(data)
            if template.whole:
                data = value_of(template.whole, scope)
            elif template.references:
                raise NonRetryableError(f"multipart part {name!r}: data_b64 must be base64 text or a whole-value "
                                        "reference ($name.col), not text around a reference")
        if not isinstance(data, str):
            raise NonRetryableError(f"multipart part {name!r}: data_b64 must be base64 text")
        try:
            content = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise NonRetryableError(f"multipart part {name!r}: data_b64 is not valid base64") from None
        filename, content_type = part.get("filename"), part.get("content_type")
        name = substitute_text(name, scope)
        filename = substitute_text(filename, scope) if isinstance(filename, str) else None
        files.append((name, (filename, content) if content_type is None else (filename, content, content_type)))
    return files


def run(step: StepShape, task: ClaimedTask, scope: dict[str, Any], attempt: Attempt | None = None
        ) -> dict[str, Any]:
    """Perform an HTTP step (outside any transaction: at least once) and return its envelope. Secrets are
    the ones an administrator granted the step's owner (``task.secret_refs``, set by the worker when the
    step runs), resolved on this worker for this request only, and never appear in its errors. The whole
    request runs under one deadline (the node's timeout, capped by PGFLOW_HTTP_MAX_TIMEOUT, and the step's)."""
    secrets = resolve_secrets(task.secret_refs)
    limit = EgressPolicy.from_settings().timeout((step.spec or {}).get("timeout"))
    with time_limit(min(limit, step.timeout) if step.timeout else limit):
        return request(step.spec, {**scope, SECRETS: secrets}, task.attempt, step.max_attempts,
                       redact=list(secrets.values()), attempt_record=attempt)


def request(spec: dict[str, Any], scope: dict[str, Any], attempt: int, max_attempts: int,
            redact: list[str] | None = None, attempt_record: Attempt | None = None) -> dict[str, Any]:
    """Perform the request described by an http node (within the egress policy) and return its envelope.
    Values in ``redact`` (secrets) never appear in error messages. ``attempt_record`` is filled in for the
    audit trail."""
    record = attempt_record or Attempt(str(spec.get("method", "GET")))
    url = substitute_text(spec["url"], scope, url=True)
    headers = {k: substitute_text(str(v), scope) for k, v in (spec.get("headers") or {}).items()}
    body = substitute_body(spec.get("body"), scope)
    files = multipart_parts(spec["multipart"], scope) if spec.get("multipart") is not None else None
    retry_on = set(spec.get("retry_on") or range(500, 600))
    policy = EgressPolicy.from_settings()
    timeout = policy.timeout(spec.get("timeout"))
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    record.host = redacted(urlsplit(url).hostname or "?", redact)
    try:
        try:
            targets = policy.check(url, redact)
            for index, target in enumerate(targets):  # the checked addresses, in the resolver's order
                record.address = target.address
                try:
                    response, content = _send(policy, target, record.method, headers, body, timeout, deadline,
                                              files)
                    break
                except httpx.ConnectError:
                    if index == len(targets) - 1:
                        raise
        except httpx.HTTPError as exc:
            raise HttpError(redacted(f"{type(exc).__name__}: {exc} ({spec['url']})", redact)) from None
    except Exception as exc:
        record.error = redacted(f"{type(exc).__name__}: {exc}", redact)[:500]
        raise
    finally:
        record.duration_ms = round((time.perf_counter() - started) * 1000, 3)
    record.status = response.status_code
    envelope = envelope_of(response, content, (time.perf_counter() - started) * 1000)
    if response.status_code == 429 and "retry-after" in response.headers:  # park it, spending no attempt
        raise RateLimited(f"HTTP 429 from {spec['url']}",
                          retry_after=retry_after_seconds(response.headers["retry-after"]))
    if response.status_code in retry_on:
        raise RetryableStatus(f"HTTP {response.status_code} from {spec['url']} (attempt {attempt} of {max_attempts})")
    return envelope


def _send(policy: EgressPolicy, target: Target, method: str, headers: dict[str, str], body: Any, timeout: float,
          deadline: float, files: list[tuple[str, tuple[Any, ...]]] | None = None) -> tuple[httpx.Response, bytes]:
    """One request to a checked address, with the name's Host header and TLS server name; no proxy from the
    environment (it would connect elsewhere), no redirects. ``files``: a multipart/form-data body."""
    headers = {k: v for k, v in headers.items() if k.lower() != "host"} | {"Host": target.host_header}
    extensions = {"sni_hostname": target.sni} if target.sni else None
    payload: dict[str, Any] = {"files": files} if files is not None else {
        "content": body if isinstance(body, str | bytes) else None,
        "json": None if body is None or isinstance(body, str | bytes) else body}
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client, \
            client.stream(method, target.url, headers=headers, extensions=extensions, **payload) as response:
        return response, policy.read_limited(response, deadline)


def envelope_of(response: httpx.Response, content: bytes, duration_ms: float) -> dict[str, Any]:
    """The step's output. A body that is not UTF-8, or holds a NUL character (which PostgreSQL's text and
    jsonb cannot store), is kept as base64."""
    try:
        body, encoding = content.decode("utf-8"), "text"
    except UnicodeDecodeError:
        body, encoding = "", "base64"
    if encoding == "base64" or "\x00" in body:
        body, encoding = base64.b64encode(content).decode(), "base64"
    envelope = {
        "status": response.status_code,
        "ok": 200 <= response.status_code < 300,
        "headers": dict(response.headers),
        "body": body,
        "encoding": encoding,
        "duration_ms": round(duration_ms, 3),
    }
    if encoding == "text" and "json" in response.headers.get("content-type", "") and "\\u0000" not in body:
        with contextlib.suppress(orjson.JSONDecodeError):
            envelope["json"] = orjson.loads(content)
    return envelope
