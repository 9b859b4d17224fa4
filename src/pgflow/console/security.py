"""The console's defences: CSRF tokens for every POST, response headers that keep pages self-contained
(a Content-Security-Policy allowing only the console's own scripts and styles, no framing), and keeping
DSN passwords out of what a page shows.

CSRF: a random value in an HttpOnly, SameSite=Strict cookie, and in every form the HMAC of that value under
a key the console process made at start. A POST is accepted only with both, matching (and, when the browser
sends one, an Origin equal to the console's own): another site can neither read the token nor make the
browser send the cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

COOKIE = "pgflow_console"
HEADERS = {
    "content-security-policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # with no-referrer, Chromium sends "Origin: null" on form posts
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


class Csrf:
    """Issues and checks the form tokens of one console process."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    @staticmethod
    def new_cookie() -> str:
        return secrets.token_urlsafe(32)

    def token(self, cookie: str) -> str:
        """The form token that goes with ``cookie``."""
        return hmac.new(self._key, cookie.encode(), hashlib.sha256).hexdigest()

    def valid(self, cookie: str | None, token: str | None, origin: str | None, own_origin: str) -> bool:
        """Whether a POST carries a matching cookie and token, from the console's own pages."""
        if not cookie or not token:
            return False
        if origin is not None and origin != own_origin:
            return False
        return hmac.compare_digest(self.token(cookie), token)
