//! What tracing costs per vertex: the spans a daemon makes for one executed vertex (the vertex
//! span with its attributes, queue/fetch/execute/export phase spans, the trace context carried
//! to the worker and back) made N times, with the log layer alone and with the OTLP exporter
//! too, exporting to a receiver in this process. Run by `cargo xtask bench` with
//! `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT` and `PORT` as the argument; prints JSON.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use kiln_telemetry::{Phase, TRACE_TARGET, context_of, phase_span, set_parent};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// Vertices per measurement.
const VERTICES: usize = 20_000;

/// Counts the spans it receives.
struct Counter(Arc<AtomicUsize>);

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize =
            request.into_inner().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.0.fetch_add(spans, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// One executed vertex's spans, as the coordinator and a worker make them.
fn vertex(build: &tracing::Span, i: usize) {
    let vertex = tracing::info_span!(
        target: TRACE_TARGET,
        parent: build,
        "vertex",
        otel.name = "[2/3] RUN make",
        otel.status_code = tracing::field::Empty,
        cicd.pipeline.task.name = "[2/3] RUN make",
        cicd.pipeline.task.run.id = i,
        kiln.vertex.digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        kiln.platform = "linux/amd64",
        kiln.worker = tracing::field::Empty,
        kiln.cache = tracing::field::Empty,
        kiln.cache_source = tracing::field::Empty,
    );
    let _entered = vertex.enter();
    drop(phase_span(Phase::Queue));
    // The worker's side: its phases under the assignment's trace context.
    let (traceparent, tracestate) = context_of(&vertex).unwrap_or_default();
    for phase in [Phase::Fetch, Phase::Execute, Phase::Export] {
        let span = phase_span(phase);
        set_parent(&span, &traceparent, &tracestate);
    }
    vertex.record("kiln.cache", "executed").record("kiln.worker", "w1");
}

/// Microseconds per vertex over [`VERTICES`].
fn per_vertex() -> f64 {
    let build = tracing::info_span!(target: TRACE_TARGET, "build", otel.name = "kiln build");
    let started = Instant::now();
    for i in 0..VERTICES {
        vertex(&build, i);
    }
    started.elapsed().as_secs_f64() * 1e6 / VERTICES as f64
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).expect("usage: trace_overhead PORT");
    let received = Arc::new(AtomicUsize::new(0));
    let server =
        tonic::transport::Server::builder().add_service(TraceServiceServer::new(Counter(Arc::clone(&received))));
    tokio::spawn(server.serve(([127, 0, 0, 1], port).into()));
    // The daemon's log layer, writing nowhere: what a vertex costs without traces.
    let log = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(tracing_subscriber::EnvFilter::new("info"))
    };
    let off = tracing::subscriber::with_default(tracing_subscriber::registry().with(log()), per_vertex);
    let (layer, exporter) =
        kiln_telemetry::otlp_layer("bench").expect("the exporter").expect("OTEL_EXPORTER_OTLP_ENDPOINT is set");
    let on = tracing::subscriber::with_default(tracing_subscriber::registry().with(log()).with(layer), per_vertex);
    let flushing = Instant::now();
    tokio::task::spawn_blocking(move || exporter.shutdown()).await.expect("the flush");
    let flush_ms = flushing.elapsed().as_secs_f64() * 1e3;
    let report = serde_json::json!({
        "vertices": VERTICES,
        "off_us": off,
        "on_us": on,
        "overhead_us": on - off,
        "spans_received": received.load(Ordering::Relaxed),
        "spans_made": VERTICES * 5 + 1,
        "flush_ms": flush_ms,
    });
    println!("{report}");
}
