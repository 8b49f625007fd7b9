"""Tracing: the only module that touches the OpenTelemetry SDK. Nothing global is set at import.

Tracing is on when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and ``OTEL_SDK_DISABLED`` is not ``true``; otherwise every
span is a no-op and costs next to nothing. Spans leave through a bounded batch processor on a
background thread: a dead collector drops spans, it never slows or stops task processing.

Spans follow the OpenTelemetry messaging conventions: ``publish <destination>`` (PRODUCER) around a
publish, with the W3C ``traceparent`` injected into the message headers, and ``process <destination>``
(CONSUMER) around handling a message, parented on the ``traceparent`` it carries. One trace per
workflow: the submission's span (or the client's own trace) is the root; each task attempt is a span
under the publish that released it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "MAX_LINKS",
    "Context",
    "Span",
    "SpanKind",
    "SpanLink",
    "Telemetry",
    "messaging_attributes",
    "tracing_configured",
]

#: A link to another span: its W3C ``traceparent`` and the link's attributes.
SpanLink = tuple[str, Mapping[str, Any]]
#: Links a span carries at most (the SDK's own default limit is 128).
MAX_LINKS = 64

log = logging.getLogger("fabric.telemetry")

_PROPAGATOR = TraceContextTextMapPropagator()
#: Spans waiting for export at most; beyond, new spans are dropped (never blocks).
_MAX_QUEUE = 8192


#: The tracer provider of the fabric span current in this context: handler spans made with the plain
#: OpenTelemetry API go to it, under the attempt span.
_ACTIVE: ContextVar[Any] = ContextVar("fabric_tracer_provider", default=None)


class _ContextTracer(trace.Tracer):
    """A tracer that starts spans with the provider of the fabric span current in its context (a no-op
    outside one)."""

    def __init__(self, name: str, version: str | None, schema_url: str | None) -> None:
        self._scope = (name, version, schema_url)

    def _target(self) -> trace.Tracer:
        provider = _ACTIVE.get()
        if provider is None:
            return trace.NoOpTracer()
        name, version, schema_url = self._scope
        tracer: trace.Tracer = provider.get_tracer(name, version, schema_url)
        return tracer

    def start_span(self, *args: Any, **kwargs: Any) -> Span:
        return self._target().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._target().start_as_current_span(*args, **kwargs)


class _ContextTracerProvider(trace.TracerProvider):
    """The global provider fabric installs when tracing is on (and nobody installed one): a handler's
    ``trace.get_tracer(__name__)`` then records into its worker's pipeline."""

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> trace.Tracer:
        return _ContextTracer(instrumenting_module_name, instrumenting_library_version, schema_url)


def _install_global_provider() -> None:
    """Make the plain OpenTelemetry API record handler spans (once per process, and never over a
    provider the application installed itself)."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(_ContextTracerProvider())


def tracing_configured() -> bool:
    """True when the standard OTEL_* variables ask for traces to be exported."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


class Telemetry:
    """A tracer for one fabric process.

    Args:
        service_name: ``service.name`` of the spans (``OTEL_SERVICE_NAME`` wins when set).
        exporter: a span exporter; by default the OTLP/HTTP exporter configured by ``OTEL_*``.
        enabled: force tracing on or off; by default on when an OTLP endpoint is configured.

    Example:
        >>> telemetry = Telemetry("fabric-router")
        >>> with telemetry.span("process fabric.router.submit", SpanKind.CONSUMER, {}):
        ...     pass
    """

    def __init__(self, service_name: str, *, exporter: Any = None, enabled: bool | None = None) -> None:
        self.enabled = tracing_configured() if enabled is None else enabled
        self._provider: Any = None
        if not self.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(timeout=5)
        name = os.environ.get("OTEL_SERVICE_NAME") or service_name
        self._provider = TracerProvider(resource=Resource.create({"service.name": name}))
        self._provider.add_span_processor(
            BatchSpanProcessor(
                exporter, max_queue_size=_MAX_QUEUE, schedule_delay_millis=500, export_timeout_millis=5000
            )
        )
        self.tracer = self._provider.get_tracer("fabric")
        _install_global_provider()
        log.info("tracing on: spans of %s exported over OTLP", name)

    def shutdown(self) -> None:
        """Flush what can be flushed quickly and stop the exporter thread."""
        if self._provider is not None:
            self._provider.force_flush(timeout_millis=3000)
            self._provider.shutdown()

    @contextmanager
    def span(
        self,
        name: str,
        kind: SpanKind,
        attributes: Mapping[str, Any],
        *,
        parent: Context | None = None,
        links: Sequence[SpanLink] = (),
    ) -> Iterator[Span]:
        """A span made current for its block; an exception escaping it is recorded as its error.

        ``links``: spans this one follows from without being their child, as ``(traceparent,
        attributes)`` (an unreadable traceparent is left out).
        """
        if not self.enabled:
            yield trace.INVALID_SPAN  # tracing off: no span, no context switch
            return
        span_links = [link for link in (_link(tp, attrs) for tp, attrs in links[:MAX_LINKS]) if link]
        token = _ACTIVE.set(self._provider)
        try:
            with self.tracer.start_as_current_span(
                name,
                context=parent,
                kind=kind,
                attributes=dict(attributes),
                links=span_links,
                record_exception=True,
            ) as span:
                yield span
        finally:
            _ACTIVE.reset(token)

    def current(self) -> str | None:
        """The W3C ``traceparent`` of the current span: what a record keeps to link to it or to publish
        under it later (None when tracing is off or no span is current)."""
        if not self.enabled:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get("traceparent")

    def traceparent(self, headers: Mapping[str, Any] | None) -> str | None:
        """The ``traceparent`` header as text (None when absent, or tracing is off)."""
        if not self.enabled or not headers:
            return None
        value = headers.get("traceparent")
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def context(self, traceparent: str | None) -> Context | None:
        """A parent context from a stored ``traceparent`` (None for none, or when tracing is off)."""
        if not self.enabled or not traceparent:
            return None
        return _PROPAGATOR.extract({"traceparent": traceparent})

    def extract(self, headers: Mapping[str, Any] | None) -> Context | None:
        """The W3C trace context carried in message headers (None when there is none, or tracing is off)."""
        if not self.enabled or not headers or "traceparent" not in headers:
            return None
        carrier = {
            k: (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in headers.items()
            if k in ("traceparent", "tracestate")
        }
        return _PROPAGATOR.extract(carrier)

    @staticmethod
    def inject(headers: MutableMapping[str, Any], context: Context | None = None) -> None:
        """Write the current (or given) span's W3C trace context into message headers."""
        _PROPAGATOR.inject(headers, context=context)

    @staticmethod
    def failed(span: Span, error_type: str, message: str) -> None:
        """Mark a span failed without an exception object (a handler error reported as an outcome)."""
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"))


def _link(traceparent: str, attributes: Mapping[str, Any]) -> Link | None:
    context = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
    return Link(context, dict(attributes)) if context.is_valid else None


def messaging_attributes(destination: str, operation: str, **fabric: Any) -> dict[str, Any]:
    """Attributes of the messaging conventions plus ``fabric.*`` ones (None values left out)."""
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": destination,
        "messaging.operation.type": operation,
    }
    for key, value in fabric.items():
        if value is not None:
            attributes[f"fabric.{key.replace('_', '.')}"] = value
    return attributes
