use super::*;

fn amd64() -> Platform {
    "linux/amd64".parse().unwrap()
}

fn arm64() -> Platform {
    "linux/arm64".parse().unwrap()
}

fn digest(n: u8) -> Digest {
    Digest::of(&[n])
}

fn layer(n: u8, size: u64) -> LayerDesc {
    LayerDesc { diff_id: digest(n), size }
}

fn info(name: &str, platform: Platform, slots: usize) -> WorkerInfo {
    WorkerInfo {
        name: name.into(),
        platforms: vec![platform],
        labels: BTreeMap::new(),
        max_parallelism: slots,
        capacity: 0,
        free_disk: 0,
        cache_bytes: 0,
        address: format!("http://{name}"),
        entitlements: Vec::new(),
    }
}

fn settings() -> ClusterSettings {
    ClusterSettings { lease_ms: 1000, placement_timeout_ms: 5000, retry_budget: 2, locality_load_bound: 0.5 }
}

fn register(state: &mut ClusterState, info: WorkerInfo, layers: Vec<Digest>) -> u64 {
    let effects = state.apply(ClusterCommand::Register { info, layers, adopt: vec![], at: 0 });
    effects
        .iter()
        .find_map(|e| match e {
            ClusterEffect::Registered { session, .. } => Some(*session),
            _ => None,
        })
        .expect("a session")
}

fn submit(
    state: &mut ClusterState,
    job: JobId,
    build: u64,
    platform: Option<Platform>,
    inputs: Vec<LayerDesc>,
) -> Vec<ClusterEffect> {
    state.apply(ClusterCommand::Submit {
        job,
        spec: JobSpec { build, platform, inputs, entitlements: Vec::new() },
        held_by: None,
        at: 0,
    })
}

