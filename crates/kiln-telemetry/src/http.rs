//! The endpoints on `metrics-listen`: plain HTTP, read-only, counts and states only (no build
//! ids, names or digests), for Prometheus, kubelet probes and autoscalers.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State as Extract};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::{State, metrics};

/// What the endpoints read from the daemon.
pub trait Probe: Send + Sync + 'static {
    /// The state now (queues, workers, builds, the log). Called on every scrape and queue
    /// request: it reads memory only.
    fn state(&self) -> State;

    /// `Ok` while the daemon does its job (a coordinator: a leader is known and builds are
    /// accepted; a worker: registered and not draining); otherwise why not.
    fn ready(&self) -> Result<(), String>;

    /// On a replicated coordinator's follower: the host of the leader, whose queue it is
    /// (`/v1/queue` redirects there, on the same port).
    fn leader_host(&self) -> Option<String> {
        None
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/v1/queue` on `listener` until `stop`
/// resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    probe: Arc<dyn Probe>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    let router = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/v1/queue", get(queue))
        .with_state(Served { probe, port });
    axum::serve(listener, router).with_graceful_shutdown(stop).await
}

/// What the handlers share: the probe, and the port served (a follower's redirect keeps it).
#[derive(Clone)]
struct Served {
    probe: Arc<dyn Probe>,
    port: u16,
}

async fn scrape(Extract(served): Extract<Served>) -> Response {
    // One scrape at a time shows the state and encodes it (another could reset the pools'
    // series in between).
    static SCRAPE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let state = served.probe.state();
    let text = {
        let _scrape = SCRAPE.lock().unwrap_or_else(|p| p.into_inner());
        let metrics = metrics();
        metrics.show(&state);
        metrics.encode()
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn ready(Extract(served): Extract<Served>) -> Response {
    match served.probe.ready() {
        Ok(()) => "ready\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}

/// `?pool=NAME&platform=P` (repeatable, or comma-separated): one pool's load, known even
/// with no worker connected; its `demand` is the autoscaling value. Without `pool`: every
/// platform and every pool with workers connected.
async fn queue(
    Extract(served): Extract<Served>,
    Query(query): Query<Vec<(String, String)>>,
    uri: axum::http::Uri,
) -> Response {
    // Only the leader queues work: an autoscaler asking a follower is sent there, on the
    // port it asked here (every member serves the same).
    if let Some(leader) = served.probe.leader_host() {
        let path = uri.path_and_query().map_or("/v1/queue", |p| p.as_str());
        let host = if leader.contains(':') && !leader.starts_with('[') { format!("[{leader}]") } else { leader };
        let location = format!("http://{host}:{}{path}", served.port);
        return axum::response::Redirect::temporary(&location).into_response();
    }
    let state = served.probe.state();
    let values = |key: &'static str| query.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str());
    match values("pool").next() {
        Some(pool) => {
            let platforms: Vec<String> = values("platform")
                .flat_map(|p| p.split(','))
                .map(str::trim)
                .filter(|p| !p.is_empty())
                // As the daemon names them: linux/arm64/v8 is linux/arm64, linux/arm is linux/arm/v7.
                .map(|p| p.parse::<kiln_types::Platform>().map_or_else(|_| p.to_string(), |p| p.to_string()))
                .collect();
            axum::Json(state.pool(pool, &platforms)).into_response()
        }
        None => axum::Json(state).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{Outcome, PlatformLoad, PoolLoad};

    struct Fixed {
        state: State,
        ready: Mutex<Result<(), String>>,
        leader: Mutex<Option<String>>,
    }

    impl Probe for Fixed {
        fn state(&self) -> State {
            self.state.clone()
        }

        fn ready(&self) -> Result<(), String> {
            self.ready.lock().unwrap().clone()
        }

        fn leader_host(&self) -> Option<String> {
            self.leader.lock().unwrap().clone()
        }
    }

    async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response.split(' ').nth(1).unwrap().parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[tokio::test]
    async fn the_endpoints_show_the_probes_state_and_readiness() {
        let amd64 = PlatformLoad { queued: 7, running: 2, workers: 1, draining: 1, slots_busy: 2, slots_free: 0 };
        let pool =
            PoolLoad { platforms: vec!["linux/amd64".into()], queued: 7, running: 2, workers: 1, slots: 2, demand: 9 };
        let state = State {
            platforms: [("linux/amd64".to_string(), amd64)].into(),
            pools: [("amd".to_string(), pool)].into(),
            builds_running: 3,
            ..State::default()
        };
        let probe = Arc::new(Fixed { state, ready: Mutex::new(Err("no leader".into())), leader: Mutex::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, probe.clone(), async move {
            let _ = stopped.await;
        }));
        metrics().vertices_ended(Outcome::Deduplicated, 1);

        let (status, text) = get(address, "/metrics").await;
        assert_eq!(status, 200);
        for line in [
            "kiln_queue_depth{platform=\"linux/amd64\"} 7",
            "kiln_workers{platform=\"linux/amd64\",state=\"draining\"} 1",
            "kiln_worker_slots{platform=\"linux/amd64\",state=\"busy\"} 2",
            "kiln_builds{state=\"running\"} 3",
            "kiln_builds_total{status=\"cancelled\"} 0",
            "kiln_vertices_total{outcome=\"deduplicated\"} 1",
            "# TYPE kiln_vertex_phase_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line || l.starts_with(line)), "no {line:?} in\n{text}");
        }
        let queue: serde_json::Value = serde_json::from_str(&get(address, "/v1/queue").await.1).unwrap();
        assert_eq!(queue["platforms"]["linux/amd64"]["queued"], 7);
        assert_eq!(queue["pools"]["amd"]["demand"], 9);
        let pool: serde_json::Value =
            serde_json::from_str(&get(address, "/v1/queue?pool=arm&platform=linux%2Farm64").await.1).unwrap();
        assert_eq!((&pool["queued"], &pool["workers"], &pool["demand"]), (&0.into(), &0.into(), &0.into()));
        let pool: serde_json::Value =
            serde_json::from_str(&get(address, "/v1/queue?pool=amd&platform=linux/x86_64").await.1).unwrap();
        assert_eq!((&pool["queued"], &pool["slots"], &pool["demand"]), (&7.into(), &2.into(), &9.into()));
        assert_eq!(get(address, "/healthz").await.0, 200);
        assert_eq!(get(address, "/readyz").await, (503, "not ready: no leader\n".to_string()));
        *probe.ready.lock().unwrap() = Ok(());
        assert_eq!(get(address, "/readyz").await.0, 200);
        assert!(text.contains("kiln_pool_demand{pool=\"amd\"} 9"), "{text}");

        // A follower sends autoscalers to the leader's queue, on the same port.
        *probe.leader.lock().unwrap() = Some("leader.example".into());
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(b"GET /v1/queue?pool=amd HTTP/1.0\r\nHost: follower.example:9090\r\n\r\n").await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.0 307"), "{response}");
        let location = format!("location: http://leader.example:{}/v1/queue?pool=amd\r\n", address.port());
        assert!(response.contains(&location), "{response}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
