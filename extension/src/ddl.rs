//! Cluster-wide DDL: a schema change made on one node runs on every node,
//! inside the same transaction, at the same point among its row changes.
//!
//! Capture (origin node, in the utility hook of [`crate::xact`]): a DDL
//! statement run by a client is written to the transaction's WAL as two
//! transactional logical messages around its execution — `mtm_ddl_begin`
//! before, `mtm_ddl` after, carrying the statement's text, the role it ran
//! as and its `search_path` ([`mtm_protocol::DdlMessage`]). The decoder
//! sends the `mtm_ddl` message at its place in the transaction and drops
//! the row changes between the two (rows the statement wrote itself, as
//! an extension's script does): the peers' replay of the statement writes
//! them. A CREATE TABLE AS (or SELECT INTO) of a permanent table is the
//! exception: the opening message carries the plain CREATE TABLE of the
//! table it makes ([`TableShape`]), which each peer runs there,
//! and its rows are sent like any others — computed once, so every node
//! has the same; the peers never run its query. A statement that turned
//! out to touch only this session's temporary relations gets an empty
//! `mtm_ddl`: it stays here.
//!
//! What is captured: every utility statement except those that are not
//! schema changes (transaction control, SET/SHOW, cursors, LISTEN/NOTIFY,
//! COPY, TRUNCATE — replicated as rows —, LOCK, EXPLAIN, DO and CALL —
//! the statements they run are captured one by one —, maintenance such as
//! VACUUM/REINDEX/CLUSTER/CHECKPOINT) and those PostgreSQL refuses inside
//! a transaction block (CREATE DATABASE, ALTER SYSTEM, tablespaces,
//! `… CONCURRENTLY`), which the proxy runs on every node itself. Statements
//! run by a captured statement (a CREATE TABLE's sequences, an extension's
//! script) are part of it, not captured again — except in the query of a
//! CREATE TABLE AS whose rows are sent, which the peers never run: there
//! a schema change is refused ([`run_uncaptured`]); DDL inside functions,
//! procedures, DO blocks and dynamic EXECUTE is captured where it runs.
//!
//! Replay (peer, [`replay`]): the statement runs through SPI in the apply
//! transaction as the same role with the same `search_path`, restored
//! afterwards. Its failure fails the transaction like any apply error (a
//! "no" vote for a prepared one).
//!
//! Remote functions: a statement that calls a function named in
//! `multimaster.remote_functions` is captured whole the same way (from the
//! executor hooks of [`crate::xact`]): it runs on every node, and the rows
//! it writes are each node's own, not replicated.
//!
//! `multimaster.replicate_ddl = off` (superuser) keeps a session's DDL on
//! its node, for repairs by hand.

#![deny(unsafe_code)]

use crate::pg::catalog;
use crate::pg::nodes::{ExternParam, Node, ParamList, PlannedStmt, QueryDesc, RangeVar};
use mtm_protocol::DdlMessage;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::{CStr, CString};

/// `multimaster.replicate_ddl`.
pub static REPLICATE_DDL: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `multimaster.identity_full_without_pk`.
pub static IDENTITY_FULL_WITHOUT_PK: GucSetting<bool> = GucSetting::<bool>::new(true);

thread_local! {
    /// A captured statement is running: what it runs is part of it.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// Relations the captured statement created, altered or dropped:
    /// (some temporary, some not).
    static TOUCHED: Cell<(bool, bool)> = const { Cell::new((false, false)) };
    /// The executor run of a captured statement calling a remote function
    /// (its QueryDesc), and the transaction nesting level it started at.
    static CAPTURED_QUERY: Cell<(usize, i32)> = const { Cell::new((0, 0)) };
    /// The query of a captured CREATE TABLE AS whose rows are sent is
    /// running: the peers do not run it.
    static ROWS_SENT_RUNNING: Cell<bool> = const { Cell::new(false) };
}

thread_local! {
    static CAPTURED_MESSAGE: std::cell::RefCell<Option<DdlMessage>> = const { std::cell::RefCell::new(None) };
    /// The table of the captured CREATE TABLE AS running, for its query's
    /// run ([`executor_run`]).
    static NEW_TABLE: std::cell::RefCell<Option<NewTable>> = const { std::cell::RefCell::new(None) };
}

/// Defines the setting and installs the object access hook (from `_PG_init`).
pub fn init() {
    GucRegistry::define_bool_guc(
        c"multimaster.replicate_ddl",
        c"Run this session's DDL statements on every node of the cluster.",
        c"Off keeps schema changes on this node only (for repairs by hand); the nodes' schemas then differ until repaired.",
        &REPLICATE_DDL,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"multimaster.identity_full_without_pk",
        c"Give tables without a primary key REPLICA IDENTITY FULL, so their UPDATE and DELETE replicate.",
        c"Rows of such a table are then found on the other nodes by all their columns. Off: UPDATE/DELETE of such a table stop the peers' apply with an error until the table gets a key.",
        &IDENTITY_FULL_WITHOUT_PK,
        GucContext::Sighup,
        GucFlags::default(),
    );
    crate::pg::utility::install_object_access_hook();
}

