//! The build history's web UI, served on `web-listen` (docs/web.md). Pages are one embedded
//! HTML shell with embedded script and style (no CDN, no build step); the script reads the
//! JSON API and re-reads what changed when the server-sent event stream says so:
//!
//! - `/` the builds, `/builds/ID` a build's timeline, `/workers` the workers, `/cluster` the
//!   queues over time, the cache's hit rate and what deduplication saved;
//! - `/api/builds`, `/api/builds/ID` (entry and vertex records), `/api/builds/ID/logs/VERTEX`,
//!   `/api/workers` (with the steps each runs), `/api/cluster`;
//! - `/api/events`: `builds` events when the list changed, `build` events when a build
//!   progressed.
//!
//! The daemon supplies the data through [`Backend`]; the queues are sampled here every
//! [`SAMPLE_EVERY`], the last [`SAMPLES`] kept.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use futures_util::Stream;
use kiln_model::{BuildChange, BuildEntry, Caller, Role, RunningStep, StepLog, VertexRecord, WorkerStatus};
use kiln_types::Digest;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// What the web UI shows, from the daemon. Reads may block (the store): they run on
/// blocking threads.
pub trait Backend: Send + Sync + 'static {
    /// Who presents `token` (`None`: no token): the daemon's client tokens decide, as they
    /// do for its API; `None` refuses.
    fn caller(&self, token: Option<&str>) -> Option<Caller>;
    /// Every build of the history, oldest first.
    fn builds(&self) -> Result<Vec<BuildEntry>, String>;
    /// One build with its vertex records, if the history has it.
    fn build(&self, id: &str) -> Result<Option<(BuildEntry, Vec<VertexRecord>)>, String>;
    /// A step's kept output.
    fn logs(&self, id: &str, vertex: &Digest) -> Result<Option<StepLog>, String>;
    /// The workers (a standalone daemon's own).
    fn workers(&self) -> Vec<WorkerStatus>;
    /// The steps the workers run now.
    fn running(&self) -> Vec<RunningStep>;
    /// Each platform's queue now (cheap: it is sampled on the async threads).
    fn queues(&self) -> BTreeMap<String, Queue>;
    /// The execution time (ms) build `id`'s deduplicated steps did not spend.
    fn saved_ms(&self, id: &str) -> Result<u64, String>;
    /// The builds as they change.
    fn watch(&self) -> broadcast::Receiver<BuildChange>;
}

/// A platform's queue at a moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queue {
    /// Steps waiting for a slot.
    pub queued: u64,
    /// Steps running.
    pub running: u64,
}

/// How often the queues are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept: the last half hour.
pub const SAMPLES: usize = 900;

/// The queues' samples, oldest first: when (ms since the epoch), and each platform's queue.
#[derive(Default)]
struct Samples(Mutex<VecDeque<(u64, BTreeMap<String, Queue>)>>);

impl Samples {
    fn push(&self, at: u64, queues: BTreeMap<String, Queue>) {
        let mut samples = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back((at, queues));
    }

    fn to_json(&self) -> Value {
        let samples = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let json = samples.iter().map(|(at, queues)| {
            let platforms: serde_json::Map<String, Value> = queues
                .iter()
                .map(|(platform, q)| (platform.clone(), json!({"queued": q.queued, "running": q.running})))
                .collect();
            json!({"at": at, "platforms": platforms})
        });
        Value::Array(json.collect())
    }
}

/// Samples `backend`'s queues into `samples` every [`SAMPLE_EVERY`], for ever.
async fn sample(backend: Arc<dyn Backend>, samples: Arc<Samples>) -> Infallible {
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        samples.push(kiln_types::now_ms(), backend.queues());
    }
}

const PAGE: &str = include_str!("../assets/index.html");
const SCRIPT: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/app.css");

/// Serves the UI on `listener` until `stop`, sampling the queues meanwhile.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn Backend>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let samples = Arc::new(Samples::default());
    let sampling = sample(Arc::clone(&backend), Arc::clone(&samples));
    let serving = axum::serve(listener, router(backend, samples)).with_graceful_shutdown(stop);
    tokio::select! {
        served = serving => served,
        never = sampling => match never {},
    }
}

