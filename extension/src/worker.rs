//! An apply worker of a peer's pool ([`crate::pool`]): reads whole
//! transactions from its queue and applies them with [`crate::apply`],
//! committing each in its turn. Any error that is not a 2PC "no" vote is
//! recorded for `mtm.nodes()` and ends the worker, which stops the pool;
//! the launcher restarts the receiver, which resumes from the origin and
//! applies the failed stretch one transaction at a time.
#![deny(unsafe_code)]

use crate::apply::Applier;
use crate::pg::dsm::{MqReceiver, Received};
use crate::pool::{Turn, SEQ_TAG};
use mtm_protocol::Message;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

/// The worker's main function (entered through
/// `crate::pg::bgworker::mtm_apply_worker_main`): `segment` is the handle
/// of its pool's queues.
pub fn main(segment: u32) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let extra: Vec<u64> = BackgroundWorker::get_extra().split(' ').filter_map(|s| s.parse().ok()).collect();
    let [peer, slot, epoch] = extra[..] else {
        error!("multimaster apply worker started without peer, slot and epoch");
    };
    let peer = peer as i32;
    BackgroundWorker::connect_worker_to_spi(Some(&crate::launcher::database()), None);
    // An ERROR unwinds to the entry point's pg_guard and ends the worker.
    crate::receiver::apply_session_settings(&format!("mtm_apply_{peer}_{slot}"));
    let origin = crate::pool::origin_of(peer);
    let Some((turn, mq)) = Turn::join(peer, slot as usize, epoch, segment, origin) else {
        return;
    };
    let mut applier = Applier::new(peer, turn);
    run(&mut applier, mq);
}

fn run(applier: &mut Applier, mut mq: MqReceiver) {
    let mut hungry = false;
    loop {
        if BackgroundWorker::sigterm_received() || applier.turn().stopped() {
            return;
        }
        match mq.receive() {
            Received::Message(bytes) => {
                if hungry {
                    hungry = false;
                    applier.turn().hungry(false);
                }
                if !bytes.is_empty() {
                    handle(applier, bytes);
                }
            }
            Received::WouldBlock => {
                if !hungry {
                    // Say so, then look once more: the receiver flushes
                    // for hungry workers, and one of us sees the other.
                    hungry = true;
                    applier.turn().hungry(true);
                    continue;
                }
                applier.idle();
                crate::pool::wait_latch(1000);
            }
            Received::Detached => return, // the receiver has gone
        }
    }
}

/// One queue message; an error is recorded for `mtm.nodes()`, then ends
/// the worker.
fn handle(applier: &mut Applier, bytes: &[u8]) {
    let peer = applier.peer();
    PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        if bytes.first() == Some(&SEQ_TAG) && bytes.len() == 9 {
            applier.start(u64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes")));
        } else {
            let msg = Message::decode(bytes).unwrap_or_else(|e| error!("multimaster: undecodable message from node {peer}: {e}"));
            applier.keep(&msg, bytes);
            applier.apply(msg);
        }
    }))
    .catch_others(|e| {
        let (sqlstate, message) = crate::apply::describe(&e);
        crate::status::record_apply_error(peer, &sqlstate, &message);
        e.rethrow()
    })
    .execute()
}
