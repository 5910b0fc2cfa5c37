//! Dynamic shared memory for the apply pools: the segment a receiver
//! creates for its workers' message queues (`dsm_create`/`dsm_attach`,
//! mapped for the rest of the process's life), the `shm_mq` queues laid
//! out in it, one per worker, and the `on_dsm_detach` callback that stops
//! a pool when any member leaves.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// A dynamic shared memory segment whose mapping is pinned: it stays
/// mapped until this process exits (nothing here detaches it), so a
/// `Segment` and the queues in it stay valid for the process's life.
pub struct Segment(*mut pg_sys::dsm_segment);

impl Segment {
    /// Creates a segment of `size` bytes and keeps it mapped.
    pub fn create(size: usize) -> Segment {
        // SAFETY: dsm_create raises ERROR rather than return null without
        // DSM_CREATE_NULL_IF_MAXSEGMENTS; pinning a segment we just got is
        // what keeps it valid beyond the current resource owner.
        unsafe {
            let seg = pg_sys::dsm_create(size, 0);
            pg_sys::dsm_pin_mapping(seg);
            Segment(seg)
        }
    }

    /// Attaches the segment `handle` and keeps it mapped; None if it no
    /// longer exists (its creator and every other member detached).
    pub fn attach(handle: pg_sys::dsm_handle) -> Option<Segment> {
        // SAFETY: dsm_attach returns null (not a dangling pointer) for a
        // segment that is gone; a non-null one is pinned at once.
        unsafe {
            let seg = pg_sys::dsm_attach(handle);
            if seg.is_null() {
                return None;
            }
            pg_sys::dsm_pin_mapping(seg);
            Some(Segment(seg))
        }
    }

    /// The handle other processes attach the segment by.
    pub fn handle(&self) -> pg_sys::dsm_handle {
        // SAFETY: a live, mapped segment (see the type).
        unsafe { pg_sys::dsm_segment_handle(self.0) }
    }

    /// When this process detaches (error, crash, shutdown), the pool of
    /// `peer` and `epoch` is stopped ([`crate::pool::stop_on_detach`]).
    pub fn stop_pool_on_detach(&self, peer: i32, epoch: u64) {
        // SAFETY: a live segment; the callback is a pg_guard'ed function
        // that lives as long as the library, and the argument is a plain
        // number.
        unsafe { pg_sys::on_dsm_detach(self.0, Some(stop_pool_on_detach), pg_sys::Datum::from(((epoch << 8) | peer as u64) as usize)) };
    }

    /// Lays out `n` queues of `size` bytes each from the start of the
    /// segment, with this process as their sender, and attaches them.
    pub fn create_queues(&self, n: usize, size: usize) -> Vec<MqSender> {
        // SAFETY: the segment was created with room for `n * size` bytes
        // (checked), none of it is in use before the workers that receive
        // its handle start, and the handles are allocated in
        // TopMemoryContext so they live as long as the mapping.
        unsafe {
            assert!(n * size <= pg_sys::dsm_segment_map_length(self.0), "queues beyond the segment");
            let base = pg_sys::dsm_segment_address(self.0) as *mut u8;
            let outer = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let handles = (0..n)
                .map(|i| {
                    let mq = pg_sys::shm_mq_create(base.add(i * size) as *mut _, size);
                    pg_sys::shm_mq_set_sender(mq, pg_sys::MyProc);
                    MqSender(pg_sys::shm_mq_attach(mq, self.0, std::ptr::null_mut()))
                })
                .collect::<Vec<_>>();
            pg_sys::MemoryContextSwitchTo(outer);
            handles
        }
    }

    /// Attaches, as its receiver, queue `slot` of a segment laid out by
    /// [`Segment::create_queues`] with queues of `size` bytes.
    pub fn receive_queue(&self, slot: usize, size: usize) -> MqReceiver {
        // SAFETY: segment handles reach workers only as the argument
        // Queues::start gives them, and that segment holds queues of `size`
        // bytes made by create_queues; `slot` is inside it (checked). The
        // handle is allocated in TopMemoryContext so it lives as long as
        // the mapping.
        unsafe {
            assert!((slot + 1) * size <= pg_sys::dsm_segment_map_length(self.0), "queue beyond the segment");
            let mq = (pg_sys::dsm_segment_address(self.0) as *mut u8).add(slot * size) as *mut pg_sys::shm_mq;
            pg_sys::shm_mq_set_receiver(mq, pg_sys::MyProc);
            let outer = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let mqh = pg_sys::shm_mq_attach(mq, self.0, std::ptr::null_mut());
            pg_sys::MemoryContextSwitchTo(outer);
            MqReceiver(mqh)
        }
    }
}

/// Called by PostgreSQL when this process detaches a pool's segment.
#[pg_guard]
unsafe extern "C-unwind" fn stop_pool_on_detach(_seg: *mut pg_sys::dsm_segment, arg: pg_sys::Datum) {
    let v = arg.value() as u64;
    crate::pool::stop_on_detach((v & 0xff) as i32, v >> 8);
}

/// This process's sending end of a queue in a [`Segment`].
pub struct MqSender(*mut pg_sys::shm_mq_handle);

impl MqSender {
    /// Queues `bytes` without waiting (`nowait`); `flush` makes them
    /// visible to the receiver at once. After SHM_MQ_WOULD_BLOCK the same
    /// bytes must be sent again (shm_mq keeps what it took).
    pub fn send(&self, bytes: &[u8], flush: bool) -> pg_sys::shm_mq_result::Type {
        // SAFETY: a handle attached by create_queues, valid for the
        // process's life; shm_mq copies from `bytes` within its length and
        // keeps no pointer to it.
        unsafe { pg_sys::shm_mq_send(self.0, bytes.len(), bytes.as_ptr() as *const _, true, flush) }
    }
}

/// What [`MqReceiver::receive`] found.
pub enum Received<'a> {
    /// A message (empty for a flush-only one), valid until the next receive.
    Message(&'a [u8]),
    /// Nothing queued yet.
    WouldBlock,
    /// The sender has detached.
    Detached,
}

/// This process's receiving end of a queue in a [`Segment`].
pub struct MqReceiver(*mut pg_sys::shm_mq_handle);

impl MqReceiver {
    /// Takes the next message without waiting.
    pub fn receive(&mut self) -> Received<'_> {
        let mut len: pg_sys::Size = 0;
        let mut data: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: a handle attached by receive_queue, valid for the
        // process's life.
        match unsafe { pg_sys::shm_mq_receive(self.0, &mut len, &mut data, true) } {
            pg_sys::shm_mq_result::SHM_MQ_SUCCESS if len == 0 => Received::Message(&[]),
            // SAFETY: on success shm_mq points at `len` bytes that stay put
            // until the next receive on this handle, which needs the
            // `&mut self` this slice borrows.
            pg_sys::shm_mq_result::SHM_MQ_SUCCESS => Received::Message(unsafe { std::slice::from_raw_parts(data as *const u8, len) }),
            pg_sys::shm_mq_result::SHM_MQ_WOULD_BLOCK => Received::WouldBlock,
            _ => Received::Detached,
        }
    }
}
