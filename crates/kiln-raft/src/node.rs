//! A member: raft-rs's `RawNode` and the [`StateMachine`] on a thread of their own, driven by
//! requests from async code (proposals, reads, messages from peers) and by the tick.
//!
//! Each turn takes every request waiting (up to [`MAX_REQUESTS_PER_TURN`]) before asking for
//! a Ready, so proposals that arrive together become one append and one sync.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use kiln_kv::SharedKv;
use protobuf::Message as _;
use raft::prelude::{Entry, EntryType, Message, MessageType};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};

use crate::storage::KvStorage;
use crate::{ELECTION_TICKS, HEARTBEAT_TICKS, Member, RaftConfig, RaftError, Role, StateMachine, Status, Transport};

/// Requests one turn takes before it hands raft-rs's output on: a bound on how long a burst
/// can delay the tick.
const MAX_REQUESTS_PER_TURN: usize = 4096;

/// Readies one turn handles at most before it takes requests again.
const MAX_READIES_PER_TURN: usize = 8;

/// The most bytes of entries in one append message.
const MAX_MESSAGE_BYTES: u64 = 1 << 20;

type Reply = oneshot::Sender<Result<u64, RaftError>>;

enum Request {
    Propose { data: Vec<u8>, reply: Reply },
    Read { reply: Reply },
    Receive(Vec<Message>),
    Unreachable(u64),
    SnapshotSent { to: u64, delivered: bool },
    Stop,
}

/// One member of the replica set. Dropping it stops its thread (without waiting for it:
/// [`Node::stop`] waits).
pub struct Node {
    id: u64,
    requests: Sender<Request>,
    status: watch::Receiver<Status>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Node {
    /// Opens the log kept in `kv` (or starts one) and starts the member's thread.
    pub fn start<M: StateMachine>(
        config: RaftConfig,
        kv: SharedKv,
        mut machine: M,
        transport: std::sync::Arc<dyn Transport>,
    ) -> Result<Node, RaftError> {
        let storage = KvStorage::open(kv, &config.voters)?;
        let kept = storage.snapshot_kept().clone();
        let kept_index = kept.get_metadata().index;
        let mut applied = machine.applied();
        if applied < kept_index {
            machine
                .restore(kept_index, kept.get_data())
                .map_err(|reason| RaftError::Apply { index: kept_index, reason })?;
            applied = kept_index;
        }
        let truncated = storage.first_index_now() - 1;
        if applied < truncated {
            return Err(RaftError::Corrupt(format!(
                "the state machine has applied up to entry {applied}, but the log starts after {truncated} \
                 (the state machine must live in the log's store)"
            )));
        }
        // The state machine may have made an entry durable before the commit index that
        // covers it was: raft-rs starts from what it knows committed, and the entries in
        // between are applied again (applying is idempotent).
        let applied = applied.min(storage.hard_state().commit.max(kept_index));
        let raft_config = raft::Config {
            id: config.id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: MAX_MESSAGE_BYTES,
            max_inflight_msgs: 256,
            ..raft::Config::default()
        };
        raft_config.validate()?;
        let raw = RawNode::new(&raft_config, storage, &crate::log::logger(config.id))?;
        let initial = Status {
            id: config.id,
            leader: None,
            term: raw.raft.term,
            role: Role::Follower,
            commit: raw.raft.raft_log.committed,
            applied,
            members: config.voters.iter().map(|&id| Member { id, role: None, applied: None }).collect(),
            stopped: false,
        };
        let (status_sender, status) = watch::channel(initial);
        let (requests, inbox) = std::sync::mpsc::channel();
        let mut member = Replica {
            raw,
            machine,
            transport,
            applied,
            proposals: BTreeMap::new(),
            reads: HashMap::new(),
            early_reads: Vec::new(),
            waiting_reads: Vec::new(),
            next_read: 0,
            was_leader: false,
            status: status_sender,
            tick: config.tick,
            compact_every: config.compact_every,
            keep_entries: config.keep_entries,
        };
        let thread = std::thread::Builder::new()
            .name(format!("raft-{}", config.id))
            .spawn(move || member.run(inbox))
            .map_err(RaftError::Thread)?;
        Ok(Node { id: config.id, requests, status, thread: Mutex::new(Some(thread)) })
    }

    /// This member's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Appends `data` to the log; resolves with its index once it is committed and applied
    /// here. Only the leader proposes: elsewhere this is [`RaftError::NotLeader`]. A leader
    /// that loses its office before the entry commits answers `NotLeader` too, and the entry
    /// may or may not commit later.
    ///
    /// The entry is handed to the member when this is called, not when the future is first
    /// polled: entries proposed one after the other are in the log in that order.
    pub fn propose(&self, data: Vec<u8>) -> impl Future<Output = Result<u64, RaftError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = self.requests.send(Request::Propose { data, reply });
        async move {
            sent.map_err(|_| RaftError::Stopped)?;
            answer.await.map_err(|_| RaftError::Stopped)?
        }
    }