/// The UI's routes.
fn router(backend: Arc<dyn Backend>, samples: Arc<Samples>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/builds/{id}", get(page))
        .route("/workers", get(page))
        .route("/cluster", get(page))
        .route("/login", get(page))
        .route("/api/login", axum::routing::post(login))
        .route("/assets/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT) }))
        .route("/assets/app.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }))
        .route("/api/builds", get(builds))
        .route("/api/builds/{id}", get(build))
        .route("/api/builds/{id}/logs/{vertex}", get(logs))
        .route("/api/workers", get(workers))
        .route("/api/cluster", get(cluster))
        .route("/api/events", get(events))
        .layer(Extension(samples))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&backend), authenticate))
        .with_state(backend)
}

/// The cookie a login sets.
const COOKIE: &str = "kiln_token";

/// The token a request presents: `Authorization: Bearer`, else the login's cookie.
fn token(headers: &HeaderMap) -> Option<String> {
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()?.strip_prefix("Bearer ").map(str::to_string));
    bearer.or_else(|| {
        headers.get_all(header::COOKIE).iter().filter_map(|h| h.to_str().ok()).flat_map(|h| h.split(';')).find_map(
            |pair| pair.trim().strip_prefix(COOKIE).and_then(|rest| rest.strip_prefix('=')).map(str::to_string),
        )
    })
}

/// Lets through the login page, its API and the assets; every other request needs a caller
/// (a page without one goes to the login, an API call is refused).
async fn authenticate(State(backend): State<Arc<dyn Backend>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if ["/login", "/api/login", "/assets/app.js", "/assets/app.css"].contains(&path) {
        return next.run(request).await;
    }
    match backend.caller(token(request.headers()).as_deref()) {
        Some(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        None if path.starts_with("/api/") => {
            (StatusCode::UNAUTHORIZED, "a token is needed: log in at /login").into_response()
        }
        None => Redirect::to("/login").into_response(),
    }
}

/// `{"token": "..."}`: a known token is kept in a cookie for the pages.
async fn login(State(backend): State<Arc<dyn Backend>>, axum::Json(body): axum::Json<Value>) -> Response {
    let token = body["token"].as_str().unwrap_or_default();
    if token.is_empty() || token.contains([';', ' ', '\r', '\n']) || backend.caller(Some(token)).is_none() {
        return (StatusCode::UNAUTHORIZED, "unknown token").into_response();
    }
    let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response()
}

/// Whether `caller` may see `entry`: its tenant's builds, an admin's all.
fn visible(caller: &Caller, entry: &BuildEntry) -> bool {
    caller.role == Role::Admin || entry.tenant == caller.tenant
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE)
}

/// Runs a backend read on a blocking thread; its error is a 500 naming it.
async fn read<T: Send + 'static>(
    backend: Arc<dyn Backend>,
    read: impl FnOnce(&dyn Backend) -> Result<T, String> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(move || read(backend.as_ref())).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err((StatusCode::INTERNAL_SERVER_ERROR, error).into_response()),
        Err(error) => Err((StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()),
    }
}

fn entry_json(entry: &BuildEntry) -> Value {
    json!({
        "id": entry.id,
        "status": entry.status,
        "started": entry.started,
        "completed": entry.completed,
        "target": entry.target,
        "platforms": entry.platforms,
        "counts": entry.counts,
        "error": entry.error,
        "file_name": entry.request.file_name,
        "submitted_by": entry.request.submitted_by,
    })
}

async fn builds(State(backend): State<Arc<dyn Backend>>, Extension(caller): Extension<Caller>) -> Response {
    match read(backend, |b| b.builds()).await {
        Ok(builds) => {
            let shown = builds.iter().rev().filter(|e| visible(&caller, e)).map(entry_json).collect();
            axum::Json(Value::Array(shown)).into_response()
        }
        Err(response) => response,
    }
}

async fn build(
    State(backend): State<Arc<dyn Backend>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let wanted = id.clone();
    match read(backend, move |b| b.build(&wanted)).await {
        Ok(Some((entry, records))) if visible(&caller, &entry) => {
            let mut json = entry_json(&entry);
            json["dockerfile"] = entry.request.dockerfile.clone().into();
            json["vertices"] = serde_json::to_value(&records).unwrap_or_default();
            axum::Json(json).into_response()
        }
        Ok(_) => (StatusCode::NOT_FOUND, format!("build {id}: not in the history")).into_response(),
        Err(response) => response,
    }
}

