"""A real `pgflow console` process for the console tests, and an HTTP session that posts its forms the way
a browser does (cookie + the form's CSRF token)."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator

import httpx
from conftest import pgflow_command, subprocess_env

_URL = re.compile(r"pgflow console on (http://\S+/)")


@contextlib.contextmanager
def console_process(dsn: str, *args: str, **env: str) -> Iterator[str]:
    """`pgflow console --dsn DSN --port 0 ARGS` until the block ends; yields its base URL."""
    proc = subprocess.Popen(pgflow_command("console", "--dsn", dsn, "--port", "0", *args), env=subprocess_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the address, printed once the socket is bound
        match = _URL.search(line)
        if not match:
            proc.kill()
            raise AssertionError(f"console did not start: {line!r} {proc.stderr.read()[-2000:]}")
        yield match[1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Browserless:
    """GETs pages and POSTs forms with the console's CSRF cookie and token, following no redirect."""

    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, timeout=30)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def token(self, path: str = "/queues") -> str:
        """The form token of this session's cookie (set by the first page)."""
        page = self.get(path).text
        match = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page)
        assert match, "no token on " + path
        return match[1]

    def post(self, path: str, confirm: bool = True, token: str | None = None, **fields: str) -> httpx.Response:
        data = {"csrf": self.token() if token is None else token, **fields}
        if confirm:
            data["confirm"] = "yes"
        return self.http.post(path, data=data)