    /// A linearizable read barrier: resolves on the leader, with the commit index it
    /// confirmed with a quorum, once everything up to it is applied here.
    pub async fn read_index(&self) -> Result<u64, RaftError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request::Read { reply }).map_err(|_| RaftError::Stopped)?;
        answer.await.map_err(|_| RaftError::Stopped)?
    }

    /// Hands messages that member `from` sent to this node. A message that does not decode,
    /// is not from `from` or not for this node refuses the whole batch.
    pub fn receive<B: AsRef<[u8]>>(&self, from: u64, messages: &[B]) -> Result<(), RaftError> {
        let decoded = messages
            .iter()
            .map(|bytes| {
                let message = Message::parse_from_bytes(bytes.as_ref())
                    .map_err(|error| RaftError::Decode { from, reason: error.to_string() })?;
                if message.from != from || message.to != self.id {
                    return Err(RaftError::Decode {
                        from,
                        reason: format!("a message from {} to {} arrived at {}", message.from, message.to, self.id),
                    });
                }
                Ok(message)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.requests.send(Request::Receive(decoded)).map_err(|_| RaftError::Stopped)
    }

    /// Tells raft that `member` could not be reached (it probes instead of streaming).
    pub fn report_unreachable(&self, member: u64) {
        let _ = self.requests.send(Request::Unreachable(member));
    }

    /// Tells raft whether a batch holding a snapshot reached `member`.
    pub fn report_snapshot(&self, member: u64, delivered: bool) {
        let _ = self.requests.send(Request::SnapshotSent { to: member, delivered });
    }

    /// This node's view of the replica set now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// The view as it changes (role, leader, term, commit and applied indexes).
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Stops the thread and waits for it (blocking: call it off the async threads).
    pub fn stop(&self) {
        let _ = self.requests.send(Request::Stop);
        let thread = self.thread.lock().unwrap_or_else(|poison| poison.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Stop);
    }
}

/// The thread's side of a member.
struct Replica<M> {
    raw: RawNode<KvStorage>,
    machine: M,
    transport: std::sync::Arc<dyn Transport>,
    applied: u64,
    /// Proposals waiting for their entry, by index: the term they were proposed in.
    proposals: BTreeMap<u64, (u64, Reply)>,
    /// Reads raft has not confirmed yet, by context.
    reads: HashMap<u64, Reply>,
    /// Reads asked for before this leader committed an entry of its term (raft-rs ignores
    /// those): issued once it has.
    early_reads: Vec<Reply>,
    /// Confirmed reads waiting for the apply of their index.
    waiting_reads: Vec<(u64, Reply)>,
    next_read: u64,
    was_leader: bool,
    status: watch::Sender<Status>,
    tick: Duration,
    compact_every: u64,
    keep_entries: u64,
}

impl<M: StateMachine> Replica<M> {
    fn run(&mut self, inbox: Receiver<Request>) {
        let mut next_tick = Instant::now() + self.tick;
        let ended = loop {
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = now + self.tick;
            }
            // A Ready the tick made is handled now, not after the next request or tick.
            let wait = if self.raw.has_ready() { Duration::ZERO } else { next_tick.saturating_duration_since(now) };
            match inbox.recv_timeout(wait) {
                Ok(request) => {
                    let mut stop = self.handle(request);
                    for _ in 1..MAX_REQUESTS_PER_TURN {
                        if stop {
                            break;
                        }
                        match inbox.try_recv() {
                            Ok(request) => stop = self.handle(request),
                            Err(_) => break,
                        }
                    }
                    if stop {
                        break Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break Ok(()),
            }
            self.issue_early_reads();
            // Handling one Ready can make another (a commit that advanced, messages to send
            // after persisting): take them now rather than at the next request or tick.
            let mut readied = Ok(());
            for _ in 0..MAX_READIES_PER_TURN {
                if !self.raw.has_ready() {
                    break;
                }
                readied = self.on_ready();
                if readied.is_err() {
                    break;
                }
            }
            if let Err(error) = readied {
                break Err(error);
            }
            self.publish();
        };
        if let Err(error) = ended {
            tracing::error!(target: "raft", "member {} stopped: {error}", self.raw.raft.id);
        }
        self.fail_waiting(|| RaftError::Stopped);
        self.status.send_modify(|status| status.stopped = true);
    }

    /// Takes one request; true to stop.
    fn handle(&mut self, request: Request) -> bool {
        match request {
            Request::Propose { data, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.not_leader()));
                    return false;
                }
                match self.raw.propose(Vec::new(), data) {
                    Ok(()) => {
                        let index = self.raw.raft.raft_log.last_index();
                        self.proposals.insert(index, (self.raw.raft.term, reply));
                    }
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.send(Err(self.not_leader()));
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Request::Read { reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.not_leader()));
                    return false;
                }
                if self.raw.raft.commit_to_current_term() {
                    self.issue_read(reply);
                } else {
                    self.early_reads.push(reply);
                }
            }
            Request::Receive(messages) => {
                for message in messages {
                    // A message from an unknown member or an old term is not an error of ours.
                    if let Err(error) = self.raw.step(message) {
                        tracing::debug!(target: "raft", "message refused: {error}");
                    }
                }
            }
            Request::Unreachable(member) => self.raw.report_unreachable(member),
            Request::SnapshotSent { to, delivered } => {
                self.raw.report_snapshot(to, if delivered { SnapshotStatus::Finish } else { SnapshotStatus::Failure })
            }
            Request::Stop => return true,
        }
        false
    }

    fn issue_read(&mut self, reply: Reply) {
        self.next_read += 1;
        self.raw.read_index(self.next_read.to_be_bytes().to_vec());
        self.reads.insert(self.next_read, reply);
    }

    /// Issues the reads that waited for this leader's first commit in its term.
    fn issue_early_reads(&mut self) {
        if !self.early_reads.is_empty()
            && self.raw.raft.state == StateRole::Leader
            && self.raw.raft.commit_to_current_term()
        {
            for reply in std::mem::take(&mut self.early_reads) {
                self.issue_read(reply);
            }
        }
    }

    fn not_leader(&self) -> RaftError {
        let leader = self.raw.raft.leader_id;
        RaftError::NotLeader { leader: (leader != raft::INVALID_ID && leader != self.raw.raft.id).then_some(leader) }
    }

    fn on_ready(&mut self) -> Result<(), RaftError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            let index = snapshot.get_metadata().index;
            self.raw.mut_store().install(&snapshot)?;
            self.machine.restore(index, snapshot.get_data()).map_err(|reason| RaftError::Apply { index, reason })?;
            self.applied = index;
        }
        self.apply(ready.take_committed_entries())?;
        for read in ready.take_read_states() {
            let context = read.request_ctx.as_slice().try_into().map(u64::from_be_bytes).ok();
            if let Some(reply) = context.and_then(|context| self.reads.remove(&context)) {
                self.waiting_reads.push((read.index, reply));
            }
        }
        let hard = ready.hs().cloned();
        if !ready.entries().is_empty() || hard.is_some() {
            self.raw.mut_store().append(ready.entries(), hard.as_ref(), ready.must_sync())?;
        }
        if !ready.persisted_messages().is_empty() {
            self.send(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply_to(self.applied);
        self.answer_reads();
        self.compact_and_snapshot()
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        let Some(last) = entries.last().map(|entry| entry.index) else { return Ok(()) };
        for entry in &entries {
            // Empty entries are new leaders' markers; membership is fixed, so a configuration
            // change never arrives.
            if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
                let index = entry.index;
                self.machine.apply(index, &entry.data).map_err(|reason| RaftError::Apply { index, reason })?;
            }
        }
        self.machine.applied_through(last).map_err(|reason| RaftError::Apply { index: last, reason })?;
        self.applied = last;
        for entry in &entries {
            let index = entry.index;
            while let Some(entry_proposed) = self.proposals.first_entry() {
                if *entry_proposed.key() > index {
                    break;
                }
                let (proposed_index, (term, reply)) = entry_proposed.remove_entry();
                let _ = reply.send(if proposed_index == index && term == entry.term {
                    Ok(index)
                } else {
                    Err(RaftError::Dropped)
                });
            }
        }
        Ok(())
    }

    fn answer_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting_reads).into_iter().partition(|(index, _)| *index <= applied);
        self.waiting_reads = waiting;
        for (index, reply) in ready {
            let _ = reply.send(Ok(index));
        }
    }

    /// Compacts the log once `compact_every` entries are applied beyond the kept ones, and
    /// makes a snapshot of the applied state when a member far behind asked for one.
    fn compact_and_snapshot(&mut self) -> Result<(), RaftError> {
        let keep = self.keep_entries;
        if self.applied >= self.raw.store().first_index_now() + self.compact_every + keep {
            let applied = self.applied;
            self.raw.mut_store().compact(applied.saturating_sub(keep))?;
        }
        if self.raw.store().wants_snapshot() {
            let applied = self.applied;
            let data = self.machine.snapshot().map_err(|reason| RaftError::Snapshot { index: applied, reason })?;
            self.raw.mut_store().keep_snapshot(applied, data)?;
        }
        Ok(())
    }

    fn send(&self, messages: Vec<Message>) {
        let mut by_member: BTreeMap<u64, (Vec<Vec<u8>>, bool)> = BTreeMap::new();
        for message in messages {
            let bytes = message.write_to_bytes().expect("raft's messages have no required fields");
            let (batch, snapshot) = by_member.entry(message.to).or_default();
            *snapshot |= message.get_msg_type() == MessageType::MsgSnapshot;
            batch.push(bytes);
        }
        for (to, (batch, snapshot)) in by_member {
            self.transport.send(to, batch, snapshot);
        }
    }

    fn fail_waiting(&mut self, error: impl Fn() -> RaftError) {
        for (_, (_, reply)) in std::mem::take(&mut self.proposals) {
            let _ = reply.send(Err(error()));
        }
        for (_, reply) in std::mem::take(&mut self.reads) {
            let _ = reply.send(Err(error()));
        }
        for reply in std::mem::take(&mut self.early_reads) {
            let _ = reply.send(Err(error()));
        }
        for (_, reply) in std::mem::take(&mut self.waiting_reads) {
            let _ = reply.send(Err(error()));
        }
    }

    fn publish(&mut self) {
        let raft = &self.raw.raft;
        let is_leader = raft.state == StateRole::Leader;
        if self.was_leader && !is_leader {
            let leader = (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id);
            self.fail_waiting(|| RaftError::NotLeader { leader });
        }
        self.was_leader = is_leader;
        let raft = &self.raw.raft;
        let leader = (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id);
        let role = match raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
        };
        let mut members: Vec<Member> = raft
            .prs()
            .iter()
            .map(|(&id, progress)| Member {
                id,
                role: if id == raft.id {
                    Some(role)
                } else if leader == Some(id) {
                    Some(Role::Leader)
                } else if leader.is_some() {
                    Some(Role::Follower)
                } else {
                    None
                },
                applied: if id == raft.id { Some(self.applied) } else { is_leader.then_some(progress.matched) },
            })
            .collect();
        members.sort_by_key(|member| member.id);
        let status = Status {
            id: raft.id,
            leader,
            term: raft.term,
            role,
            commit: raft.raft_log.committed,
            applied: self.applied,
            members,
            stopped: false,
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            if changed {
                *current = status;
            }
            changed
        });
    }
}
