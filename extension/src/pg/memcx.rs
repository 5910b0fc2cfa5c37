//! Memory contexts this code creates: the apply path's per-change scratch
//! context, the relation cache's function-manager lookups, the decoder's
//! per-change scratch context. One wrapper for the three, which differ in
//! their parent and in when they are reset.

use super::xact::TransactionMark;
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::CStr;
use std::rc::Rc;

/// A memory context (`AllocSetContextCreate`, ALLOCSET_DEFAULT_SIZES),
/// never deleted by this value: one under TopMemoryContext lives as long
/// as the process, one under another context is freed with it.
pub struct MemCx {
    cx: pg_sys::MemoryContext,
    /// Bumped by every reset and by the drop, so what is kept pointing
    /// into the context past a section ([`Allocated`]) can tell it was
    /// (or may be) freed.
    resets: Rc<Cell<u64>>,
}

/// Memory allocated in a [`MemCx`]: freed once the context is reset, and
/// no longer known to exist once the `MemCx` is dropped (a child of
/// another context goes with it).
pub(super) struct Allocated {
    at: u64,
    resets: Rc<Cell<u64>>,
}

impl Allocated {
    /// Whether the context was neither reset nor dropped since the
    /// allocation.
    pub(super) fn is_live(&self) -> bool {
        self.resets.get() == self.at
    }
}

impl MemCx {
    /// A child of TopMemoryContext named `name`, for the process's life.
    pub fn for_process(name: &'static CStr) -> Self {
        // SAFETY: TopMemoryContext exists in every backend and is never
        // freed.
        unsafe { Self::under(pg_sys::TopMemoryContext, name) }
    }

    /// A child of `parent` named `name`.
    ///
    /// # Safety
    /// `parent` is a live memory context that outlives the value (which
    /// is freed with it).
    pub(super) unsafe fn under(parent: pg_sys::MemoryContext, name: &'static CStr) -> Self {
        // SAFETY: a guarded binding; the parent is live (the contract), and
        // the name is static, as memory contexts require (they keep the
        // pointer).
        let cx = unsafe { pg_sys::AllocSetContextCreateInternal(parent, name.as_ptr(), 0, 8 * 1024, 8 * 1024 * 1024) };
        MemCx { cx, resets: Rc::new(Cell::new(0)) }
    }

    /// The context, to allocate in; whatever is kept past the section that
    /// made it holds [`Self::allocated`] and checks it before each use.
    pub(super) fn as_ptr(&self) -> pg_sys::MemoryContext {
        self.cx
    }

    /// A stamp for what is allocated in it now.
    pub(super) fn allocated(&self) -> Allocated {
        Allocated { at: self.resets.get(), resets: self.resets.clone() }
    }

    /// Runs `f` with this context current, then makes the previous one
    /// current again (not if `f` unwinds: catch inside `f`). `f` must not
    /// end the (sub)transaction it starts in: that could free the previous
    /// context, so it is checked.
    pub fn within<R>(&self, f: impl FnOnce() -> R) -> R {
        let started_in = TransactionMark::now();
        // SAFETY: our context is live (see the type); switching only
        // changes where palloc allocates.
        let outer = unsafe { pg_sys::MemoryContextSwitchTo(self.cx) };
        let r = f();
        assert!(started_in.is_current(), "multimaster: a scratch-context section ended its transaction");
        // SAFETY: the (sub)transaction that was current when `outer` was
        // is still in progress (checked above), so `outer` (its context,
        // or a longer-lived one) still exists.
        unsafe { pg_sys::MemoryContextSwitchTo(outer) };
        r
    }

    /// Runs `f` with this context current, then switches back and resets
    /// it. `&mut self` keeps a nested section (which would free what the
    /// outer one still uses) from compiling; `R: 'static` keeps `f` from
    /// returning a borrow of what it made. Unlike [`Self::within`] it asks
    /// PostgreSQL nothing about the transaction: its user, the decoder,
    /// runs one per decoded change, and a section there writes one change
    /// out, ending no transaction.
    pub fn within_then_reset<R: 'static>(&mut self, f: impl FnOnce() -> R) -> R {
        // SAFETY: our context is live (see the type); switching only
        // changes where palloc allocates.
        let old = unsafe { pg_sys::MemoryContextSwitchTo(self.cx) };
        let r = f();
        // SAFETY: restores the context that was current when the section
        // began (see above).
        unsafe { pg_sys::MemoryContextSwitchTo(old) };
        self.reset();
        r
    }

    /// `MemoryContextReset`: frees everything allocated in it.
    pub fn reset(&mut self) {
        self.resets.set(self.resets.get() + 1);
        // SAFETY: our own live context; `&mut self`: no section of it runs.
        // What the layer keeps pointing into it past a section carries its
        // stamp (a TypeFunction's FmgrInfo), which the bump above makes
        // refuse use; anything else allocated in it (executor states,
        // slots, values, a decoded change's send results) is referenced
        // only by values borrowed inside the section that made it.
        unsafe { pg_sys::MemoryContextReset(self.cx) }
    }
}

impl Drop for MemCx {
    /// Leaves the context itself alone (see the type), but what was
    /// allocated in it is not used afterwards: the parent may free it.
    fn drop(&mut self) {
        self.resets.set(self.resets.get() + 1);
    }
}
