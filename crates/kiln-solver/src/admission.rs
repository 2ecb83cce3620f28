//! How many executions run at once on a worker (docs/parallelism.md).
//!
//! - [`Parallelism::Fixed`]: at most N (a set `max-parallelism`).
//! - [`Parallelism::Adaptive`] (the default): as many as the machine takes. One per CPU is
//!   admitted at once; past that, another step is admitted only while the machine is calm,
//!   as Linux's pressure stall information says: over the last [`TICK`], tasks waited for a
//!   CPU less than [`CPU_CALM`] of the time and for memory less than [`MEMORY_CALM`]. Every
//!   calm tick admits up to as many more steps as run (at least one per CPU), so steps
//!   that sleep or wait on the network are all running within a few ticks while compilers
//!   stay near one per CPU; the ceiling bounds it all. Without pressure information (a kernel without PSI), it is fixed at
//!   [`FALLBACK_PER_CPU`] per CPU.
//!
//! Each admission past the CPUs is a [`Decision`] the step's output tells at debug level.
//!
//! A cluster worker also tells its coordinator how many jobs to place on it at once, its
//! [capacity](Admission::capacity), counted in jobs placed on it ([`Admission::set_placed`]).
//! An adaptive one starts at one per CPU. While the worker holds its whole capacity (or
//! steps wait, or the capacity is more than it needs), the pressure is read every tick: a
//! calm tick sets it to the jobs placed plus as many again (at least one per CPU), as the
//! admission would let in that many more; a busy tick lowers it to the jobs placed.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

/// The limit on executions at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallelism {
    /// At most this many.
    Fixed(usize),
    /// As many as the machine takes without pressure, at most `ceiling`.
    Adaptive {
        /// The hard limit.
        ceiling: usize,
    },
}

impl Parallelism {
    /// `max-parallelism` when set, else adaptive up to [`DEFAULT_CEILING_PER_CPU`] per CPU.
    pub fn from_setting(max: Option<usize>) -> Parallelism {
        match max {
            Some(n) => Parallelism::Fixed(n.max(1)),
            None => Parallelism::Adaptive { ceiling: DEFAULT_CEILING_PER_CPU * cpus() },
        }
    }

    /// The pressure an admission of it reads: the machine's ([`PressureFiles::find`]) when
    /// adaptive, none when fixed.
    pub fn pressure(self) -> Option<Pressure> {
        match self {
            Parallelism::Adaptive { .. } => PressureFiles::find().map(PressureFiles::pressure),
            Parallelism::Fixed(_) => None,
        }
    }
}

/// How often an adaptive admission reads the pressure while steps wait.
pub const TICK: Duration = Duration::from_millis(20);
/// Below this share of a tick with a task waiting for a CPU, the machine takes more.
pub const CPU_CALM: f64 = 0.25;
/// Below this share of a tick with a task waiting for memory, the machine takes more.
pub const MEMORY_CALM: f64 = 0.02;
/// The default ceiling of an adaptive admission, per CPU.
pub const DEFAULT_CEILING_PER_CPU: usize = 32;
/// Executions per CPU when the kernel gives no pressure information.
pub const FALLBACK_PER_CPU: usize = 4;

/// The CPUs this process may use.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Why a step waiting for a slot was admitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Steps running with it.
    pub running: usize,
    /// The share of the last tick some task waited for a CPU.
    pub cpu: f64,
    /// The share of the last tick some task waited for memory.
    pub memory: f64,
    /// How long it waited.
    pub waited: Duration,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "admitted as step {} at once after {} ms: CPU pressure {:.0}%, memory pressure {:.0}% (calm below {:.0}% and {:.0}%)",
            self.running,
            self.waited.as_millis(),
            self.cpu * 100.0,
            self.memory * 100.0,
            CPU_CALM * 100.0,
            MEMORY_CALM * 100.0
        )
    }
}

/// Reads the machine's stall totals now: (cpu, memory), µs during which some task waited.
pub type Pressure = Arc<dyn Fn() -> Option<(u64, u64)> + Send + Sync>;

