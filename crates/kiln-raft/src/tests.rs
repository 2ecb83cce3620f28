//! Members in one process, their messages carried by a table that can cut a member off.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use kiln_kv::SharedKv;

use crate::{Node, RaftConfig, RaftError, StateMachine, Status, Transport};

/// How long any one wait may take before the test fails (a bound, never a pace).
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Net {
    nodes: Mutex<HashMap<u64, Weak<Node>>>,
    cut: Mutex<HashSet<u64>>,
}

struct Link {
    from: u64,
    net: Arc<Net>,
}

impl Transport for Link {
    fn send(&self, to: u64, messages: Vec<Vec<u8>>, _snapshot: bool) {
        let cut = self.net.cut.lock().unwrap();
        if cut.contains(&self.from) || cut.contains(&to) {
            return;
        }
        drop(cut);
        let node = self.net.nodes.lock().unwrap().get(&to).and_then(Weak::upgrade);
        if let Some(node) = node {
            node.receive(self.from, &messages).unwrap();
        }
    }
}

/// The state machine of the tests: the entries applied, in order.
#[derive(Clone, Default)]
struct Applied(Arc<Mutex<AppliedState>>);

#[derive(Default)]
struct AppliedState {
    entries: Vec<(u64, Vec<u8>)>,
    applied: u64,
    restored_at: Option<u64>,
}

impl StateMachine for Applied {
    fn apply(&mut self, index: u64, data: &[u8]) -> Result<(), String> {
        let mut state = self.0.lock().unwrap();
        state.entries.push((index, data.to_vec()));
        state.applied = index;
        Ok(())
    }

    fn applied_through(&mut self, _: u64) -> Result<(), String> {
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, String> {
        let state = self.0.lock().unwrap();
        let mut bytes = Vec::new();
        for (index, data) in &state.entries {
            bytes.extend_from_slice(&index.to_be_bytes());
            bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
            bytes.extend_from_slice(data);
        }
        Ok(bytes)
    }

    fn restore(&mut self, index: u64, mut data: &[u8]) -> Result<(), String> {
        let mut entries = Vec::new();
        while !data.is_empty() {
            let (head, rest) = data.split_at(12);
            let length = u32::from_be_bytes(head[8..].try_into().unwrap()) as usize;
            entries.push((u64::from_be_bytes(head[..8].try_into().unwrap()), rest[..length].to_vec()));
            data = &rest[length..];
        }
        let mut state = self.0.lock().unwrap();
        state.entries = entries;
        state.applied = index;
        state.restored_at = Some(index);
        Ok(())
    }

    fn applied(&self) -> u64 {
        self.0.lock().unwrap().applied
    }
}

impl Applied {
    fn data(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().entries.iter().map(|(_, data)| data.clone()).collect()
    }
}

struct Cluster {
    net: Arc<Net>,
    nodes: HashMap<u64, Arc<Node>>,
    machines: HashMap<u64, Applied>,
    stores: HashMap<u64, SharedKv>,
    config: RaftConfig,
}

impl Cluster {
    fn new(members: u64, compact_every: u64, keep_entries: u64) -> Cluster {
        let voters: Vec<u64> = (1..=members).collect();
        let config = RaftConfig {
            tick: Duration::from_millis(50),
            compact_every,
            keep_entries,
            ..RaftConfig::new(0, voters.clone())
        };
        let mut cluster = Cluster {
            net: Arc::default(),
            nodes: HashMap::new(),
            machines: HashMap::new(),
            stores: HashMap::new(),
            config,
        };
        for id in voters {
            cluster.stores.insert(id, Arc::new(kiln_kv::MemoryKv::new()));
            cluster.start(id);
        }
        cluster
    }

    /// Starts member `id` over its store with a fresh state machine.
    fn start(&mut self, id: u64) {
        let machine = Applied::default();
        let link = Arc::new(Link { from: id, net: Arc::clone(&self.net) });
        let config = RaftConfig { id, ..self.config.clone() };
        let node = Arc::new(Node::start(config, Arc::clone(&self.stores[&id]), machine.clone(), link).unwrap());
        self.net.nodes.lock().unwrap().insert(id, Arc::downgrade(&node));
        self.nodes.insert(id, node);
        self.machines.insert(id, machine);
    }

