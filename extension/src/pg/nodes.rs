//! Parse and plan trees: read-only views of the nodes the DDL and
//! sequence logic and the write guard inspect (a utility statement's
//! `PlannedStmt`, the statement node inside it, CREATE TABLE [AS] / ALTER
//! TABLE / CREATE SEQUENCE and their parts, NOTIFY, COPY, TRUNCATE and the
//! transaction statements, an executor run's `QueryDesc`), the walk that
//! collects a query's external parameters, their values in a
//! `ParamListInfo`, and the mutability test of an expression.
//!
//! A view holds a pointer into a tree PostgreSQL owns, with a lifetime:
//! it is made only by a hook trampoline (through an `unsafe fn from_raw`)
//! from the pointers of the call, and the role functions that receive it
//! take it by a lifetime they cannot extend, so no view outlives the call
//! that handed the tree over. Views hold pointers rather than references
//! because a node is read as its concrete type (a `Node` header is the
//! first field of an `IndexStmt`...), which a `&pg_sys::Node` would not
//! cover.

use pgrx::pg_guard;
use pgrx::pg_sys;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Reads a C string PostgreSQL keeps in a node; None for NULL.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string alive for `'a`.
unsafe fn c_str<'a>(p: *const std::ffi::c_char) -> Option<&'a CStr> {
    // SAFETY: the caller's contract.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

/// A planned statement (`PlannedStmt`), borrowed for the hook call that
/// handed it over.
#[derive(Clone, Copy)]
pub struct PlannedStmt<'a> {
    ptr: NonNull<pg_sys::PlannedStmt>,
    _tree: PhantomData<&'a pg_sys::PlannedStmt>,
}

impl<'a> PlannedStmt<'a> {
    /// Wraps the `pstmt` a hook (ProcessUtility, ExecutorStart) was called
    /// with.
    ///
    /// # Safety
    /// `ptr` is a valid, non-NULL PlannedStmt that PostgreSQL keeps alive
    /// and does not change for `'a`.
    pub unsafe fn from_raw(ptr: *mut pg_sys::PlannedStmt) -> Self {
        PlannedStmt { ptr: NonNull::new(ptr).expect("a PlannedStmt"), _tree: PhantomData }
    }

    fn get(&self) -> &'a pg_sys::PlannedStmt {
        // SAFETY: valid for 'a (from_raw's contract).
        unsafe { &*self.ptr.as_ptr() }
    }

    /// The utility statement it runs (None for a planned query).
    pub fn utility(&self) -> Option<Node<'a>> {
        // SAFETY: a PlannedStmt's utilityStmt is NULL or a parse node of
        // the same tree, alive as long as the PlannedStmt.
        unsafe { Node::from_raw(self.get().utilityStmt) }
    }

    /// Where the statement starts in the query string (-1: unknown).
    pub fn location(&self) -> i32 {
        self.get().stmt_location
    }

    /// The statement's length in the query string (0: the rest of it).
    pub fn length(&self) -> i32 {
        self.get().stmt_len
    }
}

/// A parse node of a tree borrowed for `'a`.
#[derive(Clone, Copy)]
pub struct Node<'a> {
    ptr: NonNull<pg_sys::Node>,
    _tree: PhantomData<&'a pg_sys::Node>,
}

impl<'a> Node<'a> {
    /// None for NULL.
    ///
    /// # Safety
    /// `ptr` is NULL or a valid node (its tag tells its type) alive and
    /// unchanged for `'a`.
    pub unsafe fn from_raw(ptr: *mut pg_sys::Node) -> Option<Self> {
        NonNull::new(ptr).map(|ptr| Node { ptr, _tree: PhantomData })
    }

