//! The DDL capture's side of PostgreSQL: the object access hook
//! (installed and chained to the previous one here) and the
//! transaction-state calls the DDL paths make (nest level, command
//! counter, the snapshot a replayed statement runs with). The utility and
//! executor hooks are in [`crate::pg::xact`], which hands
//! [`crate::ddl`] the views of [`crate::pg::nodes`].

use pgrx::pg_guard;
use pgrx::pg_sys;

static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

/// Installs the object access hook ([`crate::ddl::object_accessed`]),
/// keeping the previous one, which it calls first.
pub fn install_object_access_hook() {
    // SAFETY: called once from _PG_init while the library is preloaded,
    // before any backend runs a statement, so nothing reads the hook
    // variables concurrently; the previous hook is kept and called.
    unsafe {
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: std::ffi::c_int,
    arg: *mut std::ffi::c_void,
) {
    // SAFETY: PREV_OBJECT_ACCESS is written only by
    // install_object_access_hook, before any call of this hook; the
    // previous hook gets exactly our arguments, behind the boundary
    // because a raw function pointer is not guarded by pgrx.
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS {
            pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev(access, class_id, object_id, sub_id, arg));
        }
    }
    crate::ddl::object_accessed(access, class_id, object_id);
}