/// Whether a statement of this kind is a schema change to replicate.
fn is_replicated_kind(node: Node<'_>) -> bool {
    use pg_sys::NodeTag::*;
    match node.tag() {
        T_TransactionStmt | T_VariableSetStmt | T_VariableShowStmt | T_DiscardStmt | T_PrepareStmt | T_ExecuteStmt
        | T_DeallocateStmt | T_DeclareCursorStmt | T_FetchStmt | T_ClosePortalStmt | T_NotifyStmt | T_ListenStmt
        | T_UnlistenStmt | T_LoadStmt | T_CheckPointStmt | T_LockStmt | T_CopyStmt | T_TruncateStmt | T_ExplainStmt
        | T_DoStmt | T_CallStmt | T_VacuumStmt | T_ReindexStmt | T_ClusterStmt | T_CreatedbStmt | T_DropdbStmt
        | T_AlterDatabaseStmt | T_AlterDatabaseSetStmt | T_AlterDatabaseRefreshCollStmt | T_AlterSystemStmt
        | T_CreateTableSpaceStmt | T_DropTableSpaceStmt | T_AlterTableSpaceOptionsStmt | T_CreateSubscriptionStmt
        | T_AlterSubscriptionStmt | T_DropSubscriptionStmt | T_CreatePublicationStmt | T_AlterPublicationStmt => false,
        T_IndexStmt | T_DropStmt => !node.concurrent(),
        _ => true,
    }
}

/// Whether this backend's database is the replicated one
/// (`multimaster.database`) and the extension is installed in it.
pub(crate) fn replicated_database() -> bool {
    thread_local! {
        static THIS_ONE: Cell<Option<bool>> = const { Cell::new(None) };
    }
    let named = THIS_ONE.get().unwrap_or_else(|| {
        // The backend's database is fixed once connected.
        let name = catalog::database_name();
        let v = name == crate::launcher::database();
        THIS_ONE.set(Some(v));
        v
    });
    named && catalog::namespace_oid(c"mtm") != pg_sys::InvalidOid
}

/// A statement being captured.
pub struct Capture {
    message: DdlMessage,
    /// Sent at its opening, its rows following ([`rows_replicated`]).
    rows_sent: bool,
    /// It calls a function of `multimaster.remote_functions`: every node
    /// runs it and computes its own rows.
    remote: bool,
    /// A CREATE TABLE AS's table, as its run left it ([`run_captured`]).
    table: Option<NewTable>,
}

/// Whether a client's statement running now is to be captured: not part
/// of a captured one, DDL replication on, a client's (not a peer's
/// replay), in the replicated database.
fn capture_allowed() -> bool {
    !CAPTURING.get() && REPLICATE_DDL.get() && crate::xact::client_change() && replicated_database()
}

/// The settings a replayed statement runs with as on its origin: those
/// that change how SQL text is parsed (literals of dates, intervals,
/// strings, arrays; `= NULL`), what it computes (time zone, float text)
/// or whether it is accepted (function bodies checked at CREATE: pg_dump's
/// output turns that off). Not the locale ones: a locale missing on a
/// peer would stop its apply.
const REPLAYED_SETTINGS: [&CStr; 10] = [
    c"DateStyle",
    c"IntervalStyle",
    c"TimeZone",
    c"standard_conforming_strings",
    c"backslash_quote",
    c"array_nulls",
    c"transform_null_equals",
    c"extra_float_digits",
    c"check_function_bodies",
    c"default_table_access_method",
];

/// `sql` as this session runs it now: as the current role, with the
/// current search_path and [`REPLAYED_SETTINGS`] (inside a transaction).
fn as_this_session(sql: String) -> DdlMessage {
    let role = catalog::current_user_name();
    let search_path = crate::setting(c"search_path").unwrap_or_default();
    let settings = REPLAYED_SETTINGS
        .iter()
        .filter_map(|name| Some((name.to_string_lossy().into_owned(), crate::setting(name)?)))
        .collect();
    DdlMessage { role, search_path, sql, settings }
}

/// Writes the message that opens a captured statement (inside the
/// transaction that runs it). Empty, the decoder drops the rows up to the
/// closing one; with a statement (`rows_follow`: the plain CREATE TABLE of
/// a CREATE TABLE AS), the peers run it there, and the rows are sent.
fn log_opening(rows_follow: Option<&DdlMessage>) {
    let prefix = CString::new(mtm_protocol::DDL_BEGIN_PREFIX).expect("no NUL");
    crate::pg::rmgr::log_logical_message(&prefix, &rows_follow.map(DdlMessage::to_bytes).unwrap_or_default(), true);
}