    /// The node as its concrete type, if its tag is `tag`.
    fn cast<T>(&self, tag: pg_sys::NodeTag) -> Option<&'a T> {
        // SAFETY: every node starts with its tag, and a node tagged `tag`
        // is the struct `T` the callers below pair with that tag; alive
        // for 'a (from_raw's contract).
        (self.tag() == tag).then(|| unsafe { &*self.ptr.as_ptr().cast::<T>() })
    }

    /// Its node tag.
    pub fn tag(&self) -> pg_sys::NodeTag {
        // SAFETY: a valid node for 'a; the tag is its first field.
        unsafe { (*self.ptr.as_ptr()).type_ }
    }

    /// The `concurrent` flag of a CREATE INDEX or DROP statement (false
    /// for any other node).
    pub fn concurrent(&self) -> bool {
        use pg_sys::NodeTag::*;
        self.cast::<pg_sys::IndexStmt>(T_IndexStmt).map(|s| s.concurrent).or_else(|| self.cast::<pg_sys::DropStmt>(T_DropStmt).map(|s| s.concurrent)).unwrap_or(false)
    }

    /// The node as a CREATE TABLE statement.
    pub fn as_create_table(&self) -> Option<CreateTable<'a>> {
        self.cast(pg_sys::NodeTag::T_CreateStmt).map(|s| CreateTable { stmt: s })
    }

    /// The node as a CREATE TABLE AS (or SELECT INTO, CREATE MATERIALIZED
    /// VIEW) statement.
    pub fn as_create_table_as(&self) -> Option<CreateTableAs<'a>> {
        self.cast(pg_sys::NodeTag::T_CreateTableAsStmt).map(|s| CreateTableAs { stmt: s })
    }

    /// The node as an ALTER TABLE statement.
    pub fn as_alter_table(&self) -> Option<AlterTable<'a>> {
        self.cast(pg_sys::NodeTag::T_AlterTableStmt).map(|s| AlterTable { stmt: s })
    }

    /// The node as a CREATE SEQUENCE statement.
    pub fn as_create_sequence(&self) -> Option<CreateSequence<'a>> {
        self.cast(pg_sys::NodeTag::T_CreateSeqStmt).map(|s| CreateSequence { stmt: s })
    }

    /// The node as an ALTER SEQUENCE statement.
    pub fn as_alter_sequence(&self) -> Option<AlterSequence<'a>> {
        self.cast(pg_sys::NodeTag::T_AlterSeqStmt).map(|s| AlterSequence { stmt: s })
    }

    /// The node as a NOTIFY statement.
    pub fn as_notify(&self) -> Option<Notify<'a>> {
        self.cast(pg_sys::NodeTag::T_NotifyStmt).map(|s| Notify { stmt: s })
    }

    /// The node as a COPY statement.
    pub fn as_copy(&self) -> Option<CopyCommand<'a>> {
        self.cast(pg_sys::NodeTag::T_CopyStmt).map(|s| CopyCommand { stmt: s })
    }

    /// The node as a TRUNCATE statement.
    pub fn as_truncate(&self) -> Option<Truncate<'a>> {
        self.cast(pg_sys::NodeTag::T_TruncateStmt).map(|s| Truncate { stmt: s })
    }

    /// The node as a transaction statement (BEGIN, PREPARE TRANSACTION,
    /// COMMIT PREPARED, ...).
    pub fn as_transaction(&self) -> Option<TransactionCommand<'a>> {
        self.cast(pg_sys::NodeTag::T_TransactionStmt).map(|s| TransactionCommand { stmt: s })
    }

    /// The node as an EXPLAIN statement.
    pub fn as_explain(&self) -> Option<Explain<'a>> {
        self.cast(pg_sys::NodeTag::T_ExplainStmt).map(|s| Explain { stmt: s })
    }
}

/// An EXPLAIN statement.
#[derive(Clone, Copy)]
pub struct Explain<'a> {
    stmt: &'a pg_sys::ExplainStmt,
}

impl<'a> Explain<'a> {
    /// Whether it runs the statement (`ANALYZE`, `ANALYZE true`...).
    pub fn analyze(&self) -> bool {
        // SAFETY: `options` is NIL or a List of DefElem of the same tree.
        unsafe { DefElem::list(self.stmt.options) }.iter().filter(|o| o.name() == c"analyze").fold(false, |_, o| !o.has_arg() || o.boolean())
    }

    /// The utility statement it explains (CREATE TABLE AS, EXECUTE...),
    /// if its analysed query is one.
    pub fn utility(&self) -> Option<Node<'a>> {
        // SAFETY: `query` is NULL or a node of the same tree; an analysed
        // Query's `utilityStmt` is NULL or a node of it.
        unsafe {
            let query: &pg_sys::Query = Node::from_raw(self.stmt.query)?.cast(pg_sys::NodeTag::T_Query)?;
            Node::from_raw(query.utilityStmt)
        }
    }
}

/// A relation named in a statement (`RangeVar`), to look up with
/// [`crate::pg::catalog::range_var_relid`].
#[derive(Clone, Copy)]
pub struct RangeVar<'a> {
    ptr: NonNull<pg_sys::RangeVar>,
    _tree: PhantomData<&'a pg_sys::RangeVar>,
}

