"""A local stand-in for the public hosts pg_durable's HTTP tests call (an httpbin-style echo service and a
JSON API root), so those tests run with no traffic leaving 127.0.0.1: the workers reach it through
PGFLOW_HTTP_RESOLVE (``httpbingo.org=http://127.0.0.1:PORT``).

Endpoints: ``/get``, ``/post`` (and other methods on ``/anything``) echo the request (args, headers, url,
method, data, json, form and files of a multipart body); ``/headers``, ``/uuid``, ``/status/N``, ``/delay/N``
(at most 10 s), ``/bytes/N`` (binary, never valid UTF-8); any other path answers a small JSON document.

Run it alone with ``python tests/compat/fake_hosts.py [PORT]``: it prints the port it listens on.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def multipart_fields(content_type: str, body: bytes) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The form fields and files of a multipart/form-data body (file contents as text where they are)."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    form: dict[str, list[str]] = {}
    files: dict[str, list[str]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True) or b""
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:  # as the public service shows binary files: a data URL
            text = "data:application/octet-stream;base64," + base64.b64encode(content).decode()
        (files if part.get_filename() else form).setdefault(str(name), []).append(text)
    return form, files


class Handler(BaseHTTPRequestHandler):
    """Answers like the public echo service the tests were written against."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value: object, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode())

    def _echo(self) -> dict[str, object]:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        content_type = self.headers.get("Content-Type", "")
        echo: dict[str, object] = {
            "args": parse_qs(parts.query), "headers": {k: [v] for k, v in self.headers.items()},
            "method": self.command, "origin": "127.0.0.1",
            "url": f"https://{self.headers.get('Host', 'localhost')}{self.path}",
            "data": body.decode("utf-8", "replace"), "form": {}, "files": {}, "json": None}
        if content_type.startswith("multipart/form-data"):
            echo["form"], echo["files"] = multipart_fields(content_type, body)
            echo["data"] = ""
        elif body:
            with contextlib.suppress(ValueError):
                echo["json"] = json.loads(body)
        return echo

    def _answer(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        head, _, arg = path.lstrip("/").partition("/")
        if head == "status" and arg.isdigit():
            self._send(int(arg), b"", "text/plain", {"Location": "/get"} if 300 <= int(arg) < 400 else None)
        elif head == "delay" and arg.replace(".", "", 1).isdigit():
            time.sleep(min(float(arg), 10.0))
            self._json(self._echo())
        elif head == "bytes" and arg.isdigit():
            self._send(200, b"\xff" + os.urandom(max(int(arg) - 1, 0)), "application/octet-stream")
        elif head == "uuid":
            self._json({"uuid": str(uuid.uuid4())})
        elif head == "headers":
            self._json({"headers": {k: [v] for k, v in self.headers.items()}})
        elif head in ("get", "post", "put", "patch", "delete", "anything"):
            self._json(self._echo())
        else:
            self._json({"current_user_url": "https://api.github.com/user", "path": path or "/"})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer


def serve(port: int = 0) -> ThreadingHTTPServer:
    """Start the server on 127.0.0.1 in a daemon thread; ``server.server_address[1]`` is its port."""
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    running = serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(running.server_address[1], flush=True)
    threading.Event().wait()
