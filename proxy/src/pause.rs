//! The pause gate: who may close it, and what it holds while closed.
//!
//! Owners close the gate with a [`Hold`] (the admin console's PAUSE is one
//! owner; a generation switch will be another). The gate stays closed while
//! any owner holds it, and a hold is released only by dropping it, so one
//! owner's RESUME or timeout never opens the gate under another.
//!
//! While closed, the gate holds sessions at two points: the start of a
//! transaction ([`PauseGate::enter`], the first message sent while idle)
//! and the start of a cluster commit ([`PauseGate::commit`], before the
//! two-phase commit). A pause therefore waits only for commits already
//! past the gate ([`Hold::settle`]), never for sessions that sit idle in a
//! transaction: those are stopped at their COMMIT instead.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct State {
    /// (hold id, owner) of every hold that keeps the gate closed.
    holds: Vec<(u64, String)>,
    next_hold: u64,
    /// Commits past the gate and not yet finished: what a pause waits for.
    committing: usize,
    /// Sessions held at the gate, at a transaction start or a commit.
    waiting: usize,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    /// `!state.holds.is_empty()`, written under the lock: lets a
    /// transaction start through an open gate without taking the lock
    /// every session shares (one per transaction on the hot path).
    closed: AtomicBool,
    /// Transactions between `enter` and `exit` (shown, not waited for).
    in_flight: AtomicUsize,
    /// Woken when the gate opens (for held sessions) and when the last
    /// commit in progress ends (for owners settling).
    changed: Notify,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is one consistent update, so a panic in
        // another thread cannot leave the state half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The gate. Cloning shares it (holds outlive the borrow of any session).
#[derive(Debug, Default, Clone)]
pub struct PauseGate {
    inner: Arc<Inner>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{committing} commit(s) still in progress after {waited:?}; not paused")]
pub struct PauseTimeout {
    pub committing: usize,
    pub waited: Duration,
}

/// One owner's claim that the gate stay closed; dropping it releases that
/// claim only.
#[derive(Debug)]
#[must_use = "the gate opens again when the hold is dropped"]
pub struct Hold {
    inner: Arc<Inner>,
    id: u64,
    owner: String,
}

/// A commit past the gate; a pause waits until it is dropped.
#[derive(Debug)]
#[must_use = "the commit counts as in progress until this is dropped"]
pub struct CommitPass {
    inner: Arc<Inner>,
}

/// Counts a session as held at the gate for as long as it waits there,
/// even if its wait is abandoned (the session ends while held).
struct Waiting<'a>(&'a Inner);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