impl<'a> RangeVar<'a> {
    /// # Safety
    /// `ptr` is NULL or a valid RangeVar alive for `'a`.
    pub(super) unsafe fn from_raw(ptr: *mut pg_sys::RangeVar) -> Option<Self> {
        NonNull::new(ptr).map(|ptr| RangeVar { ptr, _tree: PhantomData })
    }

    /// The raw pointer, for the catalog lookups that take one.
    pub(super) fn as_ptr(&self) -> *mut pg_sys::RangeVar {
        self.ptr.as_ptr()
    }

    /// The relation's name, without its schema.
    pub fn name(&self) -> String {
        // SAFETY: a valid RangeVar for 'a; the parser always sets `relname`.
        unsafe { CStr::from_ptr((*self.ptr.as_ptr()).relname) }.to_string_lossy().into_owned()
    }

    /// Its `relpersistence` (`p`, `u` or `t`).
    pub fn persistence(&self) -> u8 {
        // SAFETY: a valid RangeVar for 'a.
        unsafe { (*self.ptr.as_ptr()).relpersistence as u8 }
    }
}

/// A CREATE TABLE statement.
#[derive(Clone, Copy)]
pub struct CreateTable<'a> {
    stmt: &'a pg_sys::CreateStmt,
}

impl<'a> CreateTable<'a> {
    /// The table it creates.
    pub fn relation(&self) -> Option<RangeVar<'a>> {
        // SAFETY: a field of the same tree, NULL or a RangeVar.
        unsafe { RangeVar::from_raw(self.stmt.relation) }
    }
}

/// A CREATE TABLE AS statement.
#[derive(Clone, Copy)]
pub struct CreateTableAs<'a> {
    stmt: &'a pg_sys::CreateTableAsStmt,
}

