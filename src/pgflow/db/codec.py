"""JSON in and out of the database: orjson for jsonb results, serialization of inputs and outputs under the
payload limit, and many payloads joined into one JSON document per statement."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_loads

from .. import settings
from ..errors import NotSerializable, PayloadTooLarge

JSON_ARRAY_CHARS = 48 * 1024 * 1024  # at most 192 MB of UTF-8: under jsonb's 256 MB cap


def configure(conn: psycopg.Connection) -> psycopg.Connection:
    """Per-connection settings: orjson for jsonb results (several times faster than json)."""
    set_json_loads(orjson.loads, conn)
    return conn


def dumps(value: Any, what: str = "value", default: Any = None) -> str:
    """Serialize an input/output for a jsonb parameter; clear errors for unsupported types and for
    payloads over the limit (never silently truncated)."""
    try:
        blob = orjson.dumps(value, default=default, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        raise NotSerializable(f"{what} is not JSON-serializable: {exc.__cause__ or exc}") from None
    limit = settings.current().max_payload_bytes
    if len(blob) > limit:
        raise PayloadTooLarge(f"{what} is {len(blob):,} bytes, over the {limit:,}-byte limit "
                              "(PGFLOW_MAX_PAYLOAD_BYTES)")
    return blob.decode()


def json_arrays(payloads: list[str], limit: int = JSON_ARRAY_CHARS) -> Iterator[tuple[slice, str]]:
    """Values serialized by :func:`dumps`, joined into JSON array texts for ``pgflow.jsonb_list`` (one
    document per statement is much cheaper to send than a jsonb[] literal), each with the slice of
    ``payloads`` it holds. An array is cut before it passes ``limit`` characters: jsonb refuses documents
    over 256 MB, and payloads may be up to PGFLOW_MAX_PAYLOAD_BYTES each."""
    start, size = 0, 0
    for index, payload in enumerate(payloads):
        if index > start and size + len(payload) > limit:
            yield slice(start, index), "[" + ",".join(payloads[start:index]) + "]"
            start, size = index, 0
        size += len(payload) + 1
    if start < len(payloads):
        yield slice(start, len(payloads)), "[" + ",".join(payloads[start:]) + "]"
