//! The raft members of a replicated coordinator in one process, for the benchmarks and the
//! snapshot test (`tests/snapshots.rs`): each on
//! its own sled directory (synced, as in `kilnd`) and serving the raft service over gRPC on
//! 127.0.0.ID, the way separate coordinators do. A member can be stopped at once (its server
//! and node stopped, its store closed) and started again on the same directory and address.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_kv::SharedKv;
use kiln_raft::{KvMachine, Node, RaftConfig};
use kiln_solver::CACHE_TREE;

/// One running member.
pub struct Member {
    /// Its raft node.
    pub node: Arc<Node>,
    /// Its store (the log and the replicated trees).
    #[allow(dead_code)] // the dispatch benchmark writes through it; the failover one does not
    pub kv: SharedKv,
    server: tokio::task::JoinHandle<()>,
}

/// Every member, running or killed.
pub struct Members {
    peers: BTreeMap<u64, String>,
    dirs: tempfile::TempDir,
    running: BTreeMap<u64, Member>,
    tune: fn(&mut RaftConfig),
}

impl Members {
    /// `count` members, started.
    #[allow(dead_code)] // the snapshot test tunes its members
    pub async fn start(count: u64) -> Members {
        Members::start_tuned(count, |_| {}).await
    }

    /// `count` members, started, each one's configuration changed by `tune`.
    pub async fn start_tuned(count: u64, tune: fn(&mut RaftConfig)) -> Members {
        let mut listeners = Vec::new();
        let mut peers = BTreeMap::new();
        for id in 1..=count {
            let listener = tokio::net::TcpListener::bind(format!("127.0.0.{id}:0")).await.unwrap();
            peers.insert(id, format!("http://{}", listener.local_addr().unwrap()));
            listeners.push((id, listener));
        }
        let mut members = Members { peers, dirs: tempfile::tempdir().unwrap(), running: BTreeMap::new(), tune };
        for (id, listener) in listeners {
            members.run(id, listener);
        }
        members
    }

    fn run(&mut self, id: u64, listener: tokio::net::TcpListener) {
        let kv: SharedKv = Arc::new(kiln_kv::SledKv::open(&self.dirs.path().join(id.to_string())).unwrap());
        let slot: kiln_client::NodeSlot = Arc::default();
        let links = kiln_client::RaftLinks::start(id, &self.peers, None, &slot).map_err(|(_, e)| e).unwrap();
        let machine = KvMachine::new(Arc::clone(&kv), &[CACHE_TREE]).unwrap();
        let mut config = RaftConfig::new(id, self.peers.keys().copied().collect());
        (self.tune)(&mut config);
        let node = Arc::new(Node::start(config, Arc::clone(&kv), machine, links).unwrap());
        let _ = slot.set(Arc::downgrade(&node));
        let replication = Arc::new(kiln_api::Replication::new(Arc::clone(&node), self.peers.clone()));
        let services = kiln_api::Services {
            raft: Some(kiln_api::RaftService::new(replication)),
            access: kiln_api::Access::tcp(false, Vec::new()),
            ..kiln_api::Services::default()
        };
        let server = tokio::spawn(async move {
            let _ = kiln_api::serve_tcp(services, listener, std::future::pending()).await;
        });
        self.running.insert(id, Member { node, kv, server });
    }

    /// The running member `id`.
    pub fn member(&self, id: u64) -> &Member {
        &self.running[&id]
    }

    /// Waits until a running member other than `not` leads, and returns it.
    pub async fn leader(&self, not: Option<u64>) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let leading = self.running.iter().find(|(id, m)| Some(**id) != not && m.node.status().is_leader());
            if let Some((id, _)) = leading {
                return *id;
            }
            assert!(tokio::time::Instant::now() < deadline, "no leader within 30 s");
            let any = self.running.values().next().expect("a member runs");
            let _ = tokio::time::timeout(Duration::from_millis(20), any.node.subscribe().changed()).await;
        }
    }

    /// Stops member `id` at once: its server stops answering and its node stops. Unlike a
    /// SIGKILL, its store is closed cleanly; for the others it is gone all the same.
    pub async fn kill(&mut self, id: u64) {
        let member = self.running.remove(&id).expect("a running member");
        member.server.abort();
        let _ = member.server.await;
        let node = member.node;
        tokio::task::spawn_blocking(move || node.stop()).await.unwrap();
    }

    /// Starts member `id` again on its directory and address.
    pub async fn restart(&mut self, id: u64) {
        let address = self.peers[&id].trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind(&address).await.unwrap();
        self.run(id, listener);
    }
}