impl<'a> CreateTableAs<'a> {
    /// Its query, once analysed (None while it is still a raw parse tree
    /// or absent).
    pub fn query(&self) -> Option<Query<'a>> {
        // SAFETY: `query` is NULL or a node of the same tree.
        let node = unsafe { Node::from_raw(self.stmt.query) }?;
        (node.tag() == pg_sys::NodeTag::T_Query).then_some(Query { ptr: node.ptr.cast(), _tree: PhantomData })
    }

    /// Whether it has its INTO clause.
    pub fn has_into(&self) -> bool {
        !self.stmt.into.is_null()
    }

    /// Whether it makes a table (CREATE TABLE AS, SELECT INTO), not a
    /// materialized view.
    pub fn creates_a_table(&self) -> bool {
        self.stmt.objtype == pg_sys::ObjectType::OBJECT_TABLE && self.into().is_some()
    }

    /// Whether it makes a table (CREATE TABLE AS, SELECT INTO), not a
    /// materialized view, and fills it (no `WITH NO DATA`).
    pub fn fills_a_table(&self) -> bool {
        // SAFETY: `into` is NULL or the IntoClause of the same tree.
        self.stmt.objtype == pg_sys::ObjectType::OBJECT_TABLE && unsafe { self.stmt.into.as_ref() }.is_some_and(|i| !i.skipData)
    }

    /// The table it creates (its INTO clause's relation).
    pub fn into_relation(&self) -> Option<RangeVar<'a>> {
        // SAFETY: its `rel` is NULL or a RangeVar of the same tree.
        self.into().and_then(|i| unsafe { RangeVar::from_raw(i.rel) })
    }

    fn into(&self) -> Option<&'a pg_sys::IntoClause> {
        // SAFETY: `into` is NULL or the IntoClause of the same tree.
        unsafe { self.stmt.into.as_ref() }
    }

    /// `IF NOT EXISTS`.
    pub fn if_not_exists(&self) -> bool {
        self.stmt.if_not_exists
    }

    /// The column names its INTO clause gives (`CREATE TABLE t(a, b) AS`),
    /// which replace the query's first ones.
    pub fn column_names(&self) -> Vec<String> {
        let Some(into) = self.into() else { return Vec::new() };
        // SAFETY: `colNames` is NIL or a List of String nodes of the same
        // tree.
        let names = unsafe { pgrx::PgList::<pg_sys::String>::from_pg(into.colNames) };
        // SAFETY: each a String node whose `sval` is a NUL-terminated
        // string of the tree.
        names.iter_ptr().filter_map(|n| unsafe { c_str((*n).sval) }).map(|n| n.to_string_lossy().into_owned()).collect()
    }

    /// Its storage parameters (`WITH (fillfactor = 70)`).
    pub fn options(&self) -> Vec<DefElem<'a>> {
        // SAFETY: `options` is NIL or a List of DefElem of the same tree.
        self.into().map(|i| unsafe { DefElem::list(i.options) }).unwrap_or_default()
    }

    /// Its table access method (`USING heap`), if named.
    pub fn access_method(&self) -> Option<&'a CStr> {
        // SAFETY: NULL or a string of the same tree.
        self.into().and_then(|i| unsafe { c_str(i.accessMethod) })
    }

    /// Its tablespace (`TABLESPACE ts`), if named.
    pub fn tablespace(&self) -> Option<&'a CStr> {
        // SAFETY: NULL or a string of the same tree.
        self.into().and_then(|i| unsafe { c_str(i.tableSpaceName) })
    }

    /// Whether its query is `EXECUTE name`, a prepared statement of this
    /// session.
    pub fn executes_prepared(&self) -> bool {
        self.execute_stmt().is_some()
    }

    /// The text of the prepared statement its query executes (`AS EXECUTE
    /// name`), if it is one that exists.
    pub fn prepared_query_text(&self) -> Option<String> {
        // SAFETY: `query_string` is NULL or NUL-terminated, alive with its
        // plan source.
        unsafe { c_str(self.prepared_source()?.query_string) }.map(|t| t.to_string_lossy().into_owned())
    }

    /// The plan source of the prepared statement its query executes (`AS
    /// EXECUTE name`), if it is one that exists.
    fn prepared_source(&self) -> Option<&'a pg_sys::CachedPlanSource> {
        let execute = self.execute_stmt()?;
        // SAFETY: a guarded binding; with throwError false it returns NULL
        // for an unknown name. The entry and its plan source live in the
        // session's cache until DEALLOCATE, which cannot run while this
        // statement does.
        unsafe { pg_sys::FetchPreparedStatement(execute.name, false).as_ref()?.plansource.as_ref() }
    }

    /// Its query as `EXECUTE name`, if it is one.
    fn execute_stmt(&self) -> Option<&'a pg_sys::ExecuteStmt> {
        let query = self.query()?;
        // SAFETY: a valid Query of the same tree; `utilityStmt` is NULL or
        // a node of it.
        unsafe { Node::from_raw((*query.ptr.as_ptr()).utilityStmt) }?.cast(pg_sys::NodeTag::T_ExecuteStmt)
    }

    /// The columns its query returns, in order, as the table gets them
    /// (`intorel_startup`): from the analysed query's target list, or for
    /// `AS EXECUTE name` from that prepared statement's result. None when
    /// not known here (no such prepared statement: the statement fails
    /// when it runs).
    pub fn result_columns(&self) -> Option<Vec<ResultColumn>> {
        let query = self.query()?;
        // SAFETY: a valid Query of the same tree (the view's guarantee).
        let q = unsafe { &*query.ptr.as_ptr() };
        let desc = if q.commandType == pg_sys::CmdType::CMD_UTILITY {
            // Alive with its plan source.
            self.prepared_source()?.resultDesc
        } else {
            // SAFETY: a guarded binding given the query's target list (a
            // List of TargetEntry, or NIL); it builds a new descriptor
            // in the current memory context, junk columns left out.
            unsafe { pg_sys::ExecCleanTypeFromTL(q.targetList) }
        };
        // SAFETY: NULL or a valid descriptor (above).
        unsafe { ResultColumn::of(desc) }
    }
}

/// A column of a query's result.
pub struct ResultColumn {
    pub name: String,
    pub type_oid: pg_sys::Oid,
    pub typmod: i32,
    pub collation: pg_sys::Oid,
}

impl ResultColumn {
    /// The columns a tuple descriptor describes, dropped ones left out
    /// (None for NULL).
    ///
    /// # Safety
    /// `desc` is NULL or a valid descriptor alive for the call.
    pub(super) unsafe fn of(desc: pg_sys::TupleDesc) -> Option<Vec<ResultColumn>> {
        // SAFETY: the caller's contract.
        let desc = unsafe { desc.as_ref() }?;
        // SAFETY: `attrs` holds `natts` attributes.
        let attrs = unsafe { desc.attrs.as_slice(desc.natts as usize) };
        Some(
            attrs
                .iter()
                .filter(|a| !a.attisdropped)
                .map(|a| ResultColumn {
                    // SAFETY: `attname` is a NUL-terminated NameData.
                    name: unsafe { CStr::from_ptr(a.attname.data.as_ptr()) }.to_string_lossy().into_owned(),
                    type_oid: a.atttypid,
                    typmod: a.atttypmod,
                    collation: a.attcollation,
                })
                .collect(),
        )
    }
}

