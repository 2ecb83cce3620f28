//! A member that was down while the others compacted their logs catches up from a snapshot
//! larger than one gRPC message: it travels in pieces (`Raft.SendLarge`). Three members in
//! one process, each with its own sled store and gRPC server on 127.0.0.ID.

#[path = "../examples/common/members.rs"]
mod members;

use std::sync::Arc;
use std::time::Duration;

use kiln_kv::Batch;
use kiln_raft::ReplicatedKv;
use kiln_solver::CACHE_TREE;
use members::Members;

/// Bytes replicated while the member is down: more than one message may carry (64 MiB).
const VALUES: usize = 72;
const VALUE: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_down_for_long_catches_up_from_a_snapshot_larger_than_a_message() {
    let mut members = Members::start_tuned(3, |config| {
        config.compact_every = 16;
        config.keep_entries = 4;
    })
    .await;
    let leader = members.leader(None).await;
    let behind = (1..=3).find(|id| *id != leader).unwrap();
    members.kill(behind).await;

    let value = |n: usize| vec![n as u8; VALUE];
    let mut leader = leader;
    let writer = |leader: u64| {
        let (replicated, proposer) = ReplicatedKv::new(Arc::clone(&members.member(leader).kv), &[CACHE_TREE]);
        tokio::spawn(proposer.run(Arc::downgrade(&members.member(leader).node)));
        replicated
    };
    let mut replicated = writer(leader);
    for n in 0..VALUES {
        // A busy machine may see the leader change: the write goes to the next one.
        for attempt in 0.. {
            let mut batch = Batch::default();
            batch.put(format!("key-{n:03}"), value(n));
            match replicated.write_durably(CACHE_TREE, batch).await {
                Ok(_) => break,
                Err(error) if attempt < 5 => {
                    eprintln!("write {n}: {error}; to the current leader");
                    leader = members.leader(None).await;
                    replicated = writer(leader);
                }
                Err(error) => panic!("write {n}: {error}"),
            }
        }
    }

    // Back, it is far behind a log that starts after its last entry: only a snapshot helps.
    members.restart(behind).await;
    let leader = members.leader(Some(behind)).await;
    let target = members.member(leader).node.status().commit;
    let mut status = members.member(behind).node.subscribe();
    let caught_up = tokio::time::timeout(Duration::from_secs(120), status.wait_for(|s| s.applied >= target)).await;
    assert!(caught_up.is_ok(), "member {behind} did not catch up: {:?}", members.member(behind).node.status());
    let kv = &members.member(behind).kv;
    for n in 0..VALUES {
        let got = kv.get(CACHE_TREE, format!("key-{n:03}").as_bytes()).unwrap();
        assert!(got.as_deref() == Some(&value(n)[..]), "key-{n:03} is not what the leader wrote");
    }
}
