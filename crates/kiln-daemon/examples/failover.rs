//! Failover under load: three raft members of a replicated coordinator in this process (each
//! on its own synced sled directory, the raft service over gRPC on 127.0.0.ID), with writers
//! committing cache entries through the leader all along. KILLS times the leader is killed
//! (its server and node stop at once); each time, the time from the kill to the
//! first entry the new leader commits is measured, then the old leader is started again and
//! catches up before the next kill. Prints one JSON object: p50, p99 and max of those times,
//! every time, and the entries committed. (The member's store is closed cleanly; for the
//! others a stopped member and a SIGKILLed one are the same.)
//!
//! `cargo run --release -p kiln-daemon --example failover -- [KILLS [WRITERS]]`

#[path = "common/members.rs"]
mod members;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_raft::Write;
use kiln_solver::CACHE_TREE;
use members::Members;
use tokio::sync::watch;

/// One small cache entry, as a replicated coordinator writes it.
fn entry(n: u64) -> Vec<u8> {
    let mut batch = kiln_kv::Batch::default();
    batch.put(kiln_types::Digest::of(&n.to_be_bytes()).to_string(), vec![b'x'; 160]);
    Write { tree: CACHE_TREE.to_string(), batch }.encode()
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (kills, writers) = (args.first().copied().unwrap_or(20), args.get(1).copied().unwrap_or(8));
    let mut members = Members::start(3).await;
    let mut leader = members.leader(None).await;
    // The writers propose to whoever leads now; a refusal (no leader, or a deposed one) is
    // tried again on the next leader.
    let (leaders, current) = watch::channel(Some(Arc::clone(&members.member(leader).node)));
    let committed = Arc::new(watch::Sender::new(0u64));
    for writer in 0..writers as u64 {
        let (mut current, committed) = (current.clone(), Arc::clone(&committed));
        tokio::spawn(async move {
            let mut n = writer << 40;
            loop {
                let node = current.borrow_and_update().clone();
                let Some(node) = node else {
                    let _ = current.changed().await;
                    continue;
                };
                n += 1;
                if node.propose(entry(n)).await.is_ok() {
                    committed.send_modify(|count| *count += 1);
                } else {
                    let _ = tokio::time::timeout(Duration::from_millis(50), current.changed()).await;
                }
            }
        });
    }
    let mut times = Vec::new();
    for _ in 0..kills {
        // Load first: the writers commit through this leader.
        let before = *committed.borrow();
        let _ = committed.subscribe().wait_for(|count| *count >= before + 100).await;
        let killed_at = Instant::now();
        let _ = leaders.send(None);
        members.kill(leader).await;
        let next = members.leader(Some(leader)).await;
        members.member(next).node.propose(entry(u64::MAX - times.len() as u64)).await.expect("the new leader commits");
        times.push(killed_at.elapsed());
        let _ = leaders.send(Some(Arc::clone(&members.member(next).node)));
        // The old leader comes back and catches up before the next kill (two down is no
        // quorum).
        members.restart(leader).await;
        let target = members.member(next).node.status().commit;
        let mut status = members.member(leader).node.subscribe();
        tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| s.applied >= target))
            .await
            .expect("the restarted member catches up within 60 s")
            .unwrap();
        leader = next;
    }
    times.sort();
    let at = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)].as_secs_f64() * 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "kills": kills,
            "writers": writers,
            "p50_ms": at(0.5),
            "p99_ms": at(0.99),
            "max_ms": times.last().unwrap().as_secs_f64() * 1000.0,
            "committed": *committed.borrow(),
            "all_ms": times.iter().map(|t| (t.as_secs_f64() * 1000.0).round()).collect::<Vec<_>>(),
        })
    );
}