/// An ALTER TABLE statement.
#[derive(Clone, Copy)]
pub struct AlterTable<'a> {
    stmt: &'a pg_sys::AlterTableStmt,
}

impl<'a> AlterTable<'a> {
    /// The table it alters.
    pub fn relation(&self) -> Option<RangeVar<'a>> {
        // SAFETY: a field of the same tree, NULL or a RangeVar.
        unsafe { RangeVar::from_raw(self.stmt.relation) }
    }

    /// Its subcommands, in order (NULL entries skipped).
    pub fn commands(&self) -> impl Iterator<Item = AlterTableCmd<'a>> {
        let cmds = self.stmt.cmds;
        // SAFETY: `cmds` is NIL or a List of AlterTableCmd of the same tree.
        let len = if cmds.is_null() { 0 } else { unsafe { (*cmds).length as usize } };
        (0..len).filter_map(move |i| {
            // SAFETY: i < length; the cell's pointer is NULL or an
            // AlterTableCmd alive for 'a.
            let c = unsafe { (*(*cmds).elements.add(i)).ptr_value as *const pg_sys::AlterTableCmd };
            // SAFETY: as above.
            (!c.is_null()).then(|| AlterTableCmd { cmd: unsafe { &*c } })
        })
    }
}

/// One subcommand of an ALTER TABLE.
#[derive(Clone, Copy)]
pub struct AlterTableCmd<'a> {
    cmd: &'a pg_sys::AlterTableCmd,
}

impl<'a> AlterTableCmd<'a> {
    /// What it does (`AT_AddColumn`, ...).
    pub fn subtype(&self) -> pg_sys::AlterTableType::Type {
        self.cmd.subtype
    }

    /// Its definition, if it is a column definition.
    pub fn column_def(&self) -> Option<ColumnDef<'a>> {
        // SAFETY: `def` is NULL or a node of the same tree.
        let node = unsafe { Node::from_raw(self.cmd.def) }?;
        node.cast(pg_sys::NodeTag::T_ColumnDef).map(|d| ColumnDef { def: d })
    }
}

/// A column definition.
#[derive(Clone, Copy)]
pub struct ColumnDef<'a> {
    def: &'a pg_sys::ColumnDef,
}

impl ColumnDef<'_> {
    /// The column's name, if it has one.
    pub fn name(&self) -> Option<String> {
        // SAFETY: `colname` is NULL or a string of the same tree.
        unsafe { c_str(self.def.colname) }.map(|n| n.to_string_lossy().into_owned())
    }
}

/// A CREATE SEQUENCE statement.
#[derive(Clone, Copy)]
pub struct CreateSequence<'a> {
    stmt: &'a pg_sys::CreateSeqStmt,
}

impl<'a> CreateSequence<'a> {
    /// The sequence it creates.
    pub fn sequence(&self) -> Option<RangeVar<'a>> {
        // SAFETY: a field of the same tree, NULL or a RangeVar.
        unsafe { RangeVar::from_raw(self.stmt.sequence) }
    }

    /// Its options (`INCREMENT`, `START`, ...), in order.
    pub fn options(&self) -> impl Iterator<Item = DefElem<'a>> {
        // SAFETY: `options` is NIL or a List of DefElem of the same tree,
        // alive for 'a.
        unsafe { DefElem::list(self.stmt.options) }.into_iter()
    }
}

/// An ALTER SEQUENCE statement.
#[derive(Clone, Copy)]
pub struct AlterSequence<'a> {
    stmt: &'a pg_sys::AlterSeqStmt,
}

impl<'a> AlterSequence<'a> {
    /// The sequence it changes.
    pub fn sequence(&self) -> Option<RangeVar<'a>> {
        // SAFETY: a field of the same tree, NULL or a RangeVar.
        unsafe { RangeVar::from_raw(self.stmt.sequence) }
    }

    /// Its options (`INCREMENT`, `RESTART`, ...), in order.
    pub fn options(&self) -> impl Iterator<Item = DefElem<'a>> {
        // SAFETY: `options` is NIL or a List of DefElem of the same tree,
        // alive for 'a.
        unsafe { DefElem::list(self.stmt.options) }.into_iter()
    }
}

/// A NOTIFY statement.
#[derive(Clone, Copy)]
pub struct Notify<'a> {
    stmt: &'a pg_sys::NotifyStmt,
}