/// Whether the rows a statement writes go to the peers like any others,
/// their replay of it creating the table empty: a CREATE TABLE AS or
/// SELECT INTO that fills a permanent table. Computed again on each node,
/// they could differ (a query whose result depends on row order, on the
/// time, on rows another node commits at that moment). A materialized
/// view's rows stay each node's own (they are not replicated; REFRESH
/// runs on every node), and so do an unlogged table's; the caller keeps
/// those of a statement that calls a remote function each node's own too.
fn rows_replicated(node: Node<'_>) -> bool {
    let Some(rv) = node.as_create_table_as().filter(|c| c.fills_a_table()).and_then(|c| c.into_relation()) else { return false };
    if rv.persistence() != pg_sys::RELPERSISTENCE_PERMANENT as u8 {
        return false;
    }
    !catalog::is_temp_namespace(catalog::creation_namespace(rv))
}

/// `EXPLAIN ANALYZE CREATE TABLE AS` (or SELECT INTO, CREATE MATERIALIZED
/// VIEW) makes a table on this node, outside any capture: refused with a
/// way round, as its table would exist here only (and its rows would stop
/// the peers' apply). A temporary table is fine.
fn refuse_explain_analyze_of_new_table(node: Node<'_>) {
    let Some(explain) = node.as_explain().filter(|e| e.analyze()) else { return };
    let Some(rv) = explain.utility().and_then(|u| u.as_create_table_as()).and_then(|c| c.into_relation()) else { return };
    if rv.persistence() == pg_sys::RELPERSISTENCE_TEMP as u8 || !capture_allowed() {
        return;
    }
    if catalog::is_temp_namespace(catalog::creation_namespace(rv)) {
        return;
    }
    crate::raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        "multimaster: EXPLAIN ANALYZE of CREATE TABLE AS (or SELECT INTO, CREATE MATERIALIZED VIEW) cannot make its table on every node",
        "Run the statement without EXPLAIN ANALYZE; EXPLAIN without ANALYZE shows its plan.",
        "capture",
    );
}

/// Writes the message that closes a captured statement (inside the
/// transaction that ran it) and carries it to the peers (None: it stays
/// here).
fn log_closing(message: Option<&DdlMessage>) {
    let prefix = CString::new(mtm_protocol::DDL_PREFIX).expect("no NUL");
    crate::pg::rmgr::log_logical_message(&prefix, &message.map(DdlMessage::to_bytes).unwrap_or_default(), true);
}

/// Starts capturing `stmt` (run by ProcessUtility with `query_string`
/// and `params`) if it is a client's DDL statement to run on every node:
/// writes the opening message (a CREATE TABLE AS whose rows are sent:
/// as its query starts, [`executor_run`]). The caller runs the statement
/// with [`run_captured`] and then calls [`finish`].
pub fn capture(stmt: PlannedStmt<'_>, query_string: &CStr, params: Option<ParamList<'_>>) -> Option<Capture> {
    let node = stmt.utility()?;
    refuse_explain_analyze_of_new_table(node);
    if !is_replicated_kind(node) || !capture_allowed() {
        return None;
    }
    // SET CONSTRAINTS outside a transaction block changes nothing
    // (PostgreSQL warns); inside one it goes to the peers, whose apply of
    // the transaction's rows then defers the same checks.
    if node.tag() == pg_sys::NodeTag::T_ConstraintsSetStmt && !crate::pg::twophase::in_transaction_block() {
        return None;
    }
    let query = query_string.to_bytes();
    let values = parameter_values(node, params);
    let sql = DdlMessage::statement_text_with_values(query, stmt.location(), stmt.length(), &values);
    let mut message = as_this_session(sql);
    let ctas = node.as_create_table_as().filter(|c| c.creates_a_table());
    let remote = calls_remote_function(&message.sql) || ctas.and_then(|c| c.prepared_query_text()).is_some_and(|t| calls_remote_function(&t));
    let mut rows_sent = !remote && rows_replicated(node);
    let mut table = None;
    if let Some(ctas) = ctas {
        let unlogged = ctas.into_relation().is_some_and(|rv| rv.persistence() == pg_sys::RELPERSISTENCE_UNLOGGED as u8);
        if ctas.fills_a_table() && ctas.executes_prepared() && (remote || unlogged) {
            crate::raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "multimaster: this CREATE TABLE … AS EXECUTE cannot run on the other nodes: each node would fill the table itself (an unlogged table, or a query calling one of multimaster.remote_functions), and the prepared statement exists in this session only",
                "Write the prepared statement's query in place of EXECUTE.",
                "capture",
            );
        }
        if rows_sent || !ctas.fills_a_table() && !remote {
            if let Some(shape) = TableShape::of(ctas) {
                // Until its query runs: the columns as analysed, those
                // `WITH NO DATA` of a SELECT gives the table.
                if let Some(columns) = ctas.result_columns() {
                    message.sql = shape.sql(&columns);
                }
                table = Some(NewTable { shape, message: message.clone(), rows_sent, opened: false });
            }
        }
    }
    // Without its table's shape, the peers run the statement itself.
    rows_sent &= table.is_some();
    if !rows_sent {
        log_opening(None);
    }
    TOUCHED.set((false, false));
    NEW_TABLE.with_borrow_mut(|t| *t = table);
    Some(Capture { message, rows_sent, remote, table: None })
}

