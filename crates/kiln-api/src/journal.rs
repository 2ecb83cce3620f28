//! What the history keeps of a build beside its entry: every vertex's record (phases, worker,
//! cache outcome, the build a deduplicated vertex waited on) and the steps' output, bounded.
//! It lives in this daemon's own store: a replicated coordinator's entries are in the
//! replicated log, and records and logs stay with the member that ran the build. While a
//! build runs, its journal is in memory and every change is announced ([`Journal::watch`]),
//! which the web UI streams to browsers.

use std::collections::HashMap;
use std::sync::Mutex;

use kiln_kv::SharedKv;
use kiln_model::{BuildChange, BuildEvent, StepLog, VertexRecord};
use kiln_types::Digest;
use tokio::sync::broadcast;

use crate::error::ApiError;

/// Vertex records by build id.
pub const RECORDS_TREE: &str = "history-records";
/// Step output by `BUILD_ID/VERTEX_DIGEST`.
pub const LOGS_TREE: &str = "history-logs";
/// The most output kept per step: its last bytes (older lines rotate out).
pub const MAX_STEP_LOG: usize = 256 << 10;
/// The most output kept per build: past it, its other steps keep only their last lines.
pub const MAX_BUILD_LOG: usize = 8 << 20;
/// A running build's journal.
#[derive(Default)]
struct Live {
    /// Which run of the build it is (a reattachment begins another run under the same id).
    run: u64,
    tenant: String,
    records: Vec<VertexRecord>,
    index: HashMap<Digest, usize>,
    logs: HashMap<Digest, StepLog>,
    log_bytes: usize,
}

/// The journals of a daemon's builds.
pub struct Journal {
    kv: SharedKv,
    live: Mutex<HashMap<String, Live>>,
    /// The ids of builds that began, progressed, ended or were removed.
    changes: broadcast::Sender<BuildChange>,
    /// The last run begun.
    runs: std::sync::atomic::AtomicU64,
    /// What ended builds' deduplicated steps saved ([`Journal::saved_ms`]), once known whole.
    saved: Mutex<HashMap<String, u64>>,
}