impl<'a> Notify<'a> {
    /// Its channel.
    pub fn channel(&self) -> Option<&'a CStr> {
        // SAFETY: `conditionname` is NULL or a string of the same tree.
        unsafe { c_str(self.stmt.conditionname) }
    }

    /// Its payload (None when it has none).
    pub fn payload(&self) -> Option<&'a CStr> {
        // SAFETY: `payload` is NULL or a string of the same tree.
        unsafe { c_str(self.stmt.payload) }
    }
}

/// A COPY statement.
#[derive(Clone, Copy)]
pub struct CopyCommand<'a> {
    stmt: &'a pg_sys::CopyStmt,
}

impl<'a> CopyCommand<'a> {
    /// Whether it is COPY FROM.
    pub fn is_from(&self) -> bool {
        self.stmt.is_from
    }

    /// Its table (None for COPY (query)).
    pub fn relation(&self) -> Option<RangeVar<'a>> {
        // SAFETY: a field of the same tree, NULL or a RangeVar.
        unsafe { RangeVar::from_raw(self.stmt.relation) }
    }
}

/// A TRUNCATE statement.
#[derive(Clone, Copy)]
pub struct Truncate<'a> {
    stmt: &'a pg_sys::TruncateStmt,
}

impl<'a> Truncate<'a> {
    /// The tables it truncates, in order (None for a NULL entry).
    pub fn relations(&self) -> impl Iterator<Item = Option<RangeVar<'a>>> {
        let rels = self.stmt.relations;
        // SAFETY: `relations` is NIL or a List of RangeVar of the same tree.
        let len = if rels.is_null() { 0 } else { unsafe { (*rels).length as usize } };
        // SAFETY: i < length; the cell's pointer is NULL or a RangeVar
        // alive for 'a.
        (0..len).map(move |i| unsafe { RangeVar::from_raw((*(*rels).elements.add(i)).ptr_value as *mut pg_sys::RangeVar) })
    }
}

/// A transaction statement.
#[derive(Clone, Copy)]
pub struct TransactionCommand<'a> {
    stmt: &'a pg_sys::TransactionStmt,
}

impl<'a> TransactionCommand<'a> {
    /// Which one it is (`TRANS_STMT_PREPARE`, ...).
    pub fn kind(&self) -> pg_sys::TransactionStmtKind::Type {
        self.stmt.kind
    }

    /// Its gid (PREPARE TRANSACTION, COMMIT / ROLLBACK PREPARED), if it
    /// has one.
    pub fn gid(&self) -> Option<&'a CStr> {
        // SAFETY: `gid` is NULL or a string of the same tree.
        unsafe { c_str(self.stmt.gid) }
    }
}

/// An option of a statement (`DefElem`: a name and an optional value).
#[derive(Clone, Copy)]
pub struct DefElem<'a> {
    elem: *mut pg_sys::DefElem,
    _tree: PhantomData<&'a pg_sys::DefElem>,
}

impl<'a> DefElem<'a> {
    /// The elements of an option list.
    ///
    /// # Safety
    /// `list` is NIL or a List of DefElem alive and unchanged for `'a`.
    pub(super) unsafe fn list(list: *mut pg_sys::List) -> Vec<DefElem<'a>> {
        // SAFETY: the caller's contract.
        let list = unsafe { pgrx::PgList::<pg_sys::DefElem>::from_pg(list) };
        list.iter_ptr().map(|elem| DefElem { elem, _tree: PhantomData }).collect()
    }

    /// The option's name, as the parser folded it.
    pub fn name(&self) -> &'a CStr {
        // SAFETY: a DefElem of a tree alive for 'a; the parser always
        // sets `defname`.
        unsafe { CStr::from_ptr((*self.elem).defname) }
    }

    /// The option's namespace (`toast` in `toast.fillfactor`), if any.
    pub fn namespace(&self) -> Option<&'a CStr> {
        // SAFETY: a DefElem of a tree alive for 'a; NULL or a string of it.
        unsafe { c_str((*self.elem).defnamespace) }
    }

    /// Whether it has a value (`NO MINVALUE` has none).
    pub fn has_arg(&self) -> bool {
        // SAFETY: as above.
        unsafe { !(*self.elem).arg.is_null() }
    }

    /// Its value as a string (`defGetString`: an ERROR if it is none).
    pub fn string(&self) -> String {
        // SAFETY: a guarded binding given a valid DefElem, which it only
        // reads; it returns a NUL-terminated string (the value's own or
        // palloc'd in the current context), copied at once.
        unsafe { CStr::from_ptr(pg_sys::defGetString(self.elem)) }.to_string_lossy().into_owned()
    }

    /// Its value as a boolean (`defGetBoolean`: an ERROR if it is not one).
    pub fn boolean(&self) -> bool {
        // SAFETY: a guarded binding given a valid DefElem; it only reads it.
        unsafe { pg_sys::defGetBoolean(self.elem) }
    }

    /// Its value as an int8 (`defGetInt64`: an ERROR if it is none).
    pub fn int64(&self) -> i64 {
        // SAFETY: a guarded binding given a valid DefElem; it only reads it.
        unsafe { pg_sys::defGetInt64(self.elem) }
    }
}