/// The table a captured CREATE TABLE AS (or SELECT INTO) makes, which the
/// peers create with a plain CREATE TABLE (`message`): the columns its
/// query's run gives it, not those of the query as analysed (the planner
/// may fold `CASE WHEN true THEN a ELSE b END` into `a`, and its type
/// modifier with it), once it runs ([`executor_run`]).
struct NewTable {
    shape: TableShape,
    message: DdlMessage,
    /// Its rows are sent: the opening message carries `message`.
    rows_sent: bool,
    /// Its query started: `message` is final (and opened, with rows_sent).
    opened: bool,
}

/// From the ExecutorRun hook: the run of a query. That of the captured
/// CREATE TABLE AS (its rows go into the new table) fixes the table's
/// columns, and when its rows are sent writes the opening message, before
/// the first of them; while it runs, a schema change made by a function
/// it calls is refused ([`run_uncaptured`]).
pub fn executor_run(run: crate::pg::xact::ExecutorRun<'_>) {
    let starts_table = run.fills_new_table() && NEW_TABLE.with_borrow(|t| t.as_ref().is_some_and(|t| !t.opened));
    if !starts_table {
        return run.run();
    }
    let columns = run.result_columns();
    let rows_sent = NEW_TABLE.with_borrow_mut(|t| {
        let t = t.as_mut().expect("checked above");
        t.message.sql = t.shape.sql(&columns);
        t.opened = true;
        if t.rows_sent {
            log_opening(Some(&t.message));
        }
        t.rows_sent
    });
    with_flag(&ROWS_SENT_RUNNING, rows_sent, || run.run());
}

/// Runs `f`, a utility statement that is not captured itself. Inside the
/// query of a CREATE TABLE AS whose rows are sent, a schema change (run by
/// a function the query calls) is refused once it ran, unless it touched
/// only temporary objects: the peers create that table and receive its
/// rows; they never run its query.
pub fn run_uncaptured(stmt: PlannedStmt<'_>, f: impl FnOnce()) {
    let nested = ROWS_SENT_RUNNING.get() && REPLICATE_DDL.get() && stmt.utility().is_some_and(is_replicated_kind);
    if !nested {
        return f();
    }
    let outer = TOUCHED.replace((false, false));
    f();
    let (temp, permanent) = TOUCHED.get();
    TOUCHED.set((outer.0 || temp, outer.1 || permanent));
    if !temp || permanent {
        refuse_in_rows_sent("a schema change");
    }
}

/// Refuses `what`, run by the query of a CREATE TABLE AS whose rows are
/// sent.
fn refuse_in_rows_sent(what: &str) -> ! {
    crate::raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("multimaster: {what} run by the query of a CREATE TABLE AS cannot reach the other nodes: they create the table and receive its rows, they do not run the query"),
        "Run it before the CREATE TABLE AS, as a statement of its own.",
        "run_uncaptured",
    )
}

/// The parts of the plain CREATE TABLE that makes a CREATE TABLE AS's
/// table, but its columns' types: `head` up to the table's name, the
/// column names its INTO clause gives, `tail` from the access method on.
struct TableShape {
    head: String,
    names: Vec<String>,
    tail: String,
}

impl TableShape {
    fn of(ctas: crate::pg::nodes::CreateTableAs<'_>) -> Option<TableShape> {
        let rv = ctas.into_relation()?;
        let q = catalog::quote_identifier;
        let mut head = String::from("CREATE ");
        if rv.persistence() == pg_sys::RELPERSISTENCE_UNLOGGED as u8 {
            head.push_str("UNLOGGED ");
        }
        head.push_str("TABLE ");
        if ctas.if_not_exists() {
            head.push_str("IF NOT EXISTS ");
        }
        // The schema this node creates it in, whatever the peer's search_path.
        let schema = catalog::namespace_name(catalog::creation_namespace(rv));
        head.push_str(&format!("{}.{}", q(&schema), q(&rv.name())));
        let mut tail = String::new();
        if let Some(am) = ctas.access_method() {
            tail.push_str(&format!(" USING {}", q(&am.to_string_lossy())));
        }
        let options: Vec<String> = ctas
            .options()
            .iter()
            .map(|o| {
                let name = match o.namespace() {
                    Some(ns) => format!("{}.{}", q(&ns.to_string_lossy()), q(&o.name().to_string_lossy())),
                    None => q(&o.name().to_string_lossy()),
                };
                // As DefineRelation reads them: each value as its text.
                if o.has_arg() { format!("{name} = {}", crate::quote_literal(&o.string())) } else { name }
            })
            .collect();
        if !options.is_empty() {
            tail.push_str(&format!(" WITH ({})", options.join(", ")));
        }
        if let Some(ts) = ctas.tablespace() {
            tail.push_str(&format!(" TABLESPACE {}", q(&ts.to_string_lossy())));
        }
        Some(TableShape { head, names: ctas.column_names(), tail })
    }

