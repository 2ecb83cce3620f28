//! Traces: a real build on a coordinator and a worker, both exporting over OTLP to a receiver
//! the test runs (the OTLP trace service over tonic), under the client's `TRACEPARENT`.

use std::collections::HashMap;
use std::sync::Mutex;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;

use super::*;

/// One span as received, flattened.
#[derive(Debug, Clone)]
struct Received {
    trace: String,
    id: String,
    parent: String,
    name: String,
    attributes: HashMap<String, String>,
    /// The exporting process's `service.instance.id`.
    instance: String,
    start: u64,
    end: u64,
    /// The span's status code (0 unset, 1 ok, 2 error).
    status: i32,
}

impl Received {
    fn attribute(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

/// The OTLP trace service: keeps every span, and says how many it has.
struct Receiver {
    spans: Mutex<Vec<Received>>,
    count: tokio::sync::watch::Sender<usize>,
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// The service over a shared [`Receiver`].
struct Service(Arc<Receiver>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
            let instance = attributes.iter().find(|a| a.key == "service.instance.id").map(|a| text(a.value.as_ref()));
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        trace: hex::encode(&span.trace_id),
                        id: hex::encode(&span.span_id),
                        parent: hex::encode(&span.parent_span_id),
                        name: span.name,
                        attributes: span.attributes.iter().map(|a| (a.key.clone(), text(a.value.as_ref()))).collect(),
                        instance: instance.clone().unwrap_or_default(),
                        start: span.start_time_unix_nano,
                        end: span.end_time_unix_nano,
                        status: span.status.as_ref().map_or(0, |s| s.code),
                    });
                }
            }
        }
        self.0.count.send_replace(spans.len());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[test]