/// An analysed query (`Query`) inside a statement.
#[derive(Clone, Copy)]
pub struct Query<'a> {
    ptr: NonNull<pg_sys::Query>,
    _tree: PhantomData<&'a pg_sys::Query>,
}

impl<'a> Query<'a> {
    /// Whether it calls a function that is not immutable
    /// (`contain_mutable_functions`).
    pub fn contains_mutable_functions(&self) -> bool {
        // SAFETY: a guarded binding given a valid Query node; it walks the
        // tree without changing it.
        unsafe { pg_sys::contain_mutable_functions(self.ptr.as_ptr().cast()) }
    }

    /// Every external parameter (`$n`, a PL/pgSQL variable) it uses, in
    /// the order the tree walk finds them.
    pub fn extern_params(&self) -> Vec<ExternParam<'a>> {
        let mut found: Vec<*mut pg_sys::Param> = Vec::new();
        // SAFETY: a guarded binding given a valid Query; the callback is
        // ours below, whose context is `found`, alive for the walk.
        unsafe { pg_sys::query_tree_walker(self.ptr.as_ptr(), Some(collect_params), (&raw mut found).cast(), 0) };
        found.into_iter().map(|p| ExternParam { param: p, _tree: PhantomData }).collect()
    }
}

/// Collects every external parameter of an analysed query (`context`: a
/// `Vec<*mut Param>`).
#[pg_guard]
unsafe extern "C-unwind" fn collect_params(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: the walkers hand us nodes of the tree being walked and the
    // context `extern_params` passed, a live Vec<*mut Param>.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_Param => {
                let p = node.cast::<pg_sys::Param>();
                if (*p).paramkind == pg_sys::ParamKind::PARAM_EXTERN {
                    (*context.cast::<Vec<*mut pg_sys::Param>>()).push(p);
                }
                false
            }
            pg_sys::NodeTag::T_Query => pg_sys::query_tree_walker(node.cast(), Some(collect_params), context, 0),
            _ => pg_sys::expression_tree_walker(node, Some(collect_params), context),
        }
    }
}

/// An external parameter (`Param` of kind `PARAM_EXTERN`) of a query.
#[derive(Clone, Copy)]
pub struct ExternParam<'a> {
    param: *mut pg_sys::Param,
    _tree: PhantomData<&'a pg_sys::Param>,
}

impl ExternParam<'_> {
    fn get(&self) -> &pg_sys::Param {
        // SAFETY: found by the walk of a tree alive for 'a.
        unsafe { &*self.param }
    }

    /// Its byte offset in the query string (-1: unknown).
    pub fn location(&self) -> i32 {
        self.get().location
    }

    /// Its type as SQL spells it (`integer`, `character varying(10)`).
    pub fn type_name(&self) -> String {
        let p = self.get();
        // SAFETY: a guarded binding; it returns a palloc'd string, copied.
        unsafe { CStr::from_ptr(pg_sys::format_type_with_typemod(p.paramtype, p.paramtypmod)).to_string_lossy().into_owned() }
    }
}

/// The parameter values a statement runs with (`ParamListInfo`).
#[derive(Clone, Copy)]
pub struct ParamList<'a> {
    ptr: NonNull<pg_sys::ParamListInfoData>,
    _list: PhantomData<&'a pg_sys::ParamListInfoData>,
}

impl<'a> ParamList<'a> {
    /// None for NULL (no parameters).
    ///
    /// # Safety
    /// `params` is NULL or the valid parameter list of the statement being
    /// run, alive for `'a`.
    pub unsafe fn from_raw(params: pg_sys::ParamListInfo) -> Option<Self> {
        NonNull::new(params).map(|ptr| ParamList { ptr, _list: PhantomData })
    }

