//! Catalog lookups by name, namespace and oid: this database's name,
//! namespaces (finding, creating, temporary ones, the session's temporary
//! schema), a relation's namespace, the relation a statement's `RangeVar`
//! names, a function by its signature, who the session runs as (the
//! current user's name, superuser, the user id and security context), and
//! types, collations and identifiers as SQL text names them.
//!
//! Every lookup here runs inside a transaction: the syscache and catalog
//! scans need one, and their callers (hooks around a statement, SQL
//! functions) always run in one.

use pgrx::pg_sys;
use pgrx::IntoDatum;
use std::ffi::CStr;

/// The name of the database this backend is connected to ("" if it has
/// none).
pub fn database_name() -> String {
    // SAFETY: a guarded syscache lookup of the backend's own database
    // (fixed once connected); the palloc'd copy it returns, if any, is
    // copied again before use.
    unsafe { owned(pg_sys::get_database_name(pg_sys::MyDatabaseId)) }
}

/// The oid of namespace `name`, InvalidOid if there is none.
pub fn namespace_oid(name: &CStr) -> pg_sys::Oid {
    // SAFETY: a guarded syscache lookup (missing_ok: no ERROR for a missing
    // name); `name` is NUL-terminated and outlives the call.
    unsafe { pg_sys::get_namespace_oid(name.as_ptr(), true) }
}

/// Creates namespace `name` owned by `owner` (`NamespaceCreate`;
/// `temp`: a temporary one, not tied to an extension); its oid.
pub fn create_namespace(name: &CStr, owner: pg_sys::Oid, temp: bool) -> pg_sys::Oid {
    // SAFETY: a guarded binding (a clash or a name too long is an ERROR);
    // inserts into pg_namespace in the caller's transaction; `name` is
    // NUL-terminated and copied.
    unsafe { pg_sys::NamespaceCreate(name.as_ptr(), owner, temp) }
}

/// Makes `nsp` (and `toast`) this session's temporary namespaces
/// (`SetTempNamespaceState`): its temporary objects and `pg_temp` go there.
pub fn set_temp_namespace(nsp: pg_sys::Oid, toast: pg_sys::Oid) {
    // SAFETY: only sets this backend's namespace state variables and
    // invalidates its search path; the oids are namespaces the caller
    // found or created in this transaction.
    unsafe { pg_sys::SetTempNamespaceState(nsp, toast) }
}

/// Whether `nsp` is a temporary namespace: by name (`pg_temp_<n>`, of
/// any session), or this session's own temporary one or its TOAST one,
/// which `mtm.set_temp_schema` may have given another name.
pub fn is_temp_namespace(nsp: pg_sys::Oid) -> bool {
    // SAFETY: a guarded syscache lookup of the namespace's name, then a
    // comparison with this backend's own namespace state.
    unsafe { pg_sys::isAnyTempNamespace(nsp) || pg_sys::isTempOrTempToastNamespace(nsp) }
}

/// The namespace of relation `relid` from the syscache; InvalidOid if the
/// cache does not have it.
pub fn relation_namespace(relid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: a guarded syscache lookup; a missing relation is InvalidOid.
    unsafe { pg_sys::get_rel_namespace(relid) }
}

/// The namespace of relation `relid` read from pg_class with a snapshot
/// that sees this command's own changes (`SnapshotSelf`): also a
/// relation the running command is creating, not in the syscache yet.
/// InvalidOid if there is no such row.
pub fn relation_namespace_uncached(relid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: the fixed part of a pg_class row, as namespace_uncached
    // hands it over.
    unsafe {
        oid_field_uncached(pg_sys::RelationRelationId, pg_sys::ClassOidIndexId, pg_sys::Anum_pg_class_oid, relid, |row| {
            (*(row as *const pg_sys::FormData_pg_class)).relnamespace
        })
    }
}