    /// The statement, the table having `columns` (named by the INTO
    /// clause first, as `intorel_startup` names them).
    fn sql(&self, columns: &[crate::pg::nodes::ResultColumn]) -> String {
        let q = catalog::quote_identifier;
        let columns: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let name = self.names.get(i).unwrap_or(&c.name);
                let mut column = format!("{} {}", q(name), catalog::format_type(c.type_oid, c.typmod));
                if c.collation != pg_sys::InvalidOid && c.collation != catalog::type_collation(c.type_oid) {
                    column.push_str(&format!(" COLLATE {}", catalog::collation_name(c.collation)));
                }
                column
            })
            .collect();
        format!("{} ({}){}", self.head, columns.join(", "), self.tail)
    }
}

/// The values of the parameters a statement uses, each as the byte offset
/// of its reference in the query string and the SQL literal of its value:
/// a peer replays the text, where a function's variables (or a client's
/// `$1`) do not exist. Only `CREATE TABLE AS` (and `SELECT INTO`) can use
/// parameters: its query is the one analysed query a utility statement
/// holds.
fn parameter_values(node: Node<'_>, params: Option<ParamList<'_>>) -> Vec<(usize, String)> {
    let Some(params) = params else { return Vec::new() };
    let Some(query) = node.as_create_table_as().and_then(|c| c.query()) else { return Vec::new() };
    query
        .extern_params()
        .into_iter()
        .map(|p| {
            let Some(literal) = parameter_literal(params, &p).filter(|_| p.location() >= 0) else {
                crate::raise(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "multimaster: a schema change that uses a parameter whose value is not known here cannot run on the other nodes",
                    "Build the statement as text with its values in it and run it with EXECUTE format(...).",
                    "parameter_values",
                )
            };
            (p.location() as usize, literal)
        })
        .collect()
}

/// The value of parameter `p` as a typed SQL literal (`'7'::integer`,
/// `NULL::text`); None where `params` does not have it.
fn parameter_literal(params: ParamList<'_>, p: &ExternParam<'_>) -> Option<String> {
    let value = params.value(p)?;
    let type_name = p.type_name();
    let Some(literal) = value.quoted_literal() else { return Some(format!("NULL::{type_name}")) };
    Some(format!("{literal}::{type_name}"))
}

/// Runs `f` with capturing on, as it was again however it ends.
pub fn while_capturing(f: impl FnOnce()) {
    with_flag(&CAPTURING, true, f);
}

/// Runs `f` with `flag` set to `value`, as it was again however `f` ends
/// (an ERROR included).
fn with_flag(flag: &'static std::thread::LocalKey<Cell<bool>>, value: bool, f: impl FnOnce()) {
    let was = flag.replace(value);
    PgTryBuilder::new(std::panic::AssertUnwindSafe(f)).finally(|| flag.set(was)).execute();
}

/// Runs `f`, the statement `capture` started, with capturing on.
pub fn run_captured(capture: &mut Capture, f: impl FnOnce()) {
    let table = std::cell::RefCell::new(None);
    PgTryBuilder::new(std::panic::AssertUnwindSafe(|| while_capturing(f))).finally(|| *table.borrow_mut() = NEW_TABLE.take()).execute();
    capture.table = table.into_inner();
}

/// Sends `sql` to the peers as a DDL statement of this transaction (for
/// work a function did here with capturing off, which each peer must do
/// its own way), when a client's statement would be captured now.
pub fn send_statement(sql: &str) {
    if ROWS_SENT_RUNNING.get() {
        refuse_in_rows_sent("a sequence change");
    }
    if !capture_allowed() {
        return;
    }
    log_opening(None);
    log_closing(Some(&as_this_session(sql.to_string())));
    crate::xact::set_writes(true);
}

/// Writes the closing message of a statement that ran; returns whether it
/// goes to the peers (false: it touched only temporary relations). Inside
/// the transaction that ran the statement.
pub fn finish(capture: Capture) -> bool {
    if capture.rows_sent {
        // Sent with its opening as its query started, a permanent table.
        // A query that never started made no table (IF NOT EXISTS found
        // one): nothing to send.
        let opened = capture.table.is_some_and(|t| t.opened);
        if opened {
            log_closing(None);
        }
        return opened;
    }
    let (temp, permanent) = TOUCHED.get();
    let replicated = !temp || permanent;
    let message = capture.table.map_or(capture.message, |t| t.message);
    log_closing(replicated.then_some(&message));
    replicated
}

/// Whether `sql` calls a function of this session's
/// `multimaster.remote_functions`.
fn calls_remote_function(sql: &str) -> bool {
    crate::REMOTE_FUNCTIONS.get().is_some_and(|f| calls_any(sql, &f.to_string_lossy()))
}