/// Where the pressure is read: the `some` lines' stall totals (µs) of `cpu.pressure` and
/// `memory.pressure` in the directory `KILN_PRESSURE_DIR` names, else in this process's
/// cgroup (v2), else `/proc/pressure`'s `cpu` and `memory`.
#[derive(Debug, Clone)]
pub struct PressureFiles {
    cpu: PathBuf,
    memory: PathBuf,
}

impl PressureFiles {
    /// This machine's, if the kernel keeps pressure information: the files in the directory
    /// `KILN_PRESSURE_DIR` names (`cpu.pressure`, `memory.pressure`), else the whole
    /// machine's (`/proc/pressure/cpu`, `/proc/pressure/memory`). The machine's, not the
    /// daemon's cgroup: the steps run in cgroups of their own, and they share the machine
    /// with whatever else runs on it.
    pub fn find() -> Option<PressureFiles> {
        let files = match std::env::var_os("KILN_PRESSURE_DIR").map(PathBuf::from) {
            Some(dir) => PressureFiles { cpu: dir.join("cpu.pressure"), memory: dir.join("memory.pressure") },
            None => PressureFiles {
                cpu: PathBuf::from("/proc/pressure/cpu"),
                memory: PathBuf::from("/proc/pressure/memory"),
            },
        };
        if files.read().is_some() {
            tracing::info!(
                "parallelism adapts to the pressure in {} and {}",
                files.cpu.display(),
                files.memory.display()
            );
            Some(files)
        } else {
            tracing::warn!(
                "no pressure information in {}: at most {FALLBACK_PER_CPU} steps per CPU at once",
                files.cpu.display()
            );
            None
        }
    }

    /// Reads them.
    pub fn pressure(self) -> Pressure {
        Arc::new(move || self.read())
    }

    /// The stall totals now: (cpu, memory) in µs.
    fn read(&self) -> Option<(u64, u64)> {
        Some((
            some_total(&std::fs::read_to_string(&self.cpu).ok()?)?,
            some_total(&std::fs::read_to_string(&self.memory).ok()?)?,
        ))
    }
}

/// The `total=` of a pressure file's `some` line.
fn some_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace().find_map(|field| field.strip_prefix("total="))?.parse().ok()
}

/// What a step that waited for its slot learns: how long, and the line saying why it was
/// let in past the CPUs (shown with `--debug`).
#[derive(Debug)]
pub struct Waited {
    /// The wait, in milliseconds.
    pub ms: u64,
    /// Why it was let in, when the machine's pressure let it in.
    pub line: Option<kiln_model::LogLine>,
}

/// A slot: the execution holds it while it runs. One the admission sent to a waiter that had
/// gone is given back when the channel drops it.
pub struct Permit {
    /// `None`: disarmed (never counted).
    admission: Option<Arc<Admission>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            admission.release();
        }
    }
}

/// The executions of a worker at once.
pub struct Admission {
    /// Admitted at once without asking the machine.
    floor: usize,
    /// Never more than this.
    ceiling: usize,
    /// `None`: fixed at the floor.
    pressure: Option<Pressure>,
    /// The jobs a coordinator may place at once, changed only when `reports_capacity` (a
    /// cluster worker's).
    capacity: watch::Sender<usize>,
    reports_capacity: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: usize,
    /// Jobs placed on this worker, as [`Admission::set_placed`] last told (a cluster
    /// worker's).
    placed: usize,
    /// Steps waiting, first come first admitted.
    waiting: VecDeque<Waiter>,
    /// Whether a task reads the pressure for the waiting steps.
    watching: bool,
    next_waiter: u64,
}

struct Waiter {
    id: u64,
    since: Instant,
    admit: oneshot::Sender<(Permit, Option<Decision>)>,
}

/// A waiting step's place in the queue: a step that stops waiting (its build was cancelled)
/// leaves it.
struct Place<'a> {
    admission: &'a Admission,
    id: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.admission.lock().waiting.retain(|waiter| waiter.id != self.id);
    }
}

impl Admission {
    /// An admission of `parallelism` reading `pressure` (adaptive only; without it, an
    /// adaptive admission is fixed at [`FALLBACK_PER_CPU`] per CPU).
    pub fn new(parallelism: Parallelism, pressure: Option<Pressure>) -> Arc<Admission> {
        Arc::new(Admission::build(parallelism, pressure, false))
    }