    async fn stop(&mut self, id: u64) {
        let node = self.nodes.remove(&id).unwrap();
        self.net.nodes.lock().unwrap().remove(&id);
        tokio::task::spawn_blocking(move || node.stop()).await.unwrap();
    }

    fn cut(&self, id: u64, cut: bool) {
        let mut set = self.net.cut.lock().unwrap();
        if cut {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }

    /// Waits until member `id`'s status satisfies `condition`.
    async fn wait(&self, id: u64, condition: impl FnMut(&Status) -> bool) -> Status {
        let mut status = self.nodes[&id].subscribe();
        let seen = tokio::time::timeout(PATIENCE, status.wait_for(condition)).await;
        seen.unwrap_or_else(|_| panic!("member {id} never got there: {:?}", self.nodes[&id].status())).unwrap().clone()
    }

    /// Waits until one of `among` leads in a term after `after`, and returns it.
    async fn leader(&self, among: &[u64], after: u64) -> u64 {
        let first = among[0];
        let mut status = self.nodes[&first].subscribe();
        let known = tokio::time::timeout(PATIENCE, async {
            loop {
                for &id in among {
                    let status = self.nodes[&id].status();
                    if status.is_leader() && status.term > after {
                        return id;
                    }
                }
                status.changed().await.unwrap();
            }
        });
        known.await.expect("no leader elected")
    }

    /// Proposes `data` through whoever leads among `among`, following redirections.
    async fn propose(&self, among: &[u64], data: &[u8]) -> u64 {
        loop {
            let leader = self.leader(among, 0).await;
            match self.nodes[&leader].propose(data.to_vec()).await {
                Ok(index) => return index,
                Err(RaftError::NotLeader { .. } | RaftError::Dropped) => continue,
                Err(error) => panic!("proposing: {error}"),
            }
        }
    }

    async fn wait_applied(&self, among: &[u64], index: u64) {
        for &id in among {
            self.wait(id, |status| status.applied >= index).await;
        }
    }
}

#[tokio::test]
async fn three_members_elect_one_leader_and_apply_the_same_log() {
    let cluster = Cluster::new(3, 10_000, 100);
    let all = [1, 2, 3];
    let leader = cluster.leader(&all, 0).await;
    let mut last = 0;
    for i in 0..50 {
        last = cluster.propose(&all, format!("entry {i}").as_bytes()).await;
    }
    cluster.wait_applied(&all, last).await;
    let expected: Vec<Vec<u8>> = (0..50).map(|i| format!("entry {i}").into_bytes()).collect();
    for id in all {
        assert_eq!(cluster.machines[&id].data(), expected, "member {id}");
    }

    let leader = if cluster.nodes[&leader].status().is_leader() { leader } else { cluster.leader(&all, 0).await };
    let follower = *all.iter().find(|&&id| id != leader).unwrap();
    let status = cluster.wait(follower, |status| status.leader == Some(leader)).await;
    assert_eq!(status.role, crate::Role::Follower);
    match cluster.nodes[&follower].propose(b"refused".to_vec()).await {
        Err(RaftError::NotLeader { leader: Some(named) }) => assert_eq!(named, leader),
        other => panic!("a follower proposed: {other:?}"),
    }
    assert!(matches!(cluster.nodes[&follower].read_index().await, Err(RaftError::NotLeader { .. })));
    let read = cluster.nodes[&leader].read_index().await.unwrap();
    assert!(read >= last, "read index {read} before the last write {last}");
    let status = cluster.nodes[&leader].status();
    assert_eq!(status.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(status.members.iter().all(|m| m.applied.is_some()), "{status:?}");
}

#[tokio::test]
async fn a_new_leader_takes_over_when_the_leader_stops_and_the_log_goes_on() {
    let mut cluster = Cluster::new(3, 10_000, 100);
    let all = [1, 2, 3];
    for i in 0..10 {
        cluster.propose(&all, format!("before {i}").as_bytes()).await;
    }
    let old = cluster.leader(&all, 0).await;
    let term = cluster.nodes[&old].status().term;
    cluster.stop(old).await;
    let rest: Vec<u64> = all.iter().copied().filter(|&id| id != old).collect();
    let new = cluster.leader(&rest, term).await;
    assert_ne!(new, old);
    // A read asked of a brand-new leader waits for its first commit, then answers.
    let read = tokio::time::timeout(PATIENCE, cluster.nodes[&new].read_index()).await.expect("the read answered");
    assert!(matches!(read, Ok(_) | Err(RaftError::NotLeader { .. })), "{read:?}");
    let mut last = 0;
    for i in 0..10 {
        last = cluster.propose(&rest, format!("after {i}").as_bytes()).await;
    }
    cluster.wait_applied(&rest, last).await;
    let expected: Vec<Vec<u8>> = (0..10)
        .map(|i| format!("before {i}").into_bytes())
        .chain((0..10).map(|i| format!("after {i}").into_bytes()))
        .collect();
    for id in &rest {
        assert_eq!(cluster.machines[id].data(), expected, "member {id}");
    }

    // The stopped member comes back over its store, applies the log from the start and follows.
    cluster.start(old);
    cluster.wait_applied(&[old], last).await;
    assert_eq!(cluster.machines[&old].data(), expected);
    let status = cluster.wait(old, |status| status.leader.is_some()).await;
    assert_ne!(status.role, crate::Role::Leader);
}

#[tokio::test]
async fn a_member_cut_off_for_long_catches_up_from_a_snapshot() {
    let cluster = Cluster::new(3, 20, 5);
    let all = [1, 2, 3];
    let leader = cluster.leader(&all, 0).await;
    let behind = *all.iter().find(|&&id| id != leader).unwrap();
    cluster.cut(behind, true);
    let rest: Vec<u64> = all.iter().copied().filter(|&id| id != behind).collect();
    let mut last = 0;
    for i in 0..100 {
        last = cluster.propose(&rest, format!("entry {i}").as_bytes()).await;
    }
    cluster.cut(behind, false);
    cluster.wait_applied(&all, last).await;
    let machine = &cluster.machines[&behind];
    assert!(machine.0.lock().unwrap().restored_at.is_some(), "member {behind} caught up without a snapshot");
    let expected: Vec<Vec<u8>> = (0..100).map(|i| format!("entry {i}").into_bytes()).collect();
    assert_eq!(machine.data(), expected);
}

#[tokio::test]
async fn a_leader_cut_off_commits_nothing_and_follows_the_new_leader_when_it_is_back() {
    let cluster = Cluster::new(3, 10_000, 100);
    let all = [1, 2, 3];
    let before = cluster.propose(&all, b"before").await;
    cluster.wait_applied(&all, before).await;
    let old = cluster.leader(&all, 0).await;
    let term = cluster.nodes[&old].status().term;
    cluster.cut(old, true);
    // What the cut-off leader accepts never commits: it steps down (check quorum) and says so.
    let stranded = cluster.nodes[&old].propose(b"stranded".to_vec());
    let rest: Vec<u64> = all.iter().copied().filter(|&id| id != old).collect();
    let new = cluster.leader(&rest, term).await;
    match tokio::time::timeout(PATIENCE, stranded).await.expect("the cut-off leader never answered") {
        Err(RaftError::NotLeader { .. } | RaftError::Dropped) => {}
        other => panic!("a minority committed: {other:?}"),
    }
    let after = cluster.propose(&rest, b"after").await;
    cluster.cut(old, false);
    cluster.wait_applied(&all, after).await;
    let status = cluster.wait(old, |status| status.leader == Some(new)).await;
    assert_eq!(status.role, crate::Role::Follower);
    for id in all {
        assert_eq!(cluster.machines[&id].data(), vec![b"before".to_vec(), b"after".to_vec()], "member {id}");
    }
}
