//! The coordinators' replicated log: raft-rs's `RawNode` over a log kept in `kiln-kv`, its
//! Ready loop on a thread of its own.
//!
//! A [`Node`] is one member. The caller gives it a [`StateMachine`] (what a committed entry
//! does, and how the whole state is snapshotted and restored) and a [`Transport`] (how
//! encoded raft messages reach the other members: the daemon sends them as bytes inside
//! Kiln's own gRPC service). [`Node::propose`] resolves once the entry is applied here;
//! [`Node::read_index`] once this node has applied everything committed when the read was
//! asked for (a linearizable read on the leader). This is the only crate that imports raft.

mod log;
mod machine;
mod node;
mod replicated;
mod storage;

use std::time::Duration;

pub use machine::{KvMachine, Write};
pub use node::Node;
pub use replicated::{Proposer, ReplicatedKv};
pub use storage::KvStorage;

/// How often the node ticks. With [`HEARTBEAT_TICKS`] and [`ELECTION_TICKS`]: a leader sends
/// heartbeats every 100 ms; a follower that heard nothing for a randomized 0.6–1.2 s starts a
/// (pre-)vote, so a new leader is in place about 1 s after the old one died (well under the
/// 2 s goal; etcd's rule of thumb is about twice the election timeout) while a busy 2-core
/// machine's scheduling hiccups (tens of milliseconds) do not start elections. The tick is
/// finer than the heartbeat so that the randomized timeouts fall in 30 distinct slots: two
/// followers rarely campaign at once and split the vote.
pub const TICK: Duration = Duration::from_millis(20);
/// Ticks between a leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 5;
/// Ticks of silence before a follower campaigns (randomized up to twice as many).
pub const ELECTION_TICKS: usize = 30;

/// One member's settings.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This member's id (non-zero).
    pub id: u64,
    /// Every member's id, this one's included.
    pub voters: Vec<u64>,
    /// The tick.
    pub tick: Duration,
    /// Entries applied between two compactions of the log. The applied state is in the
    /// store (the state machine keeps it in the same store as the log, so one sync covers
    /// both), so compacting takes no snapshot: one is made when a member far behind needs it.
    pub compact_every: u64,
    /// Entries kept behind the applied index when compacting, so that a member slightly
    /// behind gets entries rather than a snapshot.
    pub keep_entries: u64,
}

impl RaftConfig {
    /// The defaults for member `id` of `voters`.
    pub fn new(id: u64, voters: Vec<u64>) -> RaftConfig {
        RaftConfig { id, voters, tick: TICK, compact_every: 10_000, keep_entries: 10_000 }
    }
}

/// What goes wrong with the replicated log.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// This member is not the leader; the leader's id when known.
    #[error("this coordinator is not the leader{}", leader.map(|id| format!(" (the leader is member {id})")).unwrap_or_default())]
    NotLeader {
        /// The leader's id, if this member knows one.
        leader: Option<u64>,
    },
    /// The proposal was replaced by another leader's entry and will never apply.
    #[error("the entry was dropped by a change of leader")]
    Dropped,
    /// The node has stopped (asked to, or after a storage or state machine failure).
    #[error("the replicated log has stopped")]
    Stopped,
    /// The stored log lists other members than the configuration.
    #[error(
        "the raft log was started with the members {kept:?}, the configuration lists {configured:?}; membership changes are not supported"
    )]
    Members {
        /// The members in the stored log.
        kept: Vec<u64>,
        /// The members in the configuration.
        configured: Vec<u64>,
    },
    /// A stored record does not decode.
    #[error("the stored raft log is damaged: {0}")]
    Corrupt(String),
    /// A raft message from a peer does not decode.
    #[error("a raft message from member {from} does not decode: {reason}")]
    Decode {
        /// The sending member.
        from: u64,
        /// The decoder's complaint.
        reason: String,
    },
    /// raft-rs refused.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The key-value store failed.
    #[error(transparent)]
    Kv(#[from] kiln_kv::KvError),
    /// The state machine failed to apply an entry or a snapshot.
    #[error("applying entry {index}: {reason}")]
    Apply {
        /// The entry's index (the snapshot's, for a restore).
        index: u64,
        /// The state machine's error.
        reason: String,
    },
    /// The state machine could not be read into a snapshot.
    #[error("taking a snapshot at entry {index}: {reason}")]
    Snapshot {
        /// The applied index it was for.
        index: u64,
        /// The state machine's error.
        reason: String,
    },
    /// The member's thread could not be started.
    #[error("starting the raft thread: {0}")]
    Thread(std::io::Error),
}

/// What the replicated entries do: applied in log order, the same on every member.
pub trait StateMachine: Send + 'static {
    /// Applies the committed entry `index`. Entries are applied again after a restart from
    /// the last index this state machine reported durable ([`StateMachine::applied`]), so
    /// applying must be idempotent. The machine may hold what an entry does until
    /// [`StateMachine::applied_through`].
    fn apply(&mut self, index: u64, data: &[u8]) -> Result<(), String>;
    /// Every entry up to `index` has been handed to [`StateMachine::apply`]: their effects
    /// must be in place (and `index` recorded as applied) when this returns. Called once per
    /// run of committed entries, so a machine can write them together.
    fn applied_through(&mut self, index: u64) -> Result<(), String>;
    /// The whole state, as of the last applied entry. A state that cannot be read is an
    /// error (the member stops), never a smaller snapshot.
    fn snapshot(&mut self) -> Result<Vec<u8>, String>;
    /// Replaces the whole state by a snapshot taken at `index`.
    fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), String>;
    /// The last index whose effects are durable (0 when none).
    fn applied(&self) -> u64;
}

/// How encoded raft messages reach other members.
pub trait Transport: Send + Sync + 'static {
    /// Sends `messages` to member `to`, in order, without blocking; `snapshot` when one of
    /// them carries a snapshot. Messages may be lost; the sender reports a member it cannot
    /// reach ([`Node::report_unreachable`]) and the outcome of a batch holding a snapshot
    /// ([`Node::report_snapshot`]).
    fn send(&self, to: u64, messages: Vec<Vec<u8>>, snapshot: bool);
}

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Leads the term: proposes, schedules.
    Leader,
    /// Follows a leader.
    Follower,
    /// Campaigns for votes.
    Candidate,
    /// Asks whether it could win before campaigning.
    PreCandidate,
}

impl Role {
    /// The name `kiln info` shows (a pre-candidate is a candidate there).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate | Role::PreCandidate => "candidate",
        }
    }
}

/// A member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: u64,
    /// Its role, as far as this node knows (the leader, and everyone else a follower while
    /// there is one).
    pub role: Option<Role>,
    /// The last index it has: applied, for this node; replicated (acknowledged to the
    /// leader), for others, known on the leader only.
    pub applied: Option<u64>,
}

/// This node's view of the replica set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This member's id.
    pub id: u64,
    /// The leader this node knows of.
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
    /// This node's role.
    pub role: Role,
    /// The highest index known committed.
    pub commit: u64,
    /// The highest index applied here.
    pub applied: u64,
    /// Every member, this one included, by id.
    pub members: Vec<Member>,
    /// Set once the node stopped (asked to, or failed).
    pub stopped: bool,
}

impl Status {
    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader && !self.stopped
    }
}

#[cfg(test)]
mod tests;