/// The same for a function (pg_proc) or a type (pg_type) the running
/// command may be creating: `class_id` says which. InvalidOid for another
/// catalog or no such row.
pub fn object_namespace_uncached(class_id: pg_sys::Oid, oid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: the fixed part of a pg_proc / pg_type row, as
    // oid_field_uncached hands it over, read as that catalog's struct.
    unsafe {
        if class_id == pg_sys::ProcedureRelationId {
            oid_field_uncached(class_id, pg_sys::ProcedureOidIndexId, pg_sys::Anum_pg_proc_oid, oid, |row| {
                (*(row as *const pg_sys::FormData_pg_proc)).pronamespace
            })
        } else if class_id == pg_sys::TypeRelationId {
            oid_field_uncached(class_id, pg_sys::TypeOidIndexId, pg_sys::Anum_pg_type_oid, oid, |row| {
                (*(row as *const pg_sys::FormData_pg_type)).typnamespace
            })
        } else {
            pg_sys::InvalidOid
        }
    }
}

/// pg_rewrite and pg_policy, which pgrx's bindings leave out: their
/// catalog and oid-index ids (catalog/pg_rewrite.h, pg_policy.h).
const REWRITE_RELATION_ID: u32 = 2618;
const REWRITE_OID_INDEX_ID: u32 = 2692;
const POLICY_RELATION_ID: u32 = 3256;
const POLICY_OID_INDEX_ID: u32 = 3257;
/// Where both rows keep their table's oid: after `oid` and a NameData
/// (rule or policy name), `ev_class` / `polrelid`.
const TABLE_OID_OFFSET: usize = std::mem::size_of::<pg_sys::Oid>() + std::mem::size_of::<pg_sys::NameData>();

/// The catalogs of objects that belong to a table: triggers, rules,
/// policies.
pub fn table_object_catalogs() -> [pg_sys::Oid; 3] {
    [pg_sys::TriggerRelationId, REWRITE_RELATION_ID.into(), POLICY_RELATION_ID.into()]
}

/// The table a trigger, rule or policy (`class_id`, one of
/// [`table_object_catalogs`]) the running command may be creating or
/// dropping belongs to; InvalidOid for another catalog or no such row.
pub fn owning_table_uncached(class_id: pg_sys::Oid, oid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: each branch names a catalog with its own oid index and oid
    // column (1 in all three), and reads a field of that catalog's fixed
    // part: pg_trigger's through pgrx's struct; pg_rewrite's `ev_class`
    // and pg_policy's `polrelid`, both an Oid right after `oid` and a
    // NameData (TABLE_OID_OFFSET), 4-byte aligned, inside the fixed part.
    unsafe {
        if class_id == pg_sys::TriggerRelationId {
            oid_field_uncached(class_id, pg_sys::TriggerOidIndexId, pg_sys::Anum_pg_trigger_oid, oid, |row| {
                (*(row as *const pg_sys::FormData_pg_trigger)).tgrelid
            })
        } else if class_id == pg_sys::Oid::from(REWRITE_RELATION_ID) || class_id == pg_sys::Oid::from(POLICY_RELATION_ID) {
            let index = if class_id == pg_sys::Oid::from(REWRITE_RELATION_ID) { REWRITE_OID_INDEX_ID } else { POLICY_OID_INDEX_ID };
            oid_field_uncached(class_id, index, 1, oid, |row| row.add(TABLE_OID_OFFSET).cast::<pg_sys::Oid>().read_unaligned())
        } else {
            pg_sys::InvalidOid
        }
    }
}

