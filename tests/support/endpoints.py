"""HTTP endpoints of real processes (/metrics, /healthz, /readyz) on 127.0.0.1, for the observability and
upgrade tests: a free port, a GET, and waiting for an endpoint to answer."""

from __future__ import annotations

import functools
import socket
import urllib.error
import urllib.request

from conftest import wait_until

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 30.0, accept: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


#: wait for an endpoint or a scrape: not up yet (OSError) or not there yet (AssertionError) means "not yet"
wait_for = functools.partial(wait_until, interval=0.2, retry_on=(OSError, AssertionError))


def endpoint_up(port: int) -> bool:
    return http_get(f"http://{HOST}:{port}/healthz", timeout=2)[0] == 200