/// Whether `sql` calls one of `functions` (comma-separated, optionally
/// schema-qualified names): a name as a word followed by `(`. A name in a
/// string literal also counts; that only runs the statement on every node
/// for nothing.
pub fn calls_any(sql: &str, functions: &str) -> bool {
    let lower = sql.to_lowercase();
    let b = lower.as_bytes();
    functions.split(',').map(|f| f.trim().to_lowercase()).filter(|f| !f.is_empty()).any(|f| {
        let name = f.rsplit('.').next().unwrap_or(&f).trim_matches('"').to_string();
        let mut from = 0;
        while let Some(p) = lower[from..].find(&name) {
            let at = from + p;
            let end = at + name.len();
            let word_start = at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_');
            if word_start && lower[end..].trim_start().starts_with('(') {
                return true;
            }
            from = at + 1;
        }
        false
    })
}

/// Starts capturing a statement that calls a remote function, from
/// ExecutorStart ([`begin_statement`]): the opening message now, the
/// closing one at its ExecutorEnd ([`end_statement`]).
pub fn capture_query(query: QueryDesc<'_>) {
    // Every statement passes here: the setting first, it is usually unset.
    if !crate::REMOTE_FUNCTIONS.get().is_some_and(|f| !f.to_bytes().trim_ascii().is_empty()) {
        return;
    }
    let text = query.source_text();
    let stmt = query.planned_stmt();
    let (Some(text), Some(stmt)) = (text, stmt) else { return };
    if !capture_allowed() {
        return;
    }
    let sql = DdlMessage::statement_text(text.to_bytes(), stmt.location(), stmt.length());
    if !calls_remote_function(&sql) {
        return;
    }
    let message = as_this_session(sql);
    log_opening(None);
    CAPTURING.set(true);
    CAPTURED_QUERY.set((query.address(), crate::pg::xact::nest_level()));
    CAPTURED_MESSAGE.with_borrow_mut(|m| *m = Some(message));
}

/// Ends the capture of a statement started by [`capture_query`], from
/// ExecutorEnd (inside the statement's transaction); `query_address` is
/// the run's identity.
pub fn end_statement(query_address: usize) {
    if CAPTURED_QUERY.get().0 != query_address {
        return;
    }
    CAPTURED_QUERY.set((0, 0));
    CAPTURING.set(false);
    if let Some(m) = CAPTURED_MESSAGE.with_borrow_mut(Option::take) {
        log_closing(Some(&m));
        crate::xact::set_writes(true);
    }
}

/// A (sub)transaction at `level` aborted: a statement capture it started
/// is over.
pub fn aborted(level: i32) {
    let (query, started) = CAPTURED_QUERY.get();
    if query != 0 && started >= level {
        CAPTURED_QUERY.set((0, 0));
        CAPTURING.set(false);
        CAPTURED_MESSAGE.with_borrow_mut(|m| *m = None);
    }
}

/// The table a CREATE TABLE / CREATE TABLE AS / ALTER TABLE statement
/// works on, if it is one of those (looked up after it ran, inside its
/// transaction).
fn table_of(node: Node<'_>) -> Option<(pg_sys::Oid, bool)> {
    let (rv, created): (Option<RangeVar<'_>>, bool) = if let Some(c) = node.as_create_table() {
        (c.relation(), true)
    } else if let Some(c) = node.as_create_table_as() {
        (c.into_relation(), true)
    } else if let Some(a) = node.as_alter_table() {
        (a.relation(), false)
    } else {
        return None;
    };
    catalog::range_var_relid(rv?).map(|oid| (oid, created))
}

/// Keeps the replica identity of a table that was just created or
/// altered (on every node, as the statement runs there): FULL while it
/// has no primary key, so its UPDATE and DELETE replicate (rows found by
/// all their columns); back to DEFAULT when it gets one. From the
/// ProcessUtility hook ([`keep_replica_identity`]), after the statement
/// ran.
pub fn keep_replica_identity(stmt: PlannedStmt<'_>) {
    let Some(node) = stmt.utility().filter(|_| IDENTITY_FULL_WITHOUT_PK.get()) else { return };
    let Some((oid, created)) = table_of(node) else { return };
    if !replicated_database() {
        return;
    }
    let state = crate::with_snapshot(|| {
        Spi::get_three_with_args::<bool, String, String>(
            "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = c.oid AND indisprimary), c.relreplident::text, c.oid::regclass::text
               FROM pg_class c WHERE c.oid = $1 AND c.relkind = 'r' AND c.relpersistence = 'p'",
            &[oid.into()],
        )
    });
    let (change, table) = match state {
        Ok((Some(false), Some(ident), Some(table))) if created && ident == "d" => ("FULL", table),
        Ok((Some(true), Some(ident), Some(table))) if !created && ident == "f" => ("DEFAULT", table),
        _ => return,
    };
    let sql = format!("ALTER TABLE {table} REPLICA IDENTITY {change}");
    crate::with_snapshot(|| while_capturing(|| Spi::run(&sql).unwrap_or_else(|e| error!("multimaster: {sql}: {e}"))));
}

