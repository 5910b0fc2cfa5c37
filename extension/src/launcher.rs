//! The launcher: a static background worker per node that starts one
//! receiver (a dynamic worker, [`crate::receiver`]) for each peer listed in
//! `mtm.cluster_nodes`, and starts it again when it exits (a receiver exits
//! on any error; restarting it resumes from its replication origin, so a
//! failed transaction is retried, never skipped). Once a second it also
//! runs the resolver ([`crate::resolver`]) and writes the decision log's
//! state file ([`crate::decisions::persist`]); every few milliseconds it
//! settles conflicts between the nodes' transactions
//! ([`crate::conflicts::Settler`]).
#![deny(unsafe_code)]

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::time::Duration;

/// `multimaster.database`: the replicated database, where the extension
/// and `mtm.cluster_nodes` live and the cluster's workers connect.
pub static DATABASE: pgrx::guc::GucSetting<Option<std::ffi::CString>> =
    pgrx::guc::GucSetting::<Option<std::ffi::CString>>::new(Some(c"postgres"));

/// The replicated database's name.
pub fn database() -> String {
    DATABASE.get().map(|d| d.to_string_lossy().into_owned()).unwrap_or_else(|| "postgres".into())
}

/// How often conflicts between nodes' transactions are looked for (a
/// look costs a few atomic reads unless an apply worker waits for a lock).
const SETTLE_EVERY: Duration = Duration::from_millis(5);

pub fn register() {
    BackgroundWorkerBuilder::new("multimaster launcher")
        .set_type("multimaster launcher")
        .set_library("multimaster")
        .set_function("mtm_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// The launcher's main function (entered through
/// `crate::pg::bgworker::mtm_launcher_main`).
pub fn main() {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&database()), None);
    let mut receivers: HashMap<i32, DynamicBackgroundWorker> = HashMap::new();
    // When each receiver was last started: a peer that is down must not
    // be retried in a tight loop (its worker exits at once).
    let mut started_at: HashMap<i32, std::time::Instant> = HashMap::new();
    let mut last_round = std::time::Instant::now() - Duration::from_secs(1);
    let mut settler = crate::conflicts::Settler::default();
    if !crate::decisions::checkpoints_logged() {
        warning!(
            "multimaster: log_checkpoints is off, so a commit decision logged just before a checkpoint can be lost in a crash; set it on (conf/node.conf does)"
        );
    }
    while BackgroundWorker::wait_latch(Some(SETTLE_EVERY)) {
        settler.settle();
        if last_round.elapsed() < Duration::from_secs(1) {
            continue;
        }
        last_round = std::time::Instant::now();
        crate::resolver::resolve_orphans();
        crate::decisions::persist();
        for peer in BackgroundWorker::transaction(peers) {
            // A worker registered but not yet forked counts as running.
            let alive = receivers
                .get(&peer)
                .is_some_and(|w| matches!(w.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)));
            let recently = started_at.get(&peer).is_some_and(|t| t.elapsed() < Duration::from_secs(1));
            if alive || recently {
                continue;
            }
            started_at.insert(peer, std::time::Instant::now());
            let started = BackgroundWorkerBuilder::new(&format!("multimaster receiver from node {peer}"))
                .set_type("multimaster receiver")
                .set_library("multimaster")
                .set_function("mtm_receiver_main")
                .set_extra(&peer.to_string())
                .enable_spi_access()
                .set_notify_pid(crate::pg::bgworker::my_pid())
                .load_dynamic();
            match started {
                Ok(w) => {
                    receivers.insert(peer, w);
                }
                Err(_) => log!("multimaster: cannot start a receiver for node {peer} (max_worker_processes?)"),
            }
        }
    }
    crate::decisions::persist();
}

/// Peers of this node, or none while the extension or cluster is not set up.
fn peers() -> Vec<i32> {
    let ready = Spi::get_one::<bool>("SELECT to_regclass('mtm.cluster_nodes') IS NOT NULL").ok().flatten().unwrap_or(false);
    if !ready {
        return Vec::new();
    }
    let list = Spi::get_one::<String>(
        "SELECT string_agg(id::text, ',') FROM mtm.cluster_nodes WHERE NOT is_self AND EXISTS (SELECT 1 FROM mtm.cluster_nodes WHERE is_self)",
    )
    .ok()
    .flatten()
    .unwrap_or_default();
    list.split(',').filter_map(|s| s.parse().ok()).collect()
}