    /// The value of `param` (of the query that runs with this list), or
    /// None where the list does not have it.
    pub fn value(&self, param: &ExternParam<'_>) -> Option<ParamValue<'a>> {
        let params = self.ptr.as_ptr();
        let id = param.get().paramid;
        // SAFETY: a zeroed ParamExternData is what the fetch hooks expect
        // as their workspace (plain data).
        let mut workspace: pg_sys::ParamExternData = unsafe { std::mem::zeroed() };
        // PL/pgSQL hands its variables out through paramFetch, a client's
        // Bind values are in the array.
        // SAFETY: `params` is valid for 'a; the hook is the list owner's,
        // called as ParamListInfo's contract says (speculative = false),
        // behind the boundary because a raw function pointer is not
        // guarded by pgrx; the array has numParams entries.
        let value = unsafe {
            match (*params).paramFetch {
                Some(fetch) => pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| fetch(params, id, false, &mut workspace)),
                None if id >= 1 && id <= (*params).numParams => (*params).params.as_mut_ptr().add(id as usize - 1),
                None => std::ptr::null_mut(),
            }
        };
        if value.is_null() {
            return None;
        }
        // SAFETY: points into the list or into `workspace`, both alive
        // here; copied out before either goes.
        let (datum, isnull) = unsafe { ((*value).value, (*value).isnull) };
        Some(ParamValue { datum, isnull, type_oid: param.get().paramtype, _list: PhantomData })
    }
}

/// A parameter's value, typed as the query's parameter says.
pub struct ParamValue<'a> {
    datum: pg_sys::Datum,
    isnull: bool,
    type_oid: pg_sys::Oid,
    _list: PhantomData<&'a pg_sys::ParamListInfoData>,
}

impl ParamValue<'_> {
    /// The value as a quoted SQL string literal (its type's text output
    /// through `quote_literal`); None if it is NULL.
    pub fn quoted_literal(&self) -> Option<String> {
        if self.isnull {
            return None;
        }
        // SAFETY: the datum is a non-NULL value (checked above) of the
        // parameter's type, which parse analysis gave the Param from this
        // very list's types, and lives as long as the list ('a).
        let text = unsafe { crate::pg::relation::output_text(self.type_oid, self.datum) };
        // SAFETY: a guarded binding given a NUL-terminated string; it
        // returns a palloc'd one, copied at once.
        Some(unsafe { CStr::from_ptr(pg_sys::quote_literal_cstr(text.as_ptr())) }.to_string_lossy().into_owned())
    }
}

/// An executor run (`QueryDesc`), borrowed for the hook call that handed
/// it over.
#[derive(Clone, Copy)]
pub struct QueryDesc<'a> {
    ptr: NonNull<pg_sys::QueryDesc>,
    _run: PhantomData<&'a pg_sys::QueryDesc>,
}

impl<'a> QueryDesc<'a> {
    /// Wraps the QueryDesc an executor hook was called with.
    ///
    /// # Safety
    /// `ptr` is a valid, non-NULL QueryDesc alive for `'a`.
    pub unsafe fn from_raw(ptr: *mut pg_sys::QueryDesc) -> Self {
        QueryDesc { ptr: NonNull::new(ptr).expect("a QueryDesc"), _run: PhantomData }
    }

    /// Its address: the identity of the run from ExecutorStart to
    /// ExecutorEnd.
    pub fn address(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The source text of the statement (None if it has none).
    pub fn source_text(&self) -> Option<&'a CStr> {
        // SAFETY: `sourceText` is NULL or a string the QueryDesc's owner
        // keeps for the run.
        unsafe { c_str((*self.ptr.as_ptr()).sourceText) }
    }

    /// The planned statement it runs.
    pub fn planned_stmt(&self) -> Option<PlannedStmt<'a>> {
        // SAFETY: `plannedstmt` is NULL or the run's plan, alive as long as
        // the QueryDesc.
        let p = unsafe { (*self.ptr.as_ptr()).plannedstmt };
        NonNull::new(p).map(|ptr| PlannedStmt { ptr, _tree: PhantomData })
    }
}

/// Whether a stored expression (`pg_attrdef.adbin`, `nodeToString`
/// output) calls a function that is not immutable.
pub fn stored_expression_is_mutable(text: &CStr) -> bool {
    // SAFETY: guarded bindings; stringToNode parses the text into a new
    // palloc'd tree (malformed text is an ERROR), which
    // contain_mutable_functions only walks.
    unsafe { pg_sys::contain_mutable_functions(pg_sys::stringToNode(text.as_ptr()) as *mut pg_sys::Node) }
}
