"""OpenTelemetry tracing, with the optional ``[otel]`` extra (opentelemetry-api and opentelemetry-sdk).

``pgflow.start`` / ``start_many`` open a span, the instance's span, and store its W3C traceparent with the
instances they create (``pgflow.instances.trace_context``); a worker claiming a task of such an instance
runs it inside a span that is a child of it, so every step of the instance joins the trace that was
current around ``start``. Spans are made only in processes that configured a tracer provider (the
OpenTelemetry SDK; for workers, e.g. in a module given to ``pgflow worker --import``): that is the opt-in,
per process. Without one, a start passes on the caller's current context, if any, and a worker does
nothing per task.

Without OpenTelemetry installed nothing is imported and nothing is stored.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

TRACER_NAME = "pgflow"


@functools.cache
def _api() -> tuple[Any, Any] | None:
    """(opentelemetry.trace, a W3C trace-context propagator), or None without the API."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None
    return trace, TraceContextTextMapPropagator()


class StartSpan:
    """The span of one start call and the traceparent its instances keep (None: untraced)."""

    def __init__(self, span: Any = None, traceparent: str | None = None) -> None:
        self.span = span
        self.traceparent = traceparent

    def started(self, ids: list[int]) -> None:
        """Name the instances created in the span."""
        if self.span is not None and self.span.is_recording():
            self.span.set_attribute("pgflow.instance_count", len(ids))
            if len(ids) == 1:
                self.span.set_attribute("pgflow.instance_id", ids[0])


def _configured(trace: Any) -> bool:
    """Whether this process set a tracer provider (else OpenTelemetry's API records nothing)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


@contextmanager
def start_span(flow: str) -> Iterator[StartSpan]:
    """Around a start: the instance span, a child of the current span (a producer span). Without a
    configured tracer provider no span is made; the current span's context, if any, is passed on."""
    api = _api()
    if api is None:
        yield StartSpan()
        return
    trace, propagator = api
    carrier: dict[str, str] = {}
    if not _configured(trace):
        propagator.inject(carrier)
        yield StartSpan(None, carrier.get("traceparent"))
        return
    with trace.get_tracer(TRACER_NAME).start_as_current_span(
            f"pgflow start {flow}", kind=trace.SpanKind.PRODUCER, attributes={"pgflow.flow": flow}) as span:
        propagator.inject(carrier)
        yield StartSpan(span, carrier.get("traceparent"))


class StepTracer:
    """A worker's tracer: one consumer span per task of a traced instance, child of the instance span."""

    def __init__(self, trace: Any, propagator: Any) -> None:
        self._trace = trace
        self._propagator = propagator
        self._tracer = trace.get_tracer(TRACER_NAME)

    @contextmanager
    def span(self, task: Any) -> Iterator[None]:
        """The span of one claimed task (a :class:`pgflow.engine.task.ClaimedTask`), current while it runs."""
        parent = self._propagator.extract({"traceparent": task.trace_context})
        with self._tracer.start_as_current_span(
                f"pgflow step {task.flow}.{task.step}", context=parent,
                kind=self._trace.SpanKind.CONSUMER, attributes={
                    "pgflow.instance_id": task.instance_id, "pgflow.flow": task.flow,
                    "pgflow.step": task.step, "pgflow.task_index": task.task_index,
                    "pgflow.attempt": task.attempt, "pgflow.queue": task.queue}):
            yield

    def failed(self, exc: BaseException, error: str, permanent: bool) -> None:
        """Mark the current task's span as failed (the step's exception is handled, not raised through it)."""
        span = self._trace.get_current_span()
        span.record_exception(exc)
        span.set_attribute("pgflow.retried", not permanent)
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))


def step_tracer() -> StepTracer | None:
    """The worker's tracer, or None (nothing to do per step) unless OpenTelemetry is installed and this
    process has configured a tracer provider."""
    api = _api()
    if api is None:
        return None
    trace, propagator = api
    return StepTracer(trace, propagator) if _configured(trace) else None
