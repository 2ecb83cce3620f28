//! Traces over OTLP (gRPC), configured only by the standard `OTEL_*` variables and off
//! without an endpoint: `tracing` spans of [`TRACE_TARGET`] (a build, its vertices, their
//! phases) become OpenTelemetry spans; every other span stays in the log. W3C trace context
//! (`traceparent`) carries a trace across processes: from the client's `TRACEPARENT` into the
//! build, from the coordinator's vertex span into the worker's phases.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// The target of the spans that are exported. Their fields are the spans' attributes
/// (`otel.name` names a span).
pub const TRACE_TARGET: &str = "kiln::trace";

/// A running exporter: flushes what is left when shut down.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Exports the spans still buffered and stops.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("kilnd: flushing traces: {error}");
        }
    }
}

/// Whether the environment asks for traces: an OTLP endpoint is set, and neither
/// `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` says otherwise.
fn wanted() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let is = |name: &str, value: &str| std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// The exporting layer and its exporter when the environment asks for traces (see
/// [`wanted`]); `instance` is this process's `service.instance.id` (a worker's name), and
/// `service.name` is `kilnd` unless `OTEL_SERVICE_NAME` says otherwise. Call it inside the
/// Tokio runtime (the gRPC exporter runs on it).
pub fn otlp_layer<S>(instance: &str) -> Result<Option<(impl Layer<S>, Traces)>, String>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    if !wanted() {
        return Ok(None);
    }
    for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Ok(protocol) = std::env::var(name)
            && !protocol.trim().is_empty()
            && protocol.trim() != "grpc"
        {
            return Err(format!("{name}={protocol}: kilnd exports traces over OTLP/gRPC only (grpc)"));
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("the OTLP trace exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("kilnd");
    }
    let resource =
        resource.with_attribute(opentelemetry::KeyValue::new("service.instance.id", instance.to_string())).build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer("kiln");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target(TRACE_TARGET, tracing::Level::TRACE));
    Ok(Some((layer, Traces { provider })))
}

/// The span of a vertex's `phase`, under the current span (the vertex's, or one whose
/// parent [`set_parent`] made it).
pub fn phase_span(phase: crate::Phase) -> tracing::Span {
    tracing::info_span!(target: TRACE_TARGET, "phase", otel.name = phase.label(), kiln.phase = phase.label())
}

/// Makes the trace context `traceparent` (W3C, with its `tracestate`) the parent of `span`;
/// a malformed one is ignored (the span starts a trace of its own).
pub fn set_parent(span: &tracing::Span, traceparent: &str, tracestate: &str) {
    if traceparent.is_empty() {
        return;
    }
    let mut carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    if !tracestate.is_empty() {
        carrier.insert("tracestate".to_string(), tracestate.to_string());
    }
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}

/// The W3C trace context of `span` (`traceparent`, `tracestate`), to carry its trace to
/// another process; `None` when it is not traced.
pub fn context_of(span: &tracing::Span) -> Option<(String, String)> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    let traceparent = carrier.remove("traceparent")?;
    Some((traceparent, carrier.remove("tracestate").unwrap_or_default()))
}