    /// [`Admission::new`] for a cluster worker: it keeps its [capacity](Admission::capacity)
    /// for the coordinator.
    pub fn for_cluster(parallelism: Parallelism, pressure: Option<Pressure>) -> Arc<Admission> {
        Arc::new(Admission::build(parallelism, pressure, true))
    }

    fn build(parallelism: Parallelism, pressure: Option<Pressure>, reports_capacity: bool) -> Admission {
        let (floor, ceiling, pressure) = match parallelism {
            Parallelism::Fixed(n) => (n.max(1), n.max(1), None),
            Parallelism::Adaptive { ceiling } => match pressure {
                Some(pressure) => (cpus().min(ceiling.max(1)), ceiling.max(1), Some(pressure)),
                None => {
                    let fixed = (FALLBACK_PER_CPU * cpus()).min(ceiling.max(1));
                    (fixed, fixed, None)
                }
            },
        };
        let capacity = watch::Sender::new(floor);
        Admission { floor, ceiling, pressure, capacity, reports_capacity, state: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most steps it lets run at once.
    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// The jobs a coordinator may place on this worker at once now, as it changes: fixed at
    /// the limit, or (adaptive) one per CPU, grown while the machine is calm and the worker
    /// holds that many, shrunk to what it holds under pressure. Only
    /// [`Admission::for_cluster`] changes it.
    pub fn capacity(&self) -> watch::Receiver<usize> {
        self.capacity.subscribe()
    }

    /// The capacity now.
    pub fn current_capacity(&self) -> usize {
        *self.capacity.borrow()
    }

    /// The jobs placed on this worker now (running, waiting for a slot, fetching inputs or
    /// resolving a source): what its coordinator counts against the capacity. Needs a tokio
    /// runtime (the pressure may be read from now on).
    pub fn set_placed(self: &Arc<Self>, placed: usize) {
        let mut state = self.lock();
        state.placed = placed;
        self.watch_if_wanted(&mut state);
    }

    /// Steps waiting and running.
    pub fn load(&self) -> (usize, usize) {
        let state = self.lock();
        (state.waiting.len(), state.running)
    }

    /// A slot at once, if one is free without asking the machine. Needs a tokio runtime (the
    /// pressure may be read from now on).
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut state = self.lock();
        let permit = self.take_at_once(&mut state);
        self.watch_if_wanted(&mut state);
        permit
    }

    /// A slot: at once when one is free, else once admitted. For a step that waited, how
    /// long, and (`--debug`) why it was let in past the CPUs. `waiting` makes what lives
    /// while it waits (the queue phase's span).
    pub async fn slot<G>(self: &Arc<Self>, waiting: impl FnOnce() -> G) -> (Permit, Option<Waited>) {
        if let Some(permit) = self.try_acquire() {
            return (permit, None);
        }
        let since = Instant::now();
        let guard = waiting();
        let (permit, decision) = self.acquire().await;
        drop(guard);
        let line = decision.map(|decision| kiln_model::LogLine {
            stream: kiln_model::LogStream::Debug,
            line: format!("[admission] {decision}"),
        });
        (permit, Some(Waited { ms: kiln_types::elapsed_ms(since), line }))
    }

    /// Starts reading the pressure if it is to be read now ([`Admission::wants_reading`]) and
    /// nothing reads it yet.
    fn watch_if_wanted(self: &Arc<Self>, state: &mut State) {
        if self.pressure.is_some() && !state.watching && self.wants_reading(state) {
            state.watching = true;
            tokio::spawn(Arc::clone(self).watch());
        }
    }

    /// Steps wait; or (a cluster worker) it holds its whole capacity, so the coordinator may
    /// have more for it, or its capacity is more than a calm tick would give it now, so it
    /// is to shrink.
    fn wants_reading(&self, state: &State) -> bool {
        if !state.waiting.is_empty() {
            return true;
        }
        if !self.reports_capacity {
            return false;
        }
        let (placed, capacity) = (self.placed(state), self.current_capacity());
        placed >= capacity || capacity > self.calm_capacity(placed)
    }

    /// The jobs placed on this worker: as told, and at least those holding or awaiting a slot.
    fn placed(&self, state: &State) -> usize {
        state.placed.max(state.running + state.waiting.len())
    }

    /// The capacity of a worker holding `placed` jobs on a calm machine: as many again (at
    /// least one per CPU more), within the ceiling.
    fn calm_capacity(&self, placed: usize) -> usize {
        (placed + self.floor.max(placed)).min(self.ceiling)
    }

    /// Tells the coordinator a new capacity (nothing when it is the same).
    fn set_capacity(&self, capacity: usize) {
        if self.reports_capacity {
            self.capacity.send_if_modified(|old| std::mem::replace(old, capacity) != capacity);
        }
    }

    fn take_at_once(self: &Arc<Self>, state: &mut State) -> Option<Permit> {
        if state.waiting.is_empty() && state.running < self.floor {
            state.running += 1;
            return Some(Permit { admission: Some(Arc::clone(self)) });
        }
        None
    }

    /// A slot, once admitted; with the decision when the machine's pressure admitted it.
    pub async fn acquire(self: &Arc<Self>) -> (Permit, Option<Decision>) {
        let (admit, admitted) = oneshot::channel();
        let place = {
            let mut state = self.lock();
            // Checked and queued under one lock: a slot freed in between is not missed.
            if let Some(permit) = self.take_at_once(&mut state) {
                self.watch_if_wanted(&mut state);
                return (permit, None);
            }
            let id = state.next_waiter;
            state.next_waiter += 1;
            state.waiting.push_back(Waiter { id, since: Instant::now(), admit });
            self.watch_if_wanted(&mut state);
            Place { admission: self, id }
        };
        let admitted = admitted.await.expect("an admission keeps its waiters until it admits them");
        drop(place);
        admitted
    }

    /// Admits the first waiter that is still there; whether one was.
    fn admit_first(self: &Arc<Self>, state: &mut State, decision: impl Fn(usize) -> Option<Decision>) -> bool {
        while let Some(waiter) = state.waiting.pop_front() {
            state.running += 1;
            let mut decision = decision(state.running);
            if let Some(decision) = &mut decision {
                decision.waited = waiter.since.elapsed();
            }
            match waiter.admit.send((Permit { admission: Some(Arc::clone(self)) }, decision)) {
                Ok(()) => {
                    if let Some(decision) = decision {
                        tracing::debug!(%decision, "admission");
                    }
                    return true;
                }
                Err((mut permit, _)) => {
                    // It went: the slot was never taken (and the lock is held here).
                    permit.admission = None;
                    state.running -= 1;
                }
            }
        }
        false
    }

    /// A slot came back: the first waiter takes it while under the floor.
    fn release(self: Arc<Self>) {
        let mut state = self.lock();
        state.running -= 1;
        while state.running < self.floor && self.admit_first(&mut state, |_| None) {}
    }

    /// Reads the pressure every [`TICK`] while [`Admission::wants_reading`]; each calm tick
    /// admits up to as many more as run (at least one per CPU), up to the ceiling, and sets
    /// the capacity to [`Admission::calm_capacity`]; each busy tick lowers it to the jobs
    /// placed.
    async fn watch(self: Arc<Self>) {
        let Some(read) = self.pressure.clone() else { return };
        let mut last = (Instant::now(), read());
        loop {
            tokio::time::sleep(TICK).await;
            let now = (Instant::now(), read());
            let elapsed = now.0.duration_since(last.0).as_micros().max(1) as f64;
            let share = |before: u64, after: u64| after.saturating_sub(before) as f64 / elapsed;
            let (cpu, memory) = match (last.1, now.1) {
                (Some((cpu0, mem0)), Some((cpu1, mem1))) => (share(cpu0, cpu1), share(mem0, mem1)),
                // Unreadable now: take it as busy (admit only at the floor).
                _ => (1.0, 1.0),
            };
            last = now;
            let mut state = self.lock();
            if !self.wants_reading(&state) {
                state.watching = false;
                return;
            }
            // Below the floor, always (a slot freed is taken at once; this only mends).
            while state.running < self.floor && self.admit_first(&mut state, |_| None) {}
            if cpu >= CPU_CALM || memory >= MEMORY_CALM {
                tracing::trace!(cpu, memory, running = state.running, waiting = state.waiting.len(), "admission: busy");
                self.set_capacity(self.floor.max(self.placed(&state)).min(self.ceiling));
                continue;
            }
            let decision = |running| Some(Decision { running, cpu, memory, waited: Duration::ZERO });
            for _ in 0..self.floor.max(state.running) {
                if state.running >= self.ceiling || !self.admit_first(&mut state, decision) {
                    break;
                }
            }
            self.set_capacity(self.calm_capacity(self.placed(&state)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_some_total_is_read() {
        let text = "some avg10=23.93 avg60=13.35 avg300=6.61 total=2541945693\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(some_total(text), Some(2_541_945_693));
        assert_eq!(some_total("full total=3\n"), None);
    }

    #[tokio::test]
    async fn a_fixed_admission_takes_n_and_then_the_first_waiter() {
        let admission = Admission::new(Parallelism::Fixed(2), None);
        let (a, b) = (admission.try_acquire().unwrap(), admission.try_acquire().unwrap());
        assert!(admission.try_acquire().is_none());
        let waiting = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.acquire().await }
        });
        while admission.load().0 == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(admission.load(), (1, 2));
        drop(a);
        let (_c, decision) = waiting.await.unwrap();
        assert_eq!((decision, admission.load()), (None, (0, 2)));
        drop(b);
        assert_eq!(admission.load(), (0, 1));
    }

    #[tokio::test]
    async fn a_step_that_stops_waiting_gives_its_place_and_its_slot_back() {
        let admission = Admission::new(Parallelism::Fixed(1), None);
        let held = admission.try_acquire().unwrap();
        let wait = |admission: &Arc<Admission>| {
            let admission = Arc::clone(admission);
            tokio::spawn(async move { admission.acquire().await })
        };
        // Cancelled while waiting: its place goes.
        let waiter = wait(&admission);
        while admission.load() != (1, 1) {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        assert!(waiter.await.is_err_and(|e| e.is_cancelled()));
        assert_eq!(admission.load(), (0, 1));
        // Cancelled as it is admitted (before or after the slot reached it): the slot comes
        // back either way.
        let waiter = wait(&admission);
        while admission.load() != (1, 1) {
            tokio::task::yield_now().await;
        }
        drop(held);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(admission.load(), (0, 0));
        assert!(admission.try_acquire().is_some(), "the slot is free");
    }

    #[tokio::test]
    async fn an_adaptive_admission_admits_past_the_cpus_while_calm_and_holds_under_pressure() {
        use std::sync::atomic::Ordering::SeqCst;
        let test = TestPressure::new(true);
        let admission = Admission::new(Parallelism::Adaptive { ceiling: cpus() * 3 }, Some(test.pressure()));
        let held: Vec<Permit> = (0..cpus()).map(|_| admission.try_acquire().unwrap()).collect();
        assert!(admission.try_acquire().is_none(), "one per CPU at once");
        let waiters: Vec<_> = (0..cpus() * 3)
            .map(|_| {
                let admission = Arc::clone(&admission);
                tokio::spawn(async move { admission.acquire().await })
            })
            .collect();
        // Three busy readings (the first is the watch's start): nothing is admitted.
        test.read_times(4).await;
        let (waiting, running) = admission.load();
        assert_eq!((waiting, running), (cpus() * 3, cpus()), "nothing admitted under pressure");
        test.busy.store(false, SeqCst);
        // Calm: the waiters come in, a few a tick, up to the ceiling.
        let mut waiters = waiters.into_iter();
        let mut admitted = Vec::new();
        for waiter in waiters.by_ref().take(cpus() * 2) {
            let (permit, decision) = tokio::time::timeout(Duration::from_secs(30), waiter).await.unwrap().unwrap();
            let decision = decision.expect("admitted by the pressure");
            assert!(decision.cpu < CPU_CALM && decision.running > cpus(), "{decision}");
            admitted.push(permit);
        }
        assert_eq!(admission.load(), (cpus(), cpus() * 3), "the ceiling holds");
        // Slots freed past the CPUs go to the waiters as the pressure allows.
        drop(held);
        for waiter in waiters {
            let (permit, _) = tokio::time::timeout(Duration::from_secs(30), waiter).await.unwrap().unwrap();
            admitted.push(permit);
        }
        assert_eq!(admission.load(), (0, cpus() * 3));
        drop(admitted);
        assert_eq!(admission.load(), (0, 0));
    }

    /// A pressure the test sets: each read while busy finds the CPU stall total grown by more
    /// than any tick. Reads are counted and told.
    struct TestPressure {
        busy: std::sync::atomic::AtomicBool,
        reads: std::sync::atomic::AtomicU64,
        total: std::sync::atomic::AtomicU64,
        read: tokio::sync::Notify,
    }

    impl TestPressure {
        fn new(busy: bool) -> Arc<TestPressure> {
            Arc::new(TestPressure {
                busy: busy.into(),
                reads: 0.into(),
                total: 0.into(),
                read: tokio::sync::Notify::new(),
            })
        }

        fn pressure(self: &Arc<Self>) -> Pressure {
            use std::sync::atomic::Ordering::SeqCst;
            let this = Arc::clone(self);
            Arc::new(move || {
                if this.busy.load(SeqCst) {
                    this.total.fetch_add(3_600_000_000, SeqCst);
                }
                this.reads.fetch_add(1, SeqCst);
                this.read.notify_one();
                Some((this.total.load(SeqCst), 0))
            })
        }

        /// Waits until it was read `n` times in all.
        async fn read_times(&self, n: u64) {
            while self.reads.load(std::sync::atomic::Ordering::SeqCst) < n {
                let told = tokio::time::timeout(Duration::from_secs(30), self.read.notified()).await;
                assert!(told.is_ok(), "the admission never read the pressure");
            }
        }
    }

    /// The capacity's next value.
    async fn changed(capacity: &mut watch::Receiver<usize>) -> usize {
        tokio::time::timeout(Duration::from_secs(30), capacity.changed()).await.unwrap().unwrap();
        *capacity.borrow_and_update()
    }

    #[tokio::test]
    async fn a_cluster_workers_capacity_grows_while_calm_and_full_and_shrinks_to_what_it_holds() {
        use std::sync::atomic::Ordering::SeqCst;
        let test = TestPressure::new(true);
        let admission = Admission::for_cluster(Parallelism::Adaptive { ceiling: cpus() * 3 }, Some(test.pressure()));
        let mut capacity = admission.capacity();
        assert_eq!(*capacity.borrow_and_update(), cpus(), "one job per CPU to begin with");
        // Running its whole capacity, the worker reads the pressure; busy, it offers no more.
        let held: Vec<Permit> = (0..cpus()).map(|_| admission.try_acquire().unwrap()).collect();
        test.read_times(3).await;
        assert!(!capacity.has_changed().unwrap(), "nothing more offered under pressure");
        // Calm: it offers as many more as run.
        test.busy.store(false, SeqCst);
        assert_eq!(changed(&mut capacity).await, cpus() * 2);
        // Under pressure again, with a job placed past the CPUs waiting: the capacity falls
        // back to the jobs placed, and the job waits.
        test.busy.store(true, SeqCst);
        let waiter = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.acquire().await }
        });
        assert_eq!(changed(&mut capacity).await, cpus() + 1);
        assert_eq!(admission.load(), (1, cpus()));
        // A job ending lets the waiter in.
        drop(held);
        let (permit, _) = tokio::time::timeout(Duration::from_secs(30), waiter).await.unwrap().unwrap();
        drop(permit);
        // Jobs the worker holds without a slot (sources, fetches) count: holding its whole
        // capacity so, it grows on a calm tick.
        test.busy.store(false, SeqCst);
        capacity.borrow_and_update();
        admission.set_placed(cpus() + 1);
        assert_eq!(changed(&mut capacity).await, (2 * cpus() + 2).min(3 * cpus()));
        // Its jobs gone, it shrinks back to one per CPU.
        admission.set_placed(0);
        assert_eq!(changed(&mut capacity).await, cpus());
        // A standalone admission's capacity never moves, and fills no reading.
        let standalone =
            Admission::new(Parallelism::Adaptive { ceiling: cpus() * 3 }, Some(TestPressure::new(false).pressure()));
        let _held: Vec<Permit> = (0..cpus()).map(|_| standalone.try_acquire().unwrap()).collect();
        let watching = standalone.state.lock().unwrap().watching;
        assert_eq!((standalone.current_capacity(), watching), (cpus(), false));
    }
}