impl PauseGate {
    /// Waits while any owner holds the gate, then runs `admit` in the same
    /// critical section (so no hold can slip in between).
    async fn pass(&self, admit: fn(&mut State)) {
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let opened = self.inner.changed.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            {
                let mut s = self.inner.lock();
                if s.holds.is_empty() {
                    admit(&mut s);
                    if let Some(w) = waiting.take() {
                        // Uncounted here, under the lock already taken.
                        std::mem::forget(w);
                        s.waiting -= 1;
                    }
                    return;
                }
                if waiting.is_none() {
                    s.waiting += 1;
                    drop(s);
                    waiting = Some(Waiting(&self.inner));
                }
            }
            opened.await;
        }
    }

    /// Before a transaction starts: waits while the gate is held, then
    /// counts one transaction in flight.
    ///
    /// A transaction that finds the gate open goes on without the lock: if
    /// a hold closes the gate at that moment, the transaction counts as
    /// started before it, which a pause allows (it waits for commits, not
    /// for open transactions; the commit itself passes [`Self::commit`]).
    pub async fn enter(&self) {
        if !self.inner.closed.load(Ordering::Acquire) {
            self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.pass(|_| {}).await;
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn exit(&self) {
        // Never below zero: an exit without an enter is a caller's bug, not
        // a reason to show a huge count.
        let _ = self.inner.in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Before a cluster commit: waits while the gate is held. The commit
    /// counts as in progress until the pass is dropped.
    pub async fn commit(&self) -> CommitPass {
        self.pass(|s| s.committing += 1).await;
        CommitPass { inner: self.inner.clone() }
    }

    /// Closes the gate for `owner` at once; it stays closed until the hold
    /// (and every other owner's) is dropped.
    pub fn hold(&self, owner: impl Into<String>) -> Hold {
        let owner = owner.into();
        let mut s = self.inner.lock();
        let id = s.next_hold;
        s.next_hold += 1;
        s.holds.push((id, owner.clone()));
        self.inner.closed.store(true, Ordering::Release);
        Hold { inner: self.inner.clone(), id, owner }
    }

    /// Closes the gate for `owner` and waits until the commits already past
    /// it are done. After `timeout` this pause is released (others' stay)
    /// and the error says how many commits were left.
    pub async fn pause(&self, owner: impl Into<String>, timeout: Duration) -> Result<Hold, PauseTimeout> {
        let hold = self.hold(owner);
        hold.settle(timeout).await?;
        Ok(hold)
    }

    pub fn is_paused(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
    /// Owners holding the gate, oldest hold first.
    pub fn owners(&self) -> Vec<String> {
        self.inner.lock().holds.iter().map(|(_, o)| o.clone()).collect()
    }
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }
    pub fn committing(&self) -> usize {
        self.inner.lock().committing
    }
    pub fn waiting(&self) -> usize {
        self.inner.lock().waiting
    }
}

impl Hold {
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Waits until no commit that passed the gate before it closed is
    /// still in progress, at most `timeout`.
    pub async fn settle(&self, timeout: Duration) -> Result<(), PauseTimeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let committing = self.inner.lock().committing;
            if committing == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let committing = self.inner.lock().committing;
                if committing == 0 {
                    return Ok(());
                }
                return Err(PauseTimeout { committing, waited: timeout });
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut s = self.inner.lock();
        s.holds.retain(|(id, _)| *id != self.id);
        let opened = s.holds.is_empty();
        if opened {
            self.inner.closed.store(false, Ordering::Release);
        }
        drop(s);
        if opened {
            self.inner.changed.notify_waiters();
        }
    }
}

impl Drop for CommitPass {
    fn drop(&mut self) {
        let mut s = self.inner.lock();
        s.committing = s.committing.saturating_sub(1);
        let settled = s.committing == 0 && !s.holds.is_empty();
        drop(s);
        if settled {
            self.inner.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn blocked<T: Send + 'static>(task: &tokio::task::JoinHandle<T>) -> bool {
        tokio::time::sleep(Duration::from_millis(50)).await;
        !task.is_finished()
    }

    #[tokio::test]
    async fn a_hold_stops_new_transactions_and_commits_until_dropped() {
        let gate = PauseGate::default();
        let hold = gate.pause("admin", Duration::from_secs(1)).await.unwrap();
        let g = gate.clone();
        let newcomer = tokio::spawn(async move { g.enter().await });
        let g = gate.clone();
        let committer = tokio::spawn(async move { drop(g.commit().await) });
        assert!(blocked(&newcomer).await && blocked(&committer).await);
        assert_eq!(gate.waiting(), 2);
        drop(hold);
        newcomer.await.unwrap();
        committer.await.unwrap();
        assert_eq!((gate.in_flight(), gate.committing(), gate.waiting()), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_pause_waits_for_commits_in_progress_but_not_for_open_transactions() {
        let gate = PauseGate::default();
        // Open and idle in a transaction: does not delay the pause.
        gate.enter().await;
        let pass = gate.commit().await;
        let g = gate.clone();
        let pauser = tokio::spawn(async move { g.pause("admin", Duration::from_secs(5)).await.map(|h| h.owner().to_string()) });
        assert!(blocked(&pauser).await, "the pause waits for the commit in progress");
        assert!(gate.is_paused(), "the gate is closed while the pause settles");
        drop(pass);
        assert_eq!(pauser.await.unwrap().unwrap(), "admin");
        assert_eq!(gate.in_flight(), 1);
    }

    #[tokio::test]
    async fn one_owner_releasing_leaves_the_gate_closed_for_the_other() {
        let gate = PauseGate::default();
        let admin = gate.hold("admin console");
        let switch = gate.hold("generation switch");
        assert_eq!(gate.owners(), vec!["admin console", "generation switch"]);
        drop(admin);
        assert!(gate.is_paused());
        assert_eq!(gate.owners(), vec!["generation switch"]);
        let g = gate.clone();
        let newcomer = tokio::spawn(async move { g.enter().await });
        assert!(blocked(&newcomer).await, "still held by the generation switch");
        drop(switch);
        newcomer.await.unwrap();
        assert!(!gate.is_paused());
    }

    #[tokio::test]
    async fn a_timed_out_pause_releases_only_itself() {
        let gate = PauseGate::default();
        let pass = gate.commit().await;
        let switch = gate.hold("generation switch");
        let err = gate.pause("admin", Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.committing, 1);
        assert_eq!(gate.owners(), vec!["generation switch"], "the other owner's pause stands");
        drop(pass);
        drop(switch);
        assert!(!gate.is_paused());
        // Without another owner, the timed-out pause leaves the gate open.
        let _pass = gate.commit().await;
        gate.pause("admin", Duration::from_millis(20)).await.unwrap_err();
        assert!(!gate.is_paused());
    }

    #[tokio::test]
    async fn an_abandoned_wait_is_not_counted() {
        let gate = PauseGate::default();
        let hold = gate.hold("admin");
        let g = gate.clone();
        let newcomer = tokio::spawn(async move { g.enter().await });
        assert!(blocked(&newcomer).await);
        assert_eq!(gate.waiting(), 1);
        newcomer.abort();
        let _ = newcomer.await;
        assert_eq!(gate.waiting(), 0);
        drop(hold);
        assert_eq!(gate.in_flight(), 0);
    }
}