/// Reads the row `oid` of `catalog` through its oid index with
/// `SnapshotSelf` and gives `field` the start of the row's fixed part,
/// to read an oid from it (a namespace, a table); InvalidOid if there is
/// no such row.
///
/// # Safety
/// `index` is `catalog`'s index on its oid column `oid_attnum`, and
/// `field` reads that catalog's own fixed-part struct; inside a
/// transaction.
unsafe fn oid_field_uncached(catalog: pg_sys::Oid, index: u32, oid_attnum: u32, oid: pg_sys::Oid, field: impl Fn(*const u8) -> pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: the catalog opened and closed with AccessShareLock around a
    // systable scan on its oid index, all in the caller's transaction;
    // the zeroed ScanKeyData is initialised by ScanKeyInit before use;
    // SnapshotSelfData is PostgreSQL's static snapshot, only read; a tuple
    // the scan returns is a catalog row valid until the scan ends, and its
    // fixed part (after the header, GETSTRUCT) is read before that.
    unsafe {
        let rel = pg_sys::table_open(catalog, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(&mut key, oid_attnum as pg_sys::AttrNumber, pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber, pg_sys::F_OIDEQ.into(), pg_sys::Datum::from(oid));
        let scan = pg_sys::systable_beginscan(rel, pg_sys::Oid::from(index), true, &raw mut pg_sys::SnapshotSelfData, 1, &mut key);
        let tup = pg_sys::systable_getnext(scan);
        let nsp = if tup.is_null() {
            pg_sys::InvalidOid
        } else {
            let data = (*tup).t_data;
            field((data as *const u8).add((*data).t_hoff as usize))
        };
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        nsp
    }
}

/// The relation a statement's RangeVar names, if it exists (no lock
/// taken, as the statement that named it already has or had it).
pub fn range_var_relid(rv: crate::pg::nodes::RangeVar<'_>) -> Option<pg_sys::Oid> {
    // SAFETY: a guarded binding given a valid RangeVar (the view's
    // guarantee); missing_ok, no lock, no callback.
    let oid = unsafe { pg_sys::RangeVarGetRelidExtended(rv.as_ptr(), pg_sys::NoLock as i32, pg_sys::RVROption::RVR_MISSING_OK, None, std::ptr::null_mut()) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// The namespace a CREATE of `rv` would put its relation in (a temporary
/// one for TEMP, for `pg_temp.` and for a search_path that starts with
/// `pg_temp`), as the statement itself will compute it.
pub fn creation_namespace(rv: crate::pg::nodes::RangeVar<'_>) -> pg_sys::Oid {
    // SAFETY: a guarded binding given a valid RangeVar (the view's
    // guarantee), which it only reads; its ERRORs (no such schema, TEMP
    // in a permanent schema) are the statement's own.
    unsafe { pg_sys::RangeVarGetCreationNamespace(rv.as_ptr()) }
}

/// `to_regprocedure(signature)`: the function with this signature, as the
/// SQL function returns it (None for NULL: no such function).
pub fn to_regprocedure(signature: &str) -> Option<pg_sys::Oid> {
    // SAFETY: to_regprocedure is a plain SQL-callable function taking one
    // text argument (NULL when the function does not exist), called inside
    // a transaction.
    unsafe { pgrx::direct_function_call::<pg_sys::Oid>(pg_sys::to_regprocedure, &[signature.into_datum()]) }
}

/// The name of the current user (`GetUserNameFromId(GetUserId())`).
pub fn current_user_name() -> String {
    // SAFETY: guarded bindings; the current user exists (not missing_ok:
    // an ERROR otherwise); the palloc'd name is copied.
    unsafe { CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetUserId(), false)).to_string_lossy().into_owned() }
}

/// Whether the current user is a superuser.
pub fn is_superuser() -> bool {
    // SAFETY: a guarded binding reading the session's role.
    unsafe { pg_sys::superuser() }
}

/// The current user id and security context.
pub fn user_and_security_context() -> (pg_sys::Oid, i32) {
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: writes through two valid out-pointers; reads only backend
    // state.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut context) };
    (user, context)
}

/// Sets the current user id and security context, as PostgreSQL's own
/// security-restricted operations do (the caller restores the pair it
/// read with [`user_and_security_context`]; an ERROR's transaction abort
/// restores it otherwise).
pub fn set_user_and_security_context(user: pg_sys::Oid, context: i32) {
    // SAFETY: only sets two backend variables.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) }
}

/// Runs `f` as the bootstrap superuser: the extension's own look-ups and
/// bookkeeping (`mtm.cluster_nodes`, `mtm.notifications`, the walsenders'
/// progress) run inside any client's session, whatever its role may read
/// or write, as PostgreSQL's own internal queries do (foreign-key checks).
/// `f` runs the extension's SQL on its own tables, never a client's.
pub fn as_superuser<T>(f: impl FnOnce() -> T) -> T {
    run_as(pg_sys::BOOTSTRAP_SUPERUSERID.into(), f)
}

/// Runs `f` as the role named `role`, or as the bootstrap superuser if
/// there is no role of that name. Inside a transaction.
pub fn as_role<T>(role: &CStr, f: impl FnOnce() -> T) -> T {
    // SAFETY: a guarded syscache lookup inside a transaction; with
    // missing_ok an unknown name is InvalidOid, not an ERROR.
    let oid = unsafe { pg_sys::get_role_oid(role.as_ptr(), true) };
    run_as(if oid == pg_sys::InvalidOid { pg_sys::BOOTSTRAP_SUPERUSERID.into() } else { oid }, f)
}

/// Runs `f` as the role named `role`, as SET ROLE would; an ERROR
/// (42704) if there is no such role. Inside a transaction.
pub fn as_existing_role<T>(role: &CStr, f: impl FnOnce() -> T) -> T {
    // SAFETY: a guarded syscache lookup inside a transaction; without
    // missing_ok an unknown name is PostgreSQL's own ERROR.
    let oid = unsafe { pg_sys::get_role_oid(role.as_ptr(), false) };
    run_as(oid, f)
}

/// Runs `f` in read-write mode, also inside a transaction the client
/// made read-only (`default_transaction_read_only`, which covers the
/// implicit transaction of its COMMIT PREPARED): the extension's own
/// bookkeeping there (`mtm.notifications`) is not the client's write.
pub fn read_write<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: puts back this backend's own flag as it was read
            // below; a plain store, no ERROR.
            unsafe { pg_sys::XactReadOnly = self.0 }
        }
    }
    // SAFETY: reads and sets this backend's transaction-local flag, which
    // the executor checks at the start of each statement; restored however
    // `f` ends. Not during recovery, where it must stay read-only (no
    // client writes there anyway).
    let was = unsafe { pg_sys::XactReadOnly };
    let _restore = Restore(was);
    if was && !unsafe { pg_sys::RecoveryInProgress() } {
        unsafe { pg_sys::XactReadOnly = false };
    }
    f()
}