impl Journal {
    /// Journals kept in `kv`.
    pub fn new(kv: SharedKv) -> Journal {
        Journal {
            kv,
            live: Mutex::new(HashMap::new()),
            changes: broadcast::channel(1024).0,
            runs: Default::default(),
            saved: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes from now on (a receiver that falls behind misses some and is told so).
    pub fn watch(&self) -> broadcast::Receiver<BuildChange> {
        self.changes.subscribe()
    }

    /// Announces a change of build `id` (of `tenant`); `listed`: it began, ended or went.
    pub fn changed(&self, id: &str, tenant: &str, listed: bool) {
        let _ = self.changes.send(BuildChange { id: id.to_string(), tenant: tenant.to_string(), listed });
    }

    /// Build `id` (of `tenant`) began a run; the run's number ends it ([`Journal::end`]).
    pub fn begin(&self, id: &str, tenant: &str) -> u64 {
        let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.lock().insert(id.to_string(), Live { run, tenant: tenant.to_string(), ..Live::default() });
        self.changed(id, tenant, true);
        run
    }

    /// Build `id`'s progress.
    pub fn event(&self, id: &str, event: &BuildEvent) {
        let tenant = {
            let mut live = self.lock();
            let Some(build) = live.get_mut(id) else { return };
            match event {
                BuildEvent::Planned(records) => {
                    build.index = records.iter().enumerate().map(|(i, r)| (r.digest, i)).collect();
                    build.records = records.clone();
                }
                BuildEvent::Started { vertex, at } => {
                    if let Some(&i) = build.index.get(vertex) {
                        build.records[i].started.get_or_insert(*at);
                    }
                }
                BuildEvent::Completed { record, .. } => {
                    if let Some(&i) = build.index.get(&record.digest) {
                        let started = build.records[i].started;
                        build.records[i] = (**record).clone();
                        build.records[i].started = build.records[i].started.or(started);
                    }
                }
                // Kiln's own words on a step are not its output.
                BuildEvent::Log { line, .. } if line.stream == kiln_model::LogStream::Debug => return,
                BuildEvent::Log { vertex, line } => {
                    let limit = if build.log_bytes > MAX_BUILD_LOG { 4 << 10 } else { MAX_STEP_LOG };
                    let log = build.logs.entry(*vertex).or_default();
                    let before = log.bytes();
                    log.push(line.clone(), limit);
                    build.log_bytes = (build.log_bytes + log.bytes()).saturating_sub(before);
                    // Output lines are many: a line alone is not announced.
                    return;
                }
                BuildEvent::Export { .. } | BuildEvent::ExportData { .. } | BuildEvent::Result { .. } => return,
            }
            build.tenant.clone()
        };
        self.changed(id, &tenant, false);
    }

    /// Run `run` of build `id` ended with `records` (empty: those it gathered): its journal is
    /// written to the store, then leaves memory. A run that a reattachment replaced leaves the
    /// new run's journal alone. A failure to write is logged (the build's result stands).
    pub fn end(&self, id: &str, run: u64, records: &[VertexRecord]) {
        let (records, logs_kept, tenant) = {
            let live = self.lock();
            let Some(build) = live.get(id).filter(|build| build.run == run) else { return };
            let records = if records.is_empty() { build.records.clone() } else { records.to_vec() };
            (records, build.logs.clone(), build.tenant.clone())
        };
        let mut batch = kiln_kv::Batch::default();
        let mut logs = kiln_kv::Batch::default();
        match serde_json::to_vec(&records) {
            Ok(value) => drop(batch.put(id.as_bytes(), value)),
            Err(error) => tracing::warn!("build {id}: its records: {error}"),
        }
        for (vertex, log) in &logs_kept {
            if let Ok(value) = serde_json::to_vec(log) {
                logs.put(format!("{id}/{vertex}").into_bytes(), value);
            }
        }
        if let Err(error) = self.kv.apply(RECORDS_TREE, &batch).and_then(|()| self.kv.apply(LOGS_TREE, &logs)) {
            tracing::warn!("build {id}: keeping its records and logs: {error}");
        }
        // Written before it leaves memory: a reader in between sees one or the other.
        let mut live = self.lock();
        if live.get(id).is_some_and(|build| build.run == run) {
            live.remove(id);
        }
        drop(live);
        self.changed(id, &tenant, true);
    }

    /// Run `run` of build `id` ended without a journal to keep (its task failed): it leaves
    /// memory, and watchers hear the build changed.
    pub fn abandon(&self, id: &str, run: u64) {
        let mut live = self.lock();
        let Some(build) = live.get(id).filter(|build| build.run == run) else { return };
        let tenant = build.tenant.clone();
        live.remove(id);
        drop(live);
        self.changed(id, &tenant, true);
    }

    /// Build `id`'s records: the running build's so far, else the stored ones.
    pub fn records(&self, id: &str) -> Result<Vec<VertexRecord>, ApiError> {
        if let Some(build) = self.lock().get(id) {
            return Ok(build.records.clone());
        }
        match self.kv.get(RECORDS_TREE, id.as_bytes()).map_err(|e| ApiError::History(e.to_string()))? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| ApiError::History(format!("build {id}: {e}"))),
            None => Ok(Vec::new()),
        }
    }

    /// Build `id`'s step output, by vertex (only `vertex`'s when given).
    pub fn logs(&self, id: &str, vertex: Option<&Digest>) -> Result<Vec<(Digest, StepLog)>, ApiError> {
        if let Some(build) = self.lock().get(id) {
            let mut logs: Vec<(Digest, StepLog)> = build
                .logs
                .iter()
                .filter(|(digest, _)| vertex.is_none_or(|v| v == *digest))
                .map(|(digest, log)| (*digest, log.clone()))
                .collect();
            logs.sort_by_key(|(digest, _)| build.index.get(digest).copied());
            return Ok(logs);
        }
        let prefix = match vertex {
            Some(vertex) => format!("{id}/{vertex}"),
            None => format!("{id}/"),
        };
        let pairs = self.kv.scan_prefix(LOGS_TREE, prefix.as_bytes()).map_err(|e| ApiError::History(e.to_string()))?;
        let order: HashMap<Digest, usize> = self.records(id)?.iter().enumerate().map(|(i, r)| (r.digest, i)).collect();
        let mut logs = Vec::new();
        for (key, value) in pairs {
            let key = String::from_utf8_lossy(&key);
            let Some(digest) = key.split_once('/').and_then(|(_, d)| d.parse::<Digest>().ok()) else { continue };
            let log: StepLog = serde_json::from_slice(&value).map_err(|e| ApiError::History(format!("{key}: {e}")))?;
            logs.push((digest, log));
        }
        logs.sort_by_key(|(digest, _)| order.get(digest).copied());
        Ok(logs)
    }