fn a_build_is_one_trace_under_the_clients_traceparent_with_each_workers_phases() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let receiver = Arc::new(Receiver { spans: Mutex::default(), count: tokio::sync::watch::Sender::new(0) });
    // Listening before any daemon starts.
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.33.9:4317")).unwrap();
    let address = listener.local_addr().unwrap();
    let serving =
        tonic::transport::Server::builder().add_service(TraceServiceServer::new(Service(Arc::clone(&receiver))));
    runtime.spawn(serving.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));

    let mut cluster = Cluster::start(33, &[], 2, "");
    cluster.env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), format!("http://{address}")),
        // Spans leave each process within 100 ms rather than the default 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    cluster.restart_coordinator();
    cluster.start_worker("w-traced", 2, "linux/amd64", 2);
    cluster.wait_for_workers(1);

    // A CI job's span: the build's trace continues it.
    let (trace, ci_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let context = cluster.context("traced", "FROM BASE\nRUN echo one > /one\nRUN echo two > /two\n");
    let metadata = cluster.dir.path().join("traced.json");
    let out = cluster
        .kiln(&[
            "build",
            context.to_str().unwrap(),
            "--progress",
            "plain",
            "--metadata-file",
            metadata.to_str().unwrap(),
        ])
        .env("TRACEPARENT", format!("00-{trace}-{ci_span}-01"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", text_of(&out.stderr), cluster.logs());

    // Each process exports on its own schedule: wait for the whole tree (the build, both
    // steps, and each step's four phases).
    let complete = |spans: &[Received]| {
        let Some(build) = spans.iter().find(|s| s.name == "kiln build") else { return false };
        ["RUN echo one", "RUN echo two"].iter().all(|step| {
            spans.iter().filter(|s| s.parent == build.id && s.name.contains(step)).any(|vertex| {
                ["queue", "fetch", "execute", "export"]
                    .iter()
                    .all(|phase| spans.iter().any(|s| s.parent == vertex.id && s.name == *phase))
            })
        })
    };
    runtime.block_on(async {
        let mut count = receiver.count.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if complete(&receiver.spans.lock().unwrap()) {
                    return;
                }
                count.changed().await.unwrap();
            }
        });
        waited.await.unwrap_or_else(|_| panic!("spans received: {:#?}", receiver.spans.lock().unwrap()));
    });
    let spans = receiver.spans.lock().unwrap().clone();
    assert!(spans.iter().all(|s| s.trace == trace), "every span is in the CI job's trace: {spans:#?}");
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.id.as_str(), s)).collect();

    let [build] = spans.iter().filter(|s| s.name == "kiln build").collect::<Vec<_>>()[..] else {
        panic!("one build span: {spans:#?}")
    };
    assert_eq!(build.parent, ci_span, "the build's parent is the client's span");
    let metadata = read_json(&metadata);
    assert_eq!(build.attribute("cicd.pipeline.run.id"), metadata["build_id"].as_str().unwrap());
    assert_eq!((build.status, build.attribute("kiln.build.status")), (1, "succeeded"), "{build:?}");

    for (step, file) in [("RUN echo one", "one"), ("RUN echo two", "two")] {
        let vertex = spans
            .iter()
            .find(|s| s.parent == build.id && s.name.contains(step))
            .unwrap_or_else(|| panic!("no span for {step} under the build: {spans:#?}"));
        let record = record(&metadata, step);
        assert_eq!(vertex.attribute("kiln.vertex.digest"), record["digest"].as_str().unwrap());
        assert_eq!(vertex.attribute("cicd.pipeline.task.name"), record["name"].as_str().unwrap());
        assert_eq!((vertex.attribute("kiln.worker"), vertex.attribute("kiln.cache")), ("w-traced", "executed"));
        let children: Vec<&Received> = spans.iter().filter(|s| s.parent == vertex.id).collect();
        // The queue on the coordinator; fetch, execute and export on the worker that ran it.
        assert_eq!(children.len(), 4, "{step}: {children:#?}");
        for (phase, instance) in
            [("queue", "coordinator"), ("fetch", "w-traced"), ("execute", "w-traced"), ("export", "w-traced")]
        {
            let [span] = children.iter().filter(|s| s.name == phase).collect::<Vec<_>>()[..] else {
                panic!("not one {phase} span under {step}: {children:#?}")
            };
            assert!(span.instance.starts_with(instance), "{phase} from {}", span.instance);
            assert!(vertex.start <= span.start && span.end <= vertex.end, "{phase} inside {step}: {span:?} {vertex:?}");
        }
        assert!(by_id.contains_key(vertex.parent.as_str()), "{file}: its parent was exported");
    }

    // Built again: the steps are cached, each still one span of the new build's trace.
    let second_ci_span = "1111111111111111";
    let again = cluster
        .kiln(&["build", context.to_str().unwrap(), "--progress", "plain"])
        .env("TRACEPARENT", format!("00-{trace}-{second_ci_span}-01"))
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", text_of(&again.stderr));
    let second = |spans: &[Received]| {
        let build = spans.iter().find(|s| s.name == "kiln build" && s.parent == second_ci_span)?.clone();
        let steps: Vec<Received> = spans.iter().filter(|s| s.parent == build.id).cloned().collect();
        (steps.iter().filter(|s| s.name.contains("RUN echo")).count() >= 2).then_some((build, steps))
    };
    let (build, steps) = runtime.block_on(async {
        let mut count = receiver.count.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Some(found) = second(&receiver.spans.lock().unwrap()) {
                    return found;
                }
                count.changed().await.unwrap();
            }
        });
        waited.await.unwrap_or_else(|_| panic!("no second build's spans: {:#?}", receiver.spans.lock().unwrap()))
    });
    let spans = receiver.spans.lock().unwrap().clone();
    for step in ["RUN echo one", "RUN echo two"] {
        let [span] = steps.iter().filter(|s| s.name.contains(step)).collect::<Vec<_>>()[..] else {
            panic!("not one span of {step} under {build:?}: {steps:#?}")
        };
        assert_eq!(span.attribute("kiln.cache"), "cached", "{span:?}");
        assert!(!spans.iter().any(|s| s.parent == span.id), "a cached step has no phases: {spans:#?}");
    }
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
