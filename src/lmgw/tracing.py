"""OpenTelemetry tracing: a span per request and one per stage leg, W3C ``traceparent`` to the
workers.

Optional: ``pip install 'lmgw[tracing]'`` (``opentelemetry-sdk``; the ``otlp`` exporter also
needs ``opentelemetry-exporter-otlp-proto-http``). With ``tracing.enabled`` off nothing here is
imported and the request path pays one ``is None`` test per request and per leg.

Spans are handled explicitly (``start_span`` with an explicit parent context, ``end()`` in
``finally``) rather than through OpenTelemetry's current-span context variable: trio tasks
copy context variables at spawn, and a connection task serves many requests in turn.

* ``lmgw <endpoint>`` (SERVER): the client's request, from arrival to the last byte; its
  parent is the client's ``traceparent`` when it sends one.
* ``lmgw <stage> <worker>`` (CLIENT): one leg on a worker (``encode``, ``prefill``, ``decode``
  or ``generate`` for a merged worker), child of the request span; the worker receives this
  span's ``traceparent`` (and the client's ``tracestate``), so the engine's own spans join
  the same trace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, TracingConfig

if TYPE_CHECKING:
    from .http.types import Headers, Request
    from .workers.worker import Worker

#: leg span names per role
STAGE = {"e": "encode", "p": "prefill", "d": "decode", "pd": "generate"}
_TRACE_HEADERS = (b"traceparent", b"tracestate")


def _import_otel() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        raise ConfigError(
            "tracing.enabled needs OpenTelemetry: pip install 'lmgw[tracing]' (opentelemetry-sdk)",
            path="tracing.enabled",
        ) from None
    return trace


def _provider(cfg: TracingConfig) -> Any:
    """A TracerProvider with the configured exporter, sampler and service name."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        raise ConfigError(
            "tracing.enabled needs the OpenTelemetry SDK: pip install 'lmgw[tracing]'",
            path="tracing.enabled",
        ) from None
    if cfg.exporter == "console":
        exporter: Any = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError(
                "tracing.exporter = 'otlp' needs opentelemetry-exporter-otlp-proto-http"
                " (or set tracing.exporter to 'console' or 'none')",
                path="tracing.exporter",
            ) from None
        exporter = OTLPSpanExporter(endpoint=cfg.endpoint) if cfg.endpoint else OTLPSpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": cfg.service_name}),
        sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
    )
    # the SDK's batch processor exports from its own thread: never on the event loop
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing:
    """Starts request spans. One per Gateway; None there when tracing is off."""

    def __init__(self, tracer_provider: Any = None, cfg: TracingConfig | None = None) -> None:
        trace = _import_otel()
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        cfg = cfg or TracingConfig(enabled=True, exporter="none")
        self._owned = None
        if tracer_provider is None and cfg.exporter != "none":
            tracer_provider = self._owned = _provider(cfg)
        self._trace = trace
        self._tracer = trace.get_tracer("lmgw", tracer_provider=tracer_provider)
        self._propagator = TraceContextTextMapPropagator()
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT

    @classmethod
    def from_config(cls, cfg: TracingConfig, tracer_provider: Any = None) -> Tracing | None:
        """None when ``tracing.enabled`` is off (nothing imported)."""
        if not cfg.enabled and tracer_provider is None:
            return None
        return cls(tracer_provider, cfg)

    def request(self, req: Request, endpoint: str, request_id: str) -> RequestTrace:
        """The span of one client request (child of the client's ``traceparent``, if any)."""
        carrier = {}
        for k, v in req.headers:
            if k in _TRACE_HEADERS:
                carrier[k.decode("latin-1")] = v.decode("latin-1")
        parent = self._propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            f"lmgw {endpoint}",
            context=parent,
            kind=self._server,
            attributes={
                "http.request.method": req.method,
                "url.path": req.path,
                "lmgw.request_id": request_id,
                "client.address": req.client.rpartition(":")[0],
            },
        )
        return RequestTrace(self, span)

    def shutdown(self) -> None:
        """Flush and stop the exporter this object created (not one it was given)."""
        if self._owned is not None:
            self._owned.shutdown()
            self._owned = None


class RequestTrace:
    """A request's span and the legs under it."""

    __slots__ = ("_ctx", "_tracing", "span")

    def __init__(self, tracing: Tracing, span: Any) -> None:
        self._tracing = tracing
        self.span = span
        self._ctx = tracing._trace.set_span_in_context(span)

    def leg(self, role: str, worker: Worker) -> LegTrace:
        t = self._tracing
        span = t._tracer.start_span(
            f"lmgw {STAGE.get(role, role)} {worker.id}",
            context=self._ctx,
            kind=t._client,
            attributes={
                "lmgw.stage": STAGE.get(role, role),
                "lmgw.worker": worker.id,
                "server.address": worker.origin.host,
                "server.port": worker.origin.port,
            },
        )
        return LegTrace(t, span)

    def end(self, status: int, model: str, flow: str) -> None:
        span = self.span
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("gen_ai.request.model", model)
        span.set_attribute("lmgw.flow", flow)
        if status >= 500:
            t = self._tracing._trace
            span.set_status(t.Status(t.StatusCode.ERROR, f"HTTP {status}"))
        span.end()


class LegTrace:
    """One leg's span; :meth:`headers` gives the leg's request headers with its traceparent."""

    __slots__ = ("_tracing", "span")

    def __init__(self, tracing: Tracing, span: Any) -> None:
        self._tracing = tracing
        self.span = span

    def headers(self, base: Headers) -> Headers:
        """``base`` with ``traceparent`` (and ``tracestate``) naming this leg's span."""
        t = self._tracing
        carrier: dict[str, str] = {}
        t._propagator.inject(carrier, context=t._trace.set_span_in_context(self.span))
        out = [h for h in base if h[0] not in _TRACE_HEADERS]
        out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items())
        return out

    def end(self, error: str | None = None) -> None:
        if error is not None:
            t = self._tracing._trace
            self.span.set_status(t.Status(t.StatusCode.ERROR, error))
        self.span.end()