    /// The steps running builds have started and not ended, with their builds' ids (a step
    /// several builds wait on is there once per build).
    pub fn running(&self) -> Vec<(String, VertexRecord)> {
        let live = self.lock();
        let started = live.iter().flat_map(|(id, build)| {
            let running = build.records.iter().filter(|r| r.started.is_some() && r.completed.is_none());
            running.map(move |r| (id.clone(), r.clone()))
        });
        started.collect()
    }

    /// The execution time (ms) build `id`'s deduplicated steps did not spend: for each, what
    /// the execution it waited on took, as the journal of the build that ran it has it. Known
    /// whole (every such execution found), it is remembered.
    pub fn saved_ms(&self, id: &str) -> Result<u64, ApiError> {
        if let Some(saved) = self.saved.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(*saved);
        }
        // An ended build's records are final: read whether it runs before reading them.
        let ended = !self.lock().contains_key(id);
        let mut sources: HashMap<String, Vec<VertexRecord>> = HashMap::new();
        let (mut saved, mut whole) = (0, true);
        for record in self.records(id)? {
            let Some(from) = record.deduplicated_from.as_deref().filter(|from| *from != id) else { continue };
            if !sources.contains_key(from) {
                sources.insert(from.to_string(), self.records(from)?);
            }
            let ran = sources[from].iter().find(|r| r.digest == record.digest).and_then(|r| r.phases.execute_ms);
            match ran {
                Some(ms) => saved += ms,
                None => whole = false,
            }
        }
        if whole && ended {
            self.saved.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), saved);
        }
        Ok(saved)
    }

    /// Removes build `id`'s (of `tenant`) records and logs.
    pub fn remove(&self, id: &str, tenant: &str) -> Result<(), ApiError> {
        let fail = |e: kiln_kv::KvError| ApiError::History(format!("build {id}: {e}"));
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.kv.delete(RECORDS_TREE, id.as_bytes()).map_err(fail)?;
        let mut batch = kiln_kv::Batch::default();
        for (key, _) in self.kv.scan_prefix(LOGS_TREE, format!("{id}/").as_bytes()).map_err(fail)? {
            batch.delete(key);
        }
        self.kv.apply(LOGS_TREE, &batch).map_err(fail)?;
        self.changed(id, tenant, true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> VertexRecord {
        VertexRecord {
            digest: Digest::of(name.as_bytes()),
            name: name.into(),
            kind: "exec".into(),
            stage: None,
            status: kiln_model::Status::Skipped,
            worker: None,
            platform: None,
            started: None,
            completed: None,
            cache_source: None,
            phases: Default::default(),
            deduplicated_from: None,
        }
    }

    fn line(text: &str) -> kiln_model::LogLine {
        kiln_model::LogLine { stream: kiln_model::LogStream::Stdout, line: text.into() }
    }

    #[test]
    fn a_journal_follows_a_build_keeps_its_last_output_and_is_removed_whole() {
        let journal = Journal::new(std::sync::Arc::new(kiln_kv::MemoryKv::new()));
        let mut changes = journal.watch();
        let (a, b) = (record("a"), record("b"));
        let run = journal.begin("b1", "team-a");
        journal.event("b1", &BuildEvent::Planned(vec![a.clone(), b.clone()]));
        journal.event("b1", &BuildEvent::Started { vertex: a.digest, at: 7 });
        for n in 0..kiln_model::MAX_STEP_LINES + 10 {
            journal.event("b1", &BuildEvent::Log { vertex: a.digest, line: line(&format!("line {n}")) });
        }
        let done = VertexRecord { status: kiln_model::Status::Executed, completed: Some(9), ..a.clone() };
        journal.event("b1", &BuildEvent::Completed { record: Box::new(done.clone()), error: None });
        let running = journal.records("b1").unwrap();
        assert_eq!((running[0].started, running[0].status), (Some(7), kiln_model::Status::Executed));
        let logs = journal.logs("b1", Some(&a.digest)).unwrap();
        assert_eq!((logs[0].1.lines.len(), logs[0].1.dropped), (kiln_model::MAX_STEP_LINES, 10));
        assert_eq!(logs[0].1.lines[0].line, "line 10", "the oldest lines rotate out");

        // A replaced run's end leaves the journal of the run that replaced it alone.
        let again = journal.begin("b1", "team-a");
        journal.event("b1", &BuildEvent::Planned(vec![a.clone(), b.clone()]));
        journal.event("b1", &BuildEvent::Log { vertex: a.digest, line: line("line 0") });
        journal.end("b1", run, &[]);
        assert_eq!(journal.logs("b1", Some(&a.digest)).unwrap()[0].1.lines.len(), 1, "the new run's journal");
        for n in 1..kiln_model::MAX_STEP_LINES + 10 {
            journal.event("b1", &BuildEvent::Log { vertex: a.digest, line: line(&format!("line {n}")) });
        }
        // Abandoning a replaced run leaves the new run alone too.
        journal.abandon("b1", run);
        assert_eq!(journal.logs("b1", Some(&a.digest)).unwrap()[0].1.lines.len(), kiln_model::MAX_STEP_LINES);
        journal.end("b1", again, &[done.clone(), b.clone()]);
        assert_eq!(journal.records("b1").unwrap(), [done, b]);
        assert_eq!(
            journal.logs("b1", None).unwrap()[0].1.lines.back().unwrap().line,
            format!("line {}", kiln_model::MAX_STEP_LINES + 9)
        );
        // Begins, plans, a start, a completion and the end were announced, to team-a; the
        // list changed at the begins and the end. Output lines were not announced.
        let mut announced = Vec::new();
        while let Ok(change) = changes.try_recv() {
            assert_eq!((change.id.as_str(), change.tenant.as_str()), ("b1", "team-a"));
            announced.push(change.listed);
        }
        assert_eq!(announced, [true, false, false, false, true, false, true]);
        journal.remove("b1", "team-a").unwrap();
        assert!(journal.records("b1").unwrap().is_empty() && journal.logs("b1", None).unwrap().is_empty());
    }

    #[test]
    fn a_deduplicated_step_saved_what_the_execution_it_waited_on_took() {
        let journal = Journal::new(std::sync::Arc::new(kiln_kv::MemoryKv::new()));
        let (shared, other) = (record("shared"), record("other"));
        let phases = kiln_model::Phases { execute_ms: Some(1500), ..Default::default() };
        let executed = VertexRecord { status: kiln_model::Status::Executed, phases, ..shared.clone() };
        let waited = VertexRecord {
            status: kiln_model::Status::Deduplicated,
            deduplicated_from: Some("runner".into()),
            ..shared.clone()
        };
        // While the step runs, it is running in both builds.
        let (runner, waiter) = (journal.begin("runner", "t"), journal.begin("waiter", "t"));
        for id in ["runner", "waiter"] {
            journal.event(id, &BuildEvent::Planned(vec![shared.clone(), other.clone()]));
            journal.event(id, &BuildEvent::Started { vertex: shared.digest, at: 5 });
        }
        let mut running = journal.running();
        running.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            running.iter().map(|(id, r)| (id.as_str(), r.digest)).collect::<Vec<_>>(),
            [("runner", shared.digest), ("waiter", shared.digest)]
        );
        // The waiter ended first: the runner's execution is not recorded yet, so nothing is
        // known whole and nothing is remembered.
        journal.end("waiter", waiter, &[waited, other.clone()]);
        assert_eq!(journal.saved_ms("waiter").unwrap(), 0);
        journal.end("runner", runner, &[executed, other]);
        assert!(journal.running().is_empty());
        assert_eq!(journal.saved_ms("waiter").unwrap(), 1500);
        assert_eq!(journal.saved_ms("runner").unwrap(), 0);
        // Its runner's journal gone, what was known is kept until the waiter goes too.
        journal.remove("runner", "t").unwrap();
        assert_eq!(journal.saved_ms("waiter").unwrap(), 1500);
        journal.remove("waiter", "t").unwrap();
        assert_eq!(journal.saved_ms("waiter").unwrap(), 0);
    }

    #[test]
    fn an_abandoned_run_leaves_memory_and_is_announced() {
        let journal = Journal::new(std::sync::Arc::new(kiln_kv::MemoryKv::new()));
        let run = journal.begin("b", "t");
        journal.event("b", &BuildEvent::Planned(vec![record("a")]));
        journal.event("b", &BuildEvent::Started { vertex: record("a").digest, at: 1 });
        let mut changes = journal.watch();
        journal.abandon("b", run);
        assert!(journal.running().is_empty() && journal.records("b").unwrap().is_empty());
        assert_eq!(changes.try_recv().unwrap(), BuildChange { id: "b".into(), tenant: "t".into(), listed: true });
    }
}
