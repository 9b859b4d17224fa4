"""The HTTP egress policy of the worker (issue 12 item 5, issue 13): what an HTTP step may reach, decided on
the address actually connected to, before any connection. No traffic leaves 127.0.0.1: targets outside it
are refused by the policy before any connection (bare IPs need no lookup; names are answered by a stand-in
resolver, the only way to test DNS answers without asking a real DNS server)."""

from __future__ import annotations

import ipaddress
import socket
import time
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import serve_http

from pgflow import settings
from pgflow.context import redacted
from pgflow.engine.runners import http
from pgflow.engine.runners.http import EgressDenied, EgressPolicy

OPEN = EgressPolicy()


@pytest.fixture
def resolver(monkeypatch):
    """A stand-in for DNS: names map to lists of answers (one list per lookup, in turn); every lookup is
    counted. A name it does not know fails the test."""
    answers: dict[str, list[list[str]]] = {}
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        if host not in answers:
            raise AssertionError(f"unexpected DNS lookup of {host}")
        turn = answers[host].pop(0) if len(answers[host]) > 1 else answers[host][0]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in turn]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, asked


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/", "http://[::ffff:a9fe:a9fe]/",
    "http://2852039166/", "http://0xa9.0xfe.0xa9.0xfe/", "http://127.0.0.1/", "http://[::1]/", "http://0x7f.1/",
    "http://[::ffff:127.0.0.1]/", "http://10.1.2.3/", "http://192.168.1.1/", "http://172.16.0.1/",
    "http://192.0.0.192/", "http://100.64.0.1/", "http://240.0.0.1/", "http://0.0.0.0/", "http://8.8.8.8/",
    "http://[2001:4860:4860::8888]/",
])
def test_bare_and_non_public_addresses_are_refused_without_a_lookup(url, resolver):
    with pytest.raises(EgressDenied):
        OPEN.check(url)
    assert resolver[1] == []


@pytest.mark.parametrize("answer", ["127.0.0.1", "10.0.0.5", "169.254.169.254", "::ffff:169.254.169.254",
                                    "::ffff:10.0.0.1", "fd00:ec2::254", "192.0.0.192", "::1", "224.0.0.1"])
def test_a_name_resolving_to_a_non_public_address_is_refused(answer, resolver):
    resolver[0]["evil.example"] = [[answer]]
    with pytest.raises(EgressDenied, match="evil.example"):
        OPEN.check("https://evil.example/x")


def test_every_address_of_a_name_must_be_allowed(resolver):
    resolver[0]["mixed.example"] = [["93.184.216.34", "127.0.0.1"]]
    with pytest.raises(EgressDenied, match="127.0.0.1"):
        OPEN.check("http://mixed.example/")


def test_the_connection_goes_to_the_checked_address_no_second_lookup(resolver):
    """DNS rebinding: the name answers a public address, then 127.0.0.1. The policy looks it up once and
    the request goes to the address it checked, with the name in the Host header and TLS server name."""
    resolver[0]["rebind.example"] = [["93.184.216.34"], ["127.0.0.1"]]
    [target] = OPEN.check("https://user:pw@rebind.example:8443/a/b?q=1")
    assert resolver[1] == ["rebind.example"]
    assert target.url == "https://user:pw@93.184.216.34:8443/a/b?q=1"
    assert (target.host_header, target.sni, target.address) == ("rebind.example:8443", "rebind.example",
                                                                "93.184.216.34")


def test_allow_list(resolver):
    policy = EgressPolicy(hosts=("*.internal.example",), networks=(ipaddress.ip_network("127.0.0.0/8"),
                                                                    ipaddress.ip_network("169.254.0.0/16")))
    resolver[0]["api.internal.example"] = [["10.1.1.1"]]
    assert policy.check("http://api.internal.example/")[0].address == "10.1.1.1"  # an admin-listed name
    assert policy.check("http://127.0.0.1:8080/")[0].url == "http://127.0.0.1:8080/"  # an admin-listed CIDR
    with pytest.raises(EgressDenied, match="never allowed"):  # metadata whatever the allow-list says
        policy.check("http://169.254.169.254/")
    with pytest.raises(EgressDenied, match="never allowed"):
        policy.check("http://[::ffff:169.254.169.254]/")
    resolver[0]["public.example"] = [["93.184.216.34"]]
    with pytest.raises(EgressDenied, match="not in the allowed hosts"):
        policy.check("http://public.example/")
    with pytest.raises(EgressDenied, match="bare IP"):
        policy.check("http://10.1.1.1/")


def test_a_secret_in_a_host_name_is_refused_before_any_lookup(resolver):
    with pytest.raises(EgressDenied, match="secret") as refused:
        OPEN.check("http://tok-abc123.attacker.example/", ["TOK-ABC123"])
    assert resolver[1] == [] and "abc123" not in str(refused.value).lower()


def test_secrets_are_redacted_whatever_their_case():
    text = "cannot resolve tok-abc123.evil: TOK-ABC123 Tok-Abc123 tok%2Fx"
    out = redacted(text, ["TOK-abc123", "tok/x"])
    assert "abc123" not in out.lower() and "tok%2fx" not in out.lower() and out.count("***") == 4


def test_a_trickling_server_cannot_hold_a_request_past_its_deadline(monkeypatch):
    """PGFLOW_HTTP_MAX_TIMEOUT bounds the whole request, not each read: a server sending a byte every
    0.2 s for a minute makes the request fail (it would complete after a minute if each read were bounded)."""

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "300")
            self.end_headers()
            try:
                for _ in range(300):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

    monkeypatch.setenv("PGFLOW_HTTP_ALLOW", "127.0.0.1")
    monkeypatch.setenv("PGFLOW_HTTP_MAX_TIMEOUT", "1")
    settings.reload()
    try:
        with serve_http(Trickle) as url, pytest.raises(http.HttpError, match="deadline"):
            http.request({"url": f"{url}/slow", "method": "GET"}, {}, 1, 1)
    finally:
        monkeypatch.undo()
        settings.reload()
