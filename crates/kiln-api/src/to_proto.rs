//! Domain events and results into proto messages.

use kiln_engine::{BuildFailure, BuildSummary, Progress};
use kiln_proto::v1::{self, build_event::Event};
use kiln_solver::{LogStream, Status, VertexRecord};

pub(crate) fn record(record: &VertexRecord) -> v1::VertexRecord {
    v1::VertexRecord {
        digest: record.digest.to_string(),
        name: record.name.clone(),
        kind: record.kind.clone(),
        stage: record.stage.clone().unwrap_or_default(),
        status: match record.status {
            Status::Executed => "executed",
            Status::Cached => "cached",
            Status::Deduplicated => "deduplicated",
            Status::Skipped => "skipped",
            Status::Failed => "failed",
        }
        .to_string(),
        worker: record.worker.clone().unwrap_or_default(),
        platform: record.platform.clone().unwrap_or_default(),
        started: record.started.unwrap_or(0),
        completed: record.completed.unwrap_or(0),
    }
}

pub(crate) fn progress(progress: Progress) -> v1::BuildEvent {
    let event = match progress {
        Progress::Planned { vertices } => {
            Event::Planned(v1::Planned { vertices: vertices.iter().map(record).collect() })
        }
        Progress::Started { vertex, at } => Event::Started(v1::VertexStarted { digest: vertex.to_string(), at }),
        Progress::Log { vertex, line } => Event::Log(v1::VertexLog {
            digest: vertex.to_string(),
            stderr: line.stream == LogStream::Stderr,
            line: line.line,
        }),
        Progress::Completed { record: r, error } => {
            Event::Completed(v1::VertexCompleted { record: Some(record(&r)), error: error.unwrap_or_default() })
        }
        Progress::Export { name, started, completed } => {
            Event::Export(v1::ExportStep { name, started, completed: completed.unwrap_or(0) })
        }
    };
    v1::BuildEvent { event: Some(event) }
}

pub(crate) fn result(result: Result<BuildSummary, BuildFailure>) -> v1::BuildResult {
    match result {
        Ok(summary) => v1::BuildResult {
            ok: true,
            error: String::new(),
            image_digest: summary.image.map(|d| d.to_string()).unwrap_or_default(),
            records: summary.records.iter().map(record).collect(),
        },
        Err(failure) => v1::BuildResult {
            ok: false,
            error: failure.message,
            image_digest: String::new(),
            records: failure.records.iter().map(record).collect(),
        },
    }
}