fn run_as<T>(role: pg_sys::Oid, f: impl FnOnce() -> T) -> T {
    /// Puts the session's user back however `f` ends, an ERROR's unwind
    /// included.
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_user_and_security_context(self.0, self.1);
        }
    }
    let (user, context) = user_and_security_context();
    let _restore = Restore(user, context);
    set_user_and_security_context(role, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    f()
}

/// The persistence (`RELPERSISTENCE_*`) of relation `relid`; an ERROR if
/// there is no such relation.
pub fn relation_persistence(relid: pg_sys::Oid) -> u8 {
    // SAFETY: a guarded syscache lookup; a missing relation is an ERROR
    // raised through the guard.
    unsafe { pg_sys::get_rel_persistence(relid) as u8 }
}

/// Reads a palloc'd C string a lookup returned; "" for NULL.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string alive for the call.
unsafe fn owned(p: *const std::ffi::c_char) -> String {
    // SAFETY: the caller's contract.
    if p.is_null() { String::new() } else { unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned() }
}

/// The name of namespace `nsp` ("" if there is none).
pub fn namespace_name(nsp: pg_sys::Oid) -> String {
    // SAFETY: a guarded syscache lookup returning a palloc'd copy or NULL.
    unsafe { owned(pg_sys::get_namespace_name(nsp)) }
}

/// A type as SQL names it, with its modifier (`character varying(10)`),
/// schema-qualified where the search path would not find it: what
/// `format_type(oid, typmod)` returns.
pub fn format_type(type_oid: pg_sys::Oid, typmod: i32) -> String {
    // SAFETY: a guarded syscache lookup returning a palloc'd string.
    unsafe { owned(pg_sys::format_type_with_typemod(type_oid, typmod)) }
}

/// The collation a type's values get by default (InvalidOid: not
/// collatable).
pub fn type_collation(type_oid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: a guarded syscache lookup.
    unsafe { pg_sys::get_typcollation(type_oid) }
}

/// A collation as SQL names it, schema-qualified where the search path
/// would not find it (as `pg_get_*def` print it).
pub fn collation_name(collation: pg_sys::Oid) -> String {
    // SAFETY: a guarded syscache lookup returning a palloc'd string; an
    // unknown oid is an ERROR through the guard.
    unsafe { owned(pg_sys::generate_collation_name(collation)) }
}

/// `name` quoted as an SQL identifier where it needs to be
/// (`quote_identifier`).
pub fn quote_identifier(name: &str) -> String {
    let c = std::ffi::CString::new(name).expect("no NUL in an SQL name");
    // SAFETY: a guarded binding given a NUL-terminated string alive for
    // the call; it returns that string or a palloc'd quoted copy, read
    // before `c` is dropped.
    unsafe { owned(pg_sys::quote_identifier(c.as_ptr())) }
}