/// A schema change that fills existing rows with values each node would
/// compute on its own — `ADD COLUMN` with a default that is not immutable
/// (`now()`, `random()`, `nextval()`, so `serial`: each node evaluates it
/// at its own time) or an identity, on a table that has rows; a
/// `CREATE TABLE AS` / materialized view whose query calls such a function
/// and produced rows — would leave the nodes with different data, as each
/// replays the statement itself. Refused after it ran here
/// (so only where it did fill rows), with what to do instead. `stmt` is
/// the utility statement that just ran, in its transaction
/// ([`refuse_values_per_node`]).
pub fn refuse_values_per_node(stmt: PlannedStmt<'_>, capture: &Capture) {
    let Some(node) = stmt.utility() else { return };
    let refuse = |what: &str, hint: &str| {
        crate::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("multimaster: {what} would compute different values on each node"),
            hint,
            "refuse_values_per_node",
        )
    };
    if let Some(ctas) = node.as_create_table_as() {
        // Rows computed once, or by a remote function on purpose.
        if capture.rows_sent || capture.remote {
            return;
        }
        let Some(query) = ctas.query().filter(|_| ctas.has_into()) else { return };
        if !query.contains_mutable_functions() {
            return;
        }
        // An unlogged table's rows are each node's own anyway.
        if ctas.into_relation().is_some_and(|rv| rv.persistence() == pg_sys::RELPERSISTENCE_UNLOGGED as u8) {
            return;
        }
        if ctas.into_relation().and_then(catalog::range_var_relid).is_some_and(has_rows) {
            refuse(
                "CREATE TABLE AS (or a materialized view) whose query calls a function that is not immutable (now(), random()…)",
                "Create the table first, then fill it with INSERT … SELECT through the proxy (its rows are computed once and replicated).",
            );
        }
    } else if let Some(at) = node.as_alter_table() {
        let added: Vec<String> = at
            .commands()
            .filter(|c| c.subtype() == pg_sys::AlterTableType::AT_AddColumn)
            .filter_map(|c| c.column_def())
            .filter_map(|d| d.name())
            .collect();
        if added.is_empty() {
            return;
        }
        let Some(relid) = at.relation().and_then(catalog::range_var_relid) else { return };
        if !added.iter().any(|c| filled_per_node(relid, c)) || !has_rows(relid) {
            return;
        }
        refuse(
            "ADD COLUMN with a default that is not immutable (now(), random(), nextval(), serial) or an identity, on a table that has rows,",
            "Add the column without a default (or with a constant one), fill it with an UPDATE through the proxy, then ALTER COLUMN … SET DEFAULT (or ADD GENERATED … AS IDENTITY).",
        );
    }
}

/// Whether column `name` of `relid` is an identity or has a default that
/// is not immutable.
fn filled_per_node(relid: pg_sys::Oid, name: &str) -> bool {
    let row = crate::with_snapshot(|| {
        Spi::get_two_with_args::<bool, String>(
            "SELECT a.attidentity <> '', d.adbin::text FROM pg_attribute a
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = $1 AND a.attname = $2 AND NOT a.attisdropped",
            &[relid.into(), name.into()],
        )
    });
    match row {
        Ok((Some(true), _)) => true,
        Ok((_, Some(adbin))) => {
            let text = CString::new(adbin).expect("no NUL");
            crate::pg::nodes::stored_expression_is_mutable(&text)
        }
        _ => false,
    }
}

/// Whether table `relid` has at least one row.
fn has_rows(relid: pg_sys::Oid) -> bool {
    crate::with_snapshot(|| {
        let name = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[relid.into()]).ok().flatten();
        name.and_then(|n| Spi::get_one::<bool>(&format!("SELECT EXISTS (SELECT 1 FROM {n})")).ok().flatten()).unwrap_or(false)
    })
}

/// `LargeObjectRelationId` (pg_largeobject's OID, catalog/pg_largeobject.h;
/// not in pgrx's bindings): the class a large object's creation reports.
const LARGE_OBJECT_RELATION_ID: pg_sys::Oid = pg_sys::Oid::from_u32(2613);

/// Large objects live in a catalog (`pg_largeobject`) that logical
/// decoding does not see, so they would exist on one node only: creating
/// one in the replicated database is refused (lo_create, lo_import,
/// lo_from_bytea, libpq's lo_creat/lo_import...). Other databases are
/// local to each node anyway.
fn refuse_large_object() {
    if !crate::xact::client_change() || !replicated_database() {
        return;
    }
    crate::raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        "multimaster: large objects are not replicated, so none can be created in the replicated database",
        "Store the data in a bytea column (up to 1 GB per value), or keep large objects in another database, which is local to each node.",
        "refuse_large_object",
    );
}