async fn logs(
    State(backend): State<Arc<dyn Backend>>,
    Extension(caller): Extension<Caller>,
    Path((id, vertex)): Path<(String, String)>,
) -> Response {
    let Ok(digest) = vertex.parse::<Digest>() else {
        return (StatusCode::BAD_REQUEST, format!("{vertex:?} is not a vertex digest")).into_response();
    };
    let logs = move |b: &dyn Backend| {
        let shown = b.build(&id)?.is_some_and(|(entry, _)| visible(&caller, &entry));
        if shown { b.logs(&id, &digest) } else { Ok(None) }
    };
    match read(backend, logs).await {
        Ok(log) => {
            let log = log.unwrap_or_default();
            let lines: Vec<Value> = log.lines.iter().map(|l| json!({"stream": l.stream, "line": l.line})).collect();
            axum::Json(json!({"lines": lines, "dropped": log.dropped})).into_response()
        }
        Err(response) => response,
    }
}

/// The workers as `kiln workers --format json` lists them, each with the steps it runs
/// (`steps`: `name`, `vertex`, `since`).
async fn workers(State(backend): State<Arc<dyn Backend>>, Extension(caller): Extension<Caller>) -> Response {
    if caller.role != Role::Admin {
        return (StatusCode::FORBIDDEN, "the workers are an admin's to see").into_response();
    }
    match read(backend, |b| Ok((b.workers(), b.running()))).await {
        Ok((workers, running)) => {
            let json = workers.iter().map(|worker| {
                let mut json = worker.to_json();
                let steps = running
                    .iter()
                    .filter(|step| step.worker == worker.info.name)
                    .map(|step| json!({"name": step.name, "vertex": step.vertex.to_string(), "since": step.since}));
                json["steps"] = Value::Array(steps.collect());
                json
            });
            axum::Json(Value::Array(json.collect())).into_response()
        }
        Err(response) => response,
    }
}

/// The cluster at a glance: over the builds the caller sees, their steps by outcome, the
/// share answered by the cache, and the execution time deduplication saved; for an admin,
/// each platform's queue over the last [`SAMPLES`] samples.
async fn cluster(
    State(backend): State<Arc<dyn Backend>>,
    Extension(caller): Extension<Caller>,
    Extension(samples): Extension<Arc<Samples>>,
) -> Response {
    let admin = caller.role == Role::Admin;
    let summary = move |b: &dyn Backend| {
        let builds: Vec<BuildEntry> = b.builds()?.into_iter().filter(|e| visible(&caller, e)).collect();
        let mut steps = kiln_model::BuildCounts::default();
        let mut saved_ms = 0;
        for entry in &builds {
            steps.executed += entry.counts.executed;
            steps.cached += entry.counts.cached;
            steps.deduplicated += entry.counts.deduplicated;
            steps.failed += entry.counts.failed;
            if entry.counts.deduplicated > 0 && entry.completed.is_some() {
                // One build's unreadable journal leaves the others' savings shown.
                match b.saved_ms(&entry.id) {
                    Ok(ms) => saved_ms += ms,
                    Err(error) => tracing::warn!("build {}: its deduplication savings: {error}", entry.id),
                }
            }
        }
        Ok((builds.len(), steps, saved_ms))
    };
    match read(backend, summary).await {
        Ok((builds, steps, saved_ms)) => {
            let total = steps.executed + steps.cached + steps.deduplicated + steps.failed;
            let rate = |n: u64| if total == 0 { Value::Null } else { json!(n as f64 / total as f64) };
            axum::Json(json!({
                "builds": builds,
                "steps": steps,
                "cache_hit_rate": rate(steps.cached),
                "dedup_rate": rate(steps.deduplicated),
                "dedup_saved_ms": saved_ms,
                "sample_every_ms": SAMPLE_EVERY.as_millis() as u64,
                "queues": if admin { samples.to_json() } else { Value::Null },
            }))
            .into_response()
        }
        Err(response) => response,
    }
}

/// The caller's builds as they change: `builds` when one began, ended or went (the list
/// changed), `build` when one progressed, each with its id; `reload` when the browser fell
/// behind and should read everything again.
async fn events(
    State(backend): State<Arc<dyn Backend>>,
    Extension(caller): Extension<Caller>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = backend.watch();
    let stream = futures_util::stream::unfold((changes, caller), |(mut changes, caller)| async move {
        let event = loop {
            match changes.recv().await {
                Ok(change) if caller.role == Role::Admin || change.tenant == caller.tenant => {
                    break Event::default().event(if change.listed { "builds" } else { "build" }).data(change.id);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => break Event::default().event("reload").data(""),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        };
        Some((Ok(event), (changes, caller)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
