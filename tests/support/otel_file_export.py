"""Tracing set-up for `pgflow worker --import support.otel_file_export` in tests: the OpenTelemetry SDK, with its
console exporter writing each finished span as one JSON line to the file named by $PGFLOW_TEST_SPANS, so
that a test can read the spans of worker processes (the in-memory exporter only works in-process)."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

_spans = open(os.environ["PGFLOW_TEST_SPANS"], "a", buffering=1)  # noqa: SIM115 - open for the process's life
_provider = TracerProvider(resource=Resource.create({"service.name": "pgflow-test-worker"}))
_provider.add_span_processor(SimpleSpanProcessor(
    ConsoleSpanExporter(out=_spans, formatter=lambda span: span.to_json(indent=None) + "\n")))
trace.set_tracer_provider(_provider)