/// Notes whether the captured statement touches temporary relations,
/// functions or types, or triggers, rules or policies of temporary
/// tables (the object access hook, after the previous one ran).
pub fn object_accessed(access: pg_sys::ObjectAccessType::Type, class_id: pg_sys::Oid, object_id: pg_sys::Oid) {
    if class_id == LARGE_OBJECT_RELATION_ID && access == pg_sys::ObjectAccessType::OAT_POST_CREATE {
        refuse_large_object();
    }
    let catalogs = [pg_sys::RelationRelationId, pg_sys::ProcedureRelationId, pg_sys::TypeRelationId];
    let of_a_table = catalog::table_object_catalogs().contains(&class_id);
    if !CAPTURING.get() || !(catalogs.contains(&class_id) || of_a_table) {
        return;
    }
    if !matches!(
        access,
        pg_sys::ObjectAccessType::OAT_POST_CREATE | pg_sys::ObjectAccessType::OAT_POST_ALTER | pg_sys::ObjectAccessType::OAT_DROP
    ) {
        return;
    }
    // A relation being created is not in the syscache yet (no command
    // counter increment since its insert): read its namespace from the
    // catalog with a snapshot that sees our own changes.
    let nsp = if class_id == pg_sys::RelationRelationId {
        relation_namespace(object_id)
    } else if of_a_table {
        // A trigger, rule or policy is where its table is.
        match catalog::owning_table_uncached(class_id, object_id) {
            table if table == pg_sys::InvalidOid => pg_sys::InvalidOid,
            table => relation_namespace(table),
        }
    } else {
        catalog::object_namespace_uncached(class_id, object_id)
    };
    if nsp == pg_sys::InvalidOid {
        return;
    }
    let temp = catalog::is_temp_namespace(nsp);
    let (t, p) = TOUCHED.get();
    TOUCHED.set((t || temp, p || !temp));
}

/// The namespace of relation `relid`, also one created by the running
/// command; InvalidOid if none.
fn relation_namespace(relid: pg_sys::Oid) -> pg_sys::Oid {
    let nsp = catalog::relation_namespace(relid);
    if nsp != pg_sys::InvalidOid {
        return nsp;
    }
    catalog::relation_namespace_uncached(relid)
}

/// Runs a peer's DDL statement in the applying transaction (in an apply
/// worker, inside a transaction).
pub fn replay(m: &DdlMessage, peer: i32) {
    let nest = crate::pg::guc::new_nest_level();
    set_for_statement(c"search_path", &m.search_path);
    for (name, value) in &m.settings {
        let name = CString::new(name.as_str()).unwrap_or_else(|_| error!("multimaster: NUL in a setting's name"));
        set_for_statement(&name, value);
    }
    set_for_statement(c"role", &m.role);
    crate::pg::xact::with_transaction_snapshot(|| {
        if let Err(e) = Spi::run(&m.sql) {
            error!("multimaster: DDL from node {peer} failed here: {e}: {}", m.sql);
        }
    });
    crate::pg::guc::end_nest_level(nest);
    crate::pg::xact::command_counter_increment();
}

/// Sets a setting until the GUC nest level opened by the caller ends.
fn set_for_statement(name: &CStr, value: &str) {
    let value = CString::new(value).unwrap_or_else(|_| error!("multimaster: NUL in the value of {}", name.to_string_lossy()));
    crate::pg::guc::set_for_nest_level(name, &value);
}

/// `mtm.set_temp_schema(nsp)`, as the reference system defines it: this
/// session's temporary objects (and `pg_temp` in its search path) live
/// from now on in the schema `nsp`, created here — with its TOAST schema
/// `pg_toast_<nsp>` — if it does not exist yet. Like every temporary
/// object they stay on this node. Unlike `pg_temp_<n>`, the schema and
/// what is left in it outlive the session (PostgreSQL empties only the
/// temporary schema it assigned itself).
///
/// Superusers only: any schema named becomes the session's temporary one.
#[pg_extern]
fn set_temp_schema(nsp: &str) {
    if !catalog::is_superuser() {
        ereport!(PgLogLevel::ERROR, PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, "mtm.set_temp_schema: only a superuser may choose the session's temporary schema");
    }
    let name = std::ffi::CString::new(nsp).unwrap_or_else(|_| error!("mtm.set_temp_schema: a schema name cannot contain a NUL byte"));
    let toast = std::ffi::CString::new(format!("pg_toast_{nsp}")).expect("no NUL in the name");
    // Catalog look-ups and inserts inside the calling statement's
    // transaction; an ERROR (a name too long, a clash) unwinds through
    // pgrx's guarded boundary of this function.
    let mut oid = catalog::namespace_oid(&name);
    let mut toast_oid = catalog::namespace_oid(&toast);
    if oid == pg_sys::InvalidOid {
        oid = catalog::create_namespace(&name, pg_sys::BOOTSTRAP_SUPERUSERID.into(), true);
    }
    if toast_oid == pg_sys::InvalidOid {
        toast_oid = catalog::create_namespace(&toast, pg_sys::BOOTSTRAP_SUPERUSERID.into(), true);
    }
    crate::pg::xact::command_counter_increment();
    catalog::set_temp_namespace(oid, toast_oid);
}