fn assigned(effects: &[ClusterEffect]) -> Vec<(JobId, u32, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            ClusterEffect::Assign { job, epoch, worker, .. } => Some((*job, *epoch, worker.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn jobs_go_only_to_workers_of_their_platform() {
    let mut state = ClusterState::new(settings());
    register(&mut state, info("a", amd64(), 4), vec![]);
    register(&mut state, info("b", arm64(), 4), vec![]);
    assert_eq!(assigned(&submit(&mut state, 1, 1, Some(arm64()), vec![])), vec![(1, 0, "b".into())]);
    assert_eq!(assigned(&submit(&mut state, 2, 1, Some(amd64()), vec![])), vec![(2, 0, "a".into())]);
}

#[test]
fn heartbeats_tell_the_disk_and_cache_and_running_jobs_are_listed_by_worker() {
    let mut state = ClusterState::new(settings());
    let session = register(&mut state, info("a", amd64(), 4), vec![]);
    register(&mut state, info("b", amd64(), 4), vec![]);
    state.apply(ClusterCommand::Heartbeat {
        worker: "a".into(),
        session,
        beat: Beat { free_disk: 9, cache_bytes: 5, capacity: 0 },
        at: 700,
    });
    let a = state.workers().into_iter().find(|w| w.info.name == "a").unwrap();
    assert_eq!((a.info.free_disk, a.info.cache_bytes, a.last_heartbeat), (9, 5, 700));
    let placed = assigned(&submit(&mut state, 1, 1, Some(amd64()), vec![]));
    assert_eq!(placed.len(), 1);
    let mut running = state.running_jobs();
    running.sort();
    assert_eq!(running, placed.iter().map(|(job, _, worker)| (worker.clone(), *job)).collect::<Vec<_>>());
}

#[test]
fn a_worker_takes_as_many_jobs_as_its_capacity_says_within_its_max_parallelism() {
    let mut state = ClusterState::new(settings());
    let session = register(&mut state, WorkerInfo { capacity: 2, ..info("a", amd64(), 6) }, vec![]);
    let placed: Vec<_> = (1..=8).flat_map(|job| assigned(&submit(&mut state, job, 1, None, vec![]))).collect();
    assert_eq!(placed.len(), 2, "its capacity at registration");
    let beat = |capacity| ClusterCommand::Heartbeat {
        worker: "a".into(),
        session,
        beat: Beat { capacity, ..Beat::default() },
        at: 10,
    };
    // A larger capacity places queued jobs at once, up to the worker's max-parallelism.
    assert_eq!(assigned(&state.apply(beat(5))).len(), 3);
    assert_eq!(assigned(&state.apply(beat(32))).len(), 1);
    assert_eq!(state.workers()[0].info.slots(), 6);
    // A smaller one places nothing until the running jobs are below it.
    state.apply(beat(3));
    for job in 1..=4 {
        let report = ClusterCommand::Report { job, epoch: 0, worker: "a".into(), layers: vec![] };
        let placed = assigned(&state.apply(report));
        // Six ran: the fourth job's end leaves two, below three.
        assert_eq!(placed.len(), usize::from(job == 4), "after job {job}");
    }
}

#[test]
fn a_job_without_a_worker_of_its_platform_waits_then_fails() {
    let mut state = ClusterState::new(settings());
    let session = register(&mut state, info("a", amd64(), 4), vec![]);
    assert!(assigned(&submit(&mut state, 1, 1, Some(arm64()), vec![])).is_empty());
    state.apply(ClusterCommand::Heartbeat { worker: "a".into(), session, beat: Beat::default(), at: 900 });
    let effects = state.apply(ClusterCommand::Tick { at: 1000 });
    let waiting = effects.iter().find_map(|e| match e {
        ClusterEffect::Waiting { job: 1, message } => Some(message.clone()),
        _ => None,
    });
    assert_eq!(waiting.as_deref(), Some("waiting for a worker for linux/arm64 (connected: a (linux/amd64))"));
    state.apply(ClusterCommand::Heartbeat { worker: "a".into(), session, beat: Beat::default(), at: 4900 });
    let effects = state.apply(ClusterCommand::Tick { at: 5000 });
    assert_eq!(
        effects,
        vec![ClusterEffect::Fail {
            job: 1,
            error: "no worker for linux/arm64 within 5 s (connected: a (linux/amd64))".into()
        }]
    );
    assert_eq!(state.queued(), 0);
}

#[test]
fn a_worker_arriving_in_time_takes_the_waiting_job() {
    let mut state = ClusterState::new(settings());
    assert!(assigned(&submit(&mut state, 1, 1, Some(arm64()), vec![])).is_empty());
    let effects =
        state.apply(ClusterCommand::Register { info: info("b", arm64(), 1), layers: vec![], adopt: vec![], at: 10 });
    assert_eq!(assigned(&effects), vec![(1, 0, "b".into())]);
}

#[test]
fn locality_wins_until_the_load_bound_then_the_least_loaded_worker() {
    let mut state = ClusterState::new(settings());
    register(&mut state, info("a", amd64(), 4), vec![]);
    register(&mut state, info("b", amd64(), 4), vec![digest(1)]);
    let input = vec![layer(1, 1000), layer(2, 10)];
    // b holds most input bytes: it takes jobs while at or below half load.
    for job in 1..=3 {
        assert_eq!(assigned(&submit(&mut state, job, 1, Some(amd64()), input.clone())), vec![(job, 0, "b".into())]);
    }
    // b is at 3/4: the next one spills to a.
    assert_eq!(assigned(&submit(&mut state, 4, 1, Some(amd64()), input.clone())), vec![(4, 0, "a".into())]);
    // Without locality, the least-loaded worker.
    assert_eq!(assigned(&submit(&mut state, 5, 1, Some(amd64()), vec![])), vec![(5, 0, "a".into())]);
}

#[test]
fn results_teach_where_layers_are() {
    let mut state = ClusterState::new(settings());
    register(&mut state, info("a", amd64(), 1), vec![]);
    register(&mut state, info("b", amd64(), 1), vec![]);
    assert_eq!(assigned(&submit(&mut state, 1, 1, None, vec![])), vec![(1, 0, "a".into())]);
    let effects =
        state.apply(ClusterCommand::Report { job: 1, epoch: 0, worker: "a".into(), layers: vec![layer(7, 5)] });
    assert_eq!(effects, vec![ClusterEffect::Accept { job: 1, worker: "a".into() }]);
    assert_eq!(state.holders(&digest(7), "b"), vec!["http://a".to_string()]);
    assert!(state.holders(&digest(7), "a").is_empty());
}

#[test]
fn builds_take_turns() {
    let mut state = ClusterState::new(settings());
    // Build 1 queues many jobs before any worker exists; build 2 queues one.
    for job in 1..=5 {
        submit(&mut state, job, 1, None, vec![]);
    }
    submit(&mut state, 100, 2, None, vec![]);
    let effects =
        state.apply(ClusterCommand::Register { info: info("a", amd64(), 2), layers: vec![], adopt: vec![], at: 0 });
    let jobs: Vec<JobId> = assigned(&effects).into_iter().map(|(job, _, _)| job).collect();
    assert_eq!(jobs, vec![1, 100]);
}

#[test]
fn a_lost_worker_requeues_its_jobs_with_a_new_epoch_and_late_reports_are_dropped() {
    let mut state = ClusterState::new(settings());
    let a = register(&mut state, info("a", amd64(), 1), vec![]);
    assert_eq!(assigned(&submit(&mut state, 1, 1, None, vec![])), vec![(1, 0, "a".into())]);
    let effects =
        state.apply(ClusterCommand::Register { info: info("b", amd64(), 1), layers: vec![], adopt: vec![], at: 0 });
    assert!(assigned(&effects).is_empty());
    let effects = state.apply(ClusterCommand::Disconnect { worker: "a".into(), session: a, at: 10 });
    assert_eq!(effects[0], ClusterEffect::Lost { worker: "a".into(), session: a });
    assert_eq!(assigned(&effects), vec![(1, 1, "b".into())]);
    let late = state.apply(ClusterCommand::Report { job: 1, epoch: 0, worker: "a".into(), layers: vec![] });
    assert_eq!(late, vec![ClusterEffect::Late { job: 1, worker: "a".into() }]);
    let accepted = state.apply(ClusterCommand::Report { job: 1, epoch: 1, worker: "b".into(), layers: vec![] });
    assert_eq!(accepted, vec![ClusterEffect::Accept { job: 1, worker: "b".into() }]);
    // Reported twice: the second is late.
    let again = state.apply(ClusterCommand::Report { job: 1, epoch: 1, worker: "b".into(), layers: vec![] });
    assert_eq!(again, vec![ClusterEffect::Late { job: 1, worker: "b".into() }]);
}

#[test]
fn an_expired_lease_loses_the_worker_and_the_retry_budget_bounds_requeues() {
    let mut state = ClusterState::new(settings());
    submit(&mut state, 1, 1, None, vec![]);
    for (round, at) in [(0u64, 0u64), (1, 2000), (2, 4000)] {
        let effects = state.apply(ClusterCommand::Register {
            info: info(&format!("w{round}"), amd64(), 1),
            layers: vec![],
            adopt: vec![],
            at,
        });
        assert_eq!(assigned(&effects), vec![(1, round as u32, format!("w{round}"))]);
        let effects = state.apply(ClusterCommand::Tick { at: at + 1000 });
        assert!(matches!(&effects[0], ClusterEffect::Lost { worker, .. } if *worker == format!("w{round}")));
        if round == 2 {
            assert_eq!(
                effects[1],
                ClusterEffect::Fail {
                    job: 1,
                    error: "its worker was lost 3 times (last: w2); retry budget spent".into()
                }
            );
        }
    }
    assert_eq!(state.queued(), 0);
}

#[test]
fn a_draining_worker_takes_no_new_jobs_and_a_cancel_revokes() {
    let mut state = ClusterState::new(settings());
    let a = register(&mut state, info("a", amd64(), 2), vec![]);
    assert_eq!(assigned(&submit(&mut state, 1, 1, None, vec![])), vec![(1, 0, "a".into())]);
    state.apply(ClusterCommand::Drain { worker: "a".into(), session: a });
    assert!(assigned(&submit(&mut state, 2, 1, None, vec![])).is_empty());
    assert_eq!(
        state.apply(ClusterCommand::Cancel { job: 1 }),
        vec![ClusterEffect::Revoke { job: 1, worker: "a".into() }]
    );
    assert!(state.apply(ClusterCommand::Cancel { job: 2 }).is_empty());
    assert_eq!(state.queued(), 0);
    assert_eq!(state.workers()[0].running, 0);
}

#[test]
fn a_stale_session_cannot_heartbeat_or_disconnect_the_new_one() {
    let mut state = ClusterState::new(settings());
    let old = register(&mut state, info("a", amd64(), 1), vec![]);
    let new = register(&mut state, info("a", amd64(), 1), vec![]);
    assert_ne!(old, new);
    assert!(state.apply(ClusterCommand::Disconnect { worker: "a".into(), session: old, at: 1 }).is_empty());
    assert_eq!(state.workers().len(), 1);
}

#[test]
fn a_job_whose_work_a_worker_holds_is_adopted_there_past_its_slots_and_only_there() {
    let mut state = ClusterState::new(settings());
    register(&mut state, info("a", amd64(), 1), vec![]);
    register(&mut state, info("b", amd64(), 1), vec![]);
    assert_eq!(assigned(&submit(&mut state, 1, 1, Some(amd64()), vec![])), vec![(1, 0, "a".into())]);
    // a's only slot is taken, yet the work it holds goes to it, marked adopted.
    let spec = JobSpec { build: 1, platform: Some(amd64()), inputs: vec![], entitlements: vec![] };
    let effects = state.apply(ClusterCommand::Submit { job: 2, spec: spec.clone(), held_by: Some("a".into()), at: 0 });
    assert_eq!(effects, vec![ClusterEffect::Assign { job: 2, epoch: 0, worker: "a".into(), adopted: true }]);
    // A holder that cannot run the job (another platform) or is gone: the job is placed as usual.
    register(&mut state, info("c", arm64(), 1), vec![]);
    let effects = state.apply(ClusterCommand::Submit { job: 3, spec: spec.clone(), held_by: Some("c".into()), at: 0 });
    assert_eq!(assigned(&effects), vec![(3, 0, "b".into())]);
    let effects = state.apply(ClusterCommand::Submit { job: 4, spec, held_by: Some("gone".into()), at: 0 });
    assert!(assigned(&effects).is_empty());
    assert_eq!(state.queued(), 1);
    // A queued job is adopted by the worker that registers holding its work; one assigned
    // elsewhere is left alone.
    let effects =
        state.apply(ClusterCommand::Register { info: info("d", amd64(), 1), layers: vec![], adopt: vec![4, 1], at: 0 });
    assert_eq!(assigned(&effects), vec![(4, 0, "d".into())]);
    assert!(effects.contains(&ClusterEffect::Assign { job: 4, epoch: 0, worker: "d".into(), adopted: true }));
    assert_eq!(state.queued(), 0);

    // A worker registering again gets back the jobs of its old session it kept, before they
    // can be placed on another worker with a free slot.
    let effects =
        state.apply(ClusterCommand::Register { info: info("a", amd64(), 1), layers: vec![], adopt: vec![1, 2], at: 1 });
    let mut back = assigned(&effects);
    back.sort();
    assert_eq!(back, vec![(1, 1, "a".into()), (2, 1, "a".into())]);
}
