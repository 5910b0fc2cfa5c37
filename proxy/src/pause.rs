//! The hold/release barrier at transaction boundaries. A session calls
//! [`PauseGate::enter`] before it starts a transaction (the first message
//! sent while idle) and [`PauseGate::exit`] when the node reports it idle
//! again. [`PauseGate::pause`] stops new entries and waits until nothing is
//! in flight; [`PauseGate::resume`] lets waiting sessions go on. The admin
//! console's PAUSE/RESUME use it now; generation switches will too.

use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct State {
    paused: bool,
    in_flight: usize,
    waiting: usize,
}

#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<State>,
    /// Woken on resume (for waiting sessions) and when in_flight drops
    /// (for a pauser).
    changed: Notify,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{in_flight} transaction(s) still in flight after {waited:?}; not paused")]
pub struct PauseTimeout {
    pub in_flight: usize,
    pub waited: Duration,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counters
        // inconsistent (each critical section is one update), so recover.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while paused, then counts one transaction in flight.
    pub async fn enter(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if !s.paused {
                    s.in_flight += 1;
                    return;
                }
                s.waiting += 1;
            }
            notified.await;
            self.lock().waiting -= 1;
        }
    }

    pub fn exit(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.paused && s.in_flight == 0 {
            drop(s);
            self.changed.notify_waiters();
        }
    }

    /// Stops new transactions and waits until none is in flight. After
    /// `timeout` it gives up, resumes, and says how many were left.
    pub async fn pause(&self, timeout: Duration) -> Result<(), PauseTimeout> {
        self.lock().paused = true;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let in_flight = self.lock().in_flight;
            if in_flight == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let in_flight = self.lock().in_flight;
                if in_flight == 0 {
                    return Ok(());
                }
                self.resume();
                return Err(PauseTimeout { in_flight, waited: timeout });
            }
        }
    }

    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_waiters();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn pause_waits_for_in_flight_and_holds_new_ones() {
        let gate = Arc::new(PauseGate::default());
        gate.enter().await;
        let g = gate.clone();
        let pauser = tokio::spawn(async move { g.pause(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pauser.is_finished(), "pause must wait for the transaction in flight");
        gate.exit();
        pauser.await.unwrap().unwrap();

        let g = gate.clone();
        let newcomer = tokio::spawn(async move { g.enter().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!newcomer.is_finished(), "a new transaction waits while paused");
        assert_eq!(gate.waiting(), 1);
        gate.resume();
        newcomer.await.unwrap();
        assert_eq!(gate.in_flight(), 1);
    }

    #[tokio::test]
    async fn pause_is_bounded_and_resumes_on_timeout() {
        let gate = PauseGate::default();
        gate.enter().await;
        let err = gate.pause(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.in_flight, 1);
        assert!(!gate.is_paused());
    }
}
