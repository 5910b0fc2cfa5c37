//! Statement classification: DDL, transaction control, calls of configured
//! remote functions, or other. The commit path, cluster-wide DDL and remote
//! functions (later) hang off this; today it feeds metrics.
//!
//! A cheap keyword pre-check decides most statements without parsing:
//! plain DML and queries are never handed to sqlparser unless they might
//! call a remote function, and single DDL/transaction statements are
//! decided by their first keyword. sqlparser is used where the keyword is
//! not enough: multi-statement strings and remote-function detection.

use sqlparser::ast::{visit_expressions, Expr, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatementClass {
    Other,
    Transaction,
    RemoteFunction,
    Ddl,
}

impl StatementClass {
    pub const ALL: [StatementClass; 4] =
        [StatementClass::Other, StatementClass::Transaction, StatementClass::RemoteFunction, StatementClass::Ddl];

    pub fn as_str(self) -> &'static str {
        match self {
            StatementClass::Other => "other",
            StatementClass::Transaction => "transaction",
            StatementClass::RemoteFunction => "remote_function",
            StatementClass::Ddl => "ddl",
        }
    }
}

const DDL: &[&str] = &[
    "CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "GRANT", "REVOKE", "REINDEX", "CLUSTER", "VACUUM",
    "SECURITY", "REFRESH", "IMPORT", "REASSIGN",
];
const TXN: &[&str] = &["BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE", "PREPARE"];

/// Lower-cased remote function names, as configured.
#[derive(Debug, Clone, Default)]
pub struct Classifier {
    remote_functions: Vec<String>,
}

impl Classifier {
    pub fn new(remote_functions: &[String]) -> Self {
        Classifier { remote_functions: remote_functions.iter().map(|f| f.to_lowercase()).collect() }
    }

    /// The strongest class among the statements of `sql`
    /// (DDL > remote function > transaction > other).
    pub fn classify(&self, sql: &str) -> StatementClass {
        let first = first_keyword(sql);
        let single = !has_inner_semicolon(sql);
        if single {
            if let Some(kw) = first.as_deref() {
                if DDL.contains(&kw) {
                    return StatementClass::Ddl;
                }
                // PREPARE name AS ... is a prepared statement, not 2PC.
                if TXN.contains(&kw) && (kw != "PREPARE" || is_prepare_transaction(sql)) {
                    return StatementClass::Transaction;
                }
            }
            if !self.mentions_remote_function(sql) {
                return StatementClass::Other;
            }
        }
        match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
            Ok(stmts) => stmts.iter().map(|s| self.classify_parsed(s)).max().unwrap_or(StatementClass::Other),
            // sqlparser does not know every PostgreSQL statement: decide
            // each ';'-separated piece by keyword instead.
            Err(_) => statements(sql)
                .into_iter()
                .map(|p| self.classify_keyword_only(p))
                .max()
                .unwrap_or(StatementClass::Other),
        }
    }

    fn classify_keyword_only(&self, sql: &str) -> StatementClass {
        match first_keyword(sql).as_deref() {
            Some(kw) if DDL.contains(&kw) => StatementClass::Ddl,
            Some(kw) if TXN.contains(&kw) => StatementClass::Transaction,
            _ if self.mentions_remote_function(sql) => StatementClass::RemoteFunction,
            _ => StatementClass::Other,
        }
    }

    fn classify_parsed(&self, stmt: &Statement) -> StatementClass {
        // The canonical rendering starts with the statement's keyword.
        let text = stmt.to_string();
        match first_keyword(&text).as_deref() {
            Some(kw) if DDL.contains(&kw) => return StatementClass::Ddl,
            Some(kw) if TXN.contains(&kw) => return StatementClass::Transaction,
            _ => {}
        }
        if self.remote_functions.is_empty() {
            return StatementClass::Other;
        }
        let mut found = false;
        let _ = visit_expressions(stmt, |e: &Expr| {
            if let Expr::Function(f) = e {
                let name = f.name.to_string().to_lowercase();
                let unqualified = name.rsplit('.').next().unwrap_or(&name).to_string();
                // A qualified configured name also matches an unqualified
                // call: which schema it resolves to depends on search_path.
                let matches = |r: &String| *r == name || r.rsplit('.').next() == Some(unqualified.as_str());
                if self.remote_functions.iter().any(matches) {
                    found = true;
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
        if found {
            StatementClass::RemoteFunction
        } else {
            StatementClass::Other
        }
    }

    fn mentions_remote_function(&self, sql: &str) -> bool {
        if self.remote_functions.is_empty() {
            return false;
        }
        let lower = sql.to_lowercase();
        self.remote_functions.iter().any(|f| {
            let bare = f.rsplit('.').next().unwrap_or(f);
            lower.contains(bare)
        })
    }
}

/// What a statement means for the commit path ([`crate::relay`]). Decided
/// by keywords, without parsing: it only chooses whether the proxy opens a
/// transaction around an autocommit statement. Whether a transaction
/// really wrote is the node's word (`multimaster.xact_writes`), and a
/// write the proxy did not expect is refused by the node, never lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// Cannot write replicated rows, or cannot run in a transaction block
    /// (VACUUM, CREATE DATABASE...): runs as sent.
    Read,
    /// May write: in autocommit the proxy wraps it in a transaction so it
    /// can commit it with the cluster's two-phase commit.
    Write,
    /// COMMIT or END of a transaction block.
    Commit,
    /// COMMIT AND CHAIN: commit, then start a transaction like it.
    CommitAndChain,
    /// `PREPARE TRANSACTION 'gid'`: the client's own two-phase commit.
    PrepareTransaction(String),
    /// BEGIN or START TRANSACTION: opens a transaction block (forwarded
    /// as sent).
    Begin,
    /// ROLLBACK (or ABORT) of the transaction: forwarded as sent, but
    /// where it ends a transaction of the proxy's around an implicit one
    /// the proxy runs it, with PostgreSQL's warning that no transaction
    /// was in progress.
    Rollback,
    /// SAVEPOINT, ROLLBACK TO, COMMIT PREPARED...: forwarded as sent.
    TransactionControl,
    /// Writes nothing and runs only in a transaction block (LOCK, DECLARE
    /// without HOLD): forwarded as sent, and an extended unit with one is
    /// not wrapped in a transaction of the proxy's, so outside a block
    /// PostgreSQL refuses it (25P01) as it would without the proxy. In a
    /// Query string, PostgreSQL's implicit block allows it: a read there.
    /// Names the statement as PostgreSQL's refusal does.
    BlockOnly(&'static str),
    /// Cannot run in a transaction block and concerns every node (VACUUM,
    /// CREATE INDEX CONCURRENTLY, CREATE DATABASE, ALTER SYSTEM...): in
    /// autocommit the proxy runs it on every node ([`crate::everywhere`]).
    EveryNode,
}

/// Statements that only read, or that PostgreSQL refuses inside a
/// transaction block (so must never be wrapped in one). NOTIFY is not
/// one: on a node it becomes part of the transaction's writes, so that
/// every node delivers it (the extension's `notify` module).
const READS: &[&str] = &[
    "SELECT", "VALUES", "TABLE", "SHOW", "SET", "RESET", "FETCH", "MOVE", "CLOSE", "DECLARE", "DEALLOCATE",
    "DISCARD", "LISTEN", "UNLISTEN", "LOAD", "CHECKPOINT",
];

/// Functions (and keywords written like calls) that a SELECT may use and
/// still be taken for a read. Anything else called from a SELECT may
/// write, so the statement is wrapped (one extra round trip, no risk).
const READ_CALLS: &[&str] = &[
    "count", "sum", "avg", "min", "max", "now", "coalesce", "nullif", "greatest", "least", "lower", "upper",
    "length", "char_length", "substr", "substring", "position", "trim", "btrim", "ltrim", "rtrim", "replace",
    "concat", "concat_ws", "format", "left", "right", "abs", "round", "floor", "ceil", "ceiling", "trunc", "mod",
    "power", "sqrt", "random", "md5", "sha256", "encode", "decode", "to_char", "to_date", "to_timestamp",
    "to_number", "date_trunc", "date_part", "extract", "age", "array_agg", "string_agg", "json_agg",
    "jsonb_agg", "json_build_object", "jsonb_build_object", "row_to_json", "to_json", "to_jsonb",
    "array_length", "unnest", "generate_series", "row_number", "rank", "dense_rank", "lag", "lead",
    "bool_and", "bool_or", "every", "version", "current_setting", "current_database", "current_schema",
    "current_user", "session_user", "txid_current", "nextval", "currval", "lastval", "exists", "in",
    "any", "all", "some", "values", "cast", "over", "filter", "within", "row", "array", "interval", "numeric",
    "decimal", "varchar", "char", "character", "timestamp", "timestamptz", "time", "bit", "float", "select",
    "from", "join", "on", "using", "as", "and", "or", "not", "where", "lateral", "is", "like", "ilike",
    "similar", "between", "case", "when", "then", "else", "by", "distinct", "having", "limit", "offset",
    "union", "intersect", "except", "with", "recursive", "for", "of", "nowait", "tablesample", "rows",
    "range", "groups", "partition", "order", "group",
];

/// Functions of the `mtm` schema that write (the others only read).
const MTM_WRITES: &[&str] = &["alter_sequences", "make_table_local", "set_temp_schema"];

/// The [`Intent`] of a statement (or of a multi-statement string).
pub fn intent(sql: &str) -> Intent {
    if has_inner_semicolon(sql) {
        let pieces: Vec<Intent> = statements(sql)
            .into_iter()
            .map(|piece| match single_intent(piece) {
                Intent::BlockOnly(_) => Intent::Read,
                other => other,
            })
            .collect();
        return if pieces.iter().any(|i| !matches!(i, Intent::Read | Intent::Write)) {
            Intent::TransactionControl
        } else if pieces.iter().all(|i| *i == Intent::Read) {
            Intent::Read
        } else {
            Intent::Write
        };
    }
    single_intent(sql)
}

fn single_intent(sql: &str) -> Intent {
    let Some(kw) = first_keyword(sql) else { return Intent::Read };
    let upper = sql.to_ascii_uppercase();
    let words: Vec<&str> = upper.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect();
    let has = |w: &str| words.contains(&w);
    match kw.as_str() {
        "COMMIT" | "END" => {
            if has("PREPARED") {
                Intent::TransactionControl
            } else if has("CHAIN") && !has("NO") {
                Intent::CommitAndChain
            } else {
                Intent::Commit
            }
        }
        "PREPARE" if is_prepare_transaction(sql) => match quoted_literal(sql) {
            Some(gid) => Intent::PrepareTransaction(gid),
            None => Intent::TransactionControl,
        },
        "PREPARE" => Intent::Read,
        "BEGIN" | "START" => Intent::Begin,
        // ROLLBACK AND CHAIN: PostgreSQL refuses it outside a block.
        "ROLLBACK" | "ABORT" if !has("TO") && !has("PREPARED") && !(has("CHAIN") && !has("NO")) => Intent::Rollback,
        "ROLLBACK" | "ABORT" | "SAVEPOINT" | "RELEASE" => Intent::TransactionControl,
        "EXPLAIN" if !has("ANALYZE") && !has("ANALYSE") => Intent::Read,
        // Takes locks or opens a cursor, writes nothing; outside a block
        // PostgreSQL refuses either, which a transaction of the proxy's
        // would hide.
        "LOCK" => Intent::BlockOnly("LOCK TABLE"),
        "DECLARE" if !(has("HOLD") && !has("WITHOUT")) => Intent::BlockOnly("DECLARE CURSOR"),
        "COPY" => {
            let query_copy = upper.find("COPY").is_some_and(|p| upper[p + 4..].trim_start().starts_with('('));
            if query_copy || !has("FROM") {
                Intent::Read
            } else {
                Intent::Write
            }
        }
        // Tablespaces are directories of one server: they stay local.
        "CREATE" | "DROP" | "ALTER" if words.get(1) == Some(&"TABLESPACE") => Intent::Read,
        "CREATE" | "DROP" if has("CONCURRENTLY") || words.get(1) == Some(&"DATABASE") => Intent::EveryNode,
        // Its owner and name are schema changes like any other, which the
        // cluster's commit carries; the rest (SET, SET TABLESPACE, WITH)
        // each node takes in turn.
        "ALTER" if words.get(1) == Some(&"DATABASE") && matches!(words.get(3), Some(&"OWNER" | &"RENAME")) => Intent::Write,
        "ALTER" if words.get(1) == Some(&"SYSTEM") || words.get(1) == Some(&"DATABASE") => Intent::EveryNode,
        "VACUUM" | "ANALYZE" | "ANALYSE" | "REINDEX" | "CLUSTER" => Intent::EveryNode,
        "WITH" if has("INSERT") || has("UPDATE") || has("DELETE") || has("MERGE") => Intent::Write,
        "SELECT" | "WITH" | "VALUES" | "TABLE" => {
            if has("INTO") || calls_unknown_function(sql) {
                Intent::Write
            } else {
                Intent::Read
            }
        }
        k if READS.contains(&k) => Intent::Read,
        _ => Intent::Write,
    }
}

/// For a multi-statement Query whose last statement is a plain COMMIT or
/// END (`BEGIN; UPDATE …; COMMIT`), the statements before it: the proxy
/// runs those, then commits with the cluster's two-phase commit itself.
pub fn strip_trailing_commit(sql: &str) -> Option<&str> {
    let (head, last) = split_last(sql)?;
    (is_plain_commit(last) && !head.is_empty()).then_some(head)
}

/// (the statements before the last one, the last one) of `sql`; the
/// first is empty when there is only one.
fn split_last(sql: &str) -> Option<(&str, &str)> {
    let (last_start, last_end) = *statement_spans(sql).last()?;
    Some((sql[..last_start].trim_end().trim_end_matches(';').trim_end(), &sql[last_start..last_end]))
}

/// A multi-statement Query cut after its first plain COMMIT, END,
/// ROLLBACK or ABORT that more statements follow: (the statements through
/// it, the rest). PostgreSQL runs the rest in a transaction of its own
/// (implicit, or one the rest opens), so the proxy ends the first before
/// it sends the rest, and commits each the way it commits a Query.
pub fn split_after_transaction_end(sql: &str) -> Option<(&str, &str)> {
    let spans = statement_spans(sql);
    let ends = |s: &str| {
        is_plain_commit(s) || is_plain_rollback(s) || is_chain(s, COMMIT_VERBS) || is_chain(s, ROLLBACK_VERBS) || prepared_gid(s).is_some()
    };
    let i = spans.iter().position(|&(a, z)| ends(&sql[a..z]))?;
    let next = spans.get(i + 1)?;
    Some((&sql[..spans[i].1], &sql[next.0..]))
}

/// A Query whose last statement is COMMIT AND CHAIN: the statements
/// before it (empty when it is the only one).
pub fn strip_trailing_commit_and_chain(sql: &str) -> Option<&str> {
    let (head, last) = split_last(sql)?;
    is_chain(last, COMMIT_VERBS).then_some(head)
}

/// A Query whose last statement is `PREPARE TRANSACTION 'gid'` after
/// others: (the statements before it, the gid).
pub fn strip_trailing_prepare(sql: &str) -> Option<(&str, String)> {
    let (head, last) = split_last(sql)?;
    if head.is_empty() {
        return None;
    }
    Some((head, prepared_gid(last)?))
}

/// The gid of a `PREPARE TRANSACTION 'gid'` statement.
pub fn prepared_gid(statement: &str) -> Option<String> {
    let prepare = first_keyword(statement).as_deref() == Some("PREPARE") && is_prepare_transaction(statement);
    prepare.then(|| quoted_literal(statement)).flatten()
}

const COMMIT_VERBS: &[&str] = &["COMMIT", "END"];
const ROLLBACK_VERBS: &[&str] = &["ROLLBACK", "ABORT"];

/// One of `verbs` [`WORK` | `TRANSACTION`] `AND CHAIN`.
fn is_chain(statement: &str, verbs: &[&str]) -> bool {
    match upper_words(statement).as_slice() {
        [ending @ .., and, chain] if and == "AND" && chain == "CHAIN" => is_verb(ending, verbs),
        _ => false,
    }
}

/// Whether a statement of `sql` opens a transaction block.
pub fn opens_transaction_anywhere(sql: &str) -> bool {
    statements(sql).iter().any(|s| matches!(first_keyword(s).as_deref(), Some("BEGIN" | "START")))
}

/// `COMMIT` / `END` [`WORK` | `TRANSACTION`], without AND CHAIN.
pub fn is_plain_commit(statement: &str) -> bool {
    is_verb(&upper_words(statement), COMMIT_VERBS)
}

/// `ROLLBACK` / `ABORT` [`WORK` | `TRANSACTION`], without AND CHAIN or TO.
fn is_plain_rollback(statement: &str) -> bool {
    is_verb(&upper_words(statement), ROLLBACK_VERBS)
}

fn upper_words(statement: &str) -> Vec<String> {
    statement.split_whitespace().map(str::to_ascii_uppercase).collect()
}

/// `words` are one of `verbs`, then optionally WORK or TRANSACTION.
fn is_verb(words: &[String], verbs: &[&str]) -> bool {
    match words {
        [verb] => verbs.contains(&verb.as_str()),
        [verb, noise] => verbs.contains(&verb.as_str()) && matches!(noise.as_str(), "WORK" | "TRANSACTION"),
        _ => false,
    }
}

/// The first '…' literal of a statement, unescaped.
fn quoted_literal(sql: &str) -> Option<String> {
    let start = sql.find('\'')? + 1;
    let mut out = String::new();
    let mut chars = sql[start..].chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            if chars.peek() == Some(&'\'') {
                chars.next();
                out.push('\'');
            } else {
                return Some(out);
            }
        } else {
            out.push(c);
        }
    }
    None
}

/// Whether the statement calls something not in [`READ_CALLS`]: an
/// identifier followed by '(' outside string literals.
fn calls_unknown_function(sql: &str) -> bool {
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                // A quoted name called as a function is not a builtin.
                let end = sql[i + 1..].find('"').map_or(b.len(), |p| i + 1 + p + 1);
                if sql[end..].trim_start().starts_with('(') {
                    return true;
                }
                i = end;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.' || b[i] == b'$') {
                    i += 1;
                }
                if sql[i..].trim_start().starts_with('(') {
                    let name = sql[start..i].to_ascii_lowercase();
                    let (schema, bare) = match name.rsplit_once('.') {
                        Some((s, n)) => (Some(s.to_string()), n.to_string()),
                        None => (None, name.clone()),
                    };
                    // pg_notify() is delivered and setval() moves the
                    // sequence on every node through the cluster's commit
                    // (the extension's `notify` and `sequences` modules).
                    let builtin = !["pg_notify", "setval"].contains(&bare.as_str())
                        && match schema.as_deref() {
                            Some("pg_catalog") => true,
                            Some("mtm") => !MTM_WRITES.contains(&bare.as_str()),
                            Some(_) => false,
                            None => READ_CALLS.contains(&bare.as_str()) || bare.starts_with("pg_"),
                        };
                    if !builtin {
                        return true;
                    }
                }
            }
            c if c.is_ascii_digit() => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    false
}

/// The first keyword, upper-cased, after whitespace, comments and '('.
pub fn first_keyword(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'(') {
            i += 1;
        }
        if b[i..].starts_with(b"--") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i = after_block_comment(b, i);
        } else {
            break;
        }
    }
    let start = i;
    while i < b.len() && (b[i].is_ascii_alphabetic() || b[i] == b'_') {
        i += 1;
    }
    (i > start).then(|| sql[start..i].to_ascii_uppercase())
}

/// A ';' followed by more than whitespace: possibly several statements.
/// (A ';' inside a string literal makes us parse, which is only slower.)
/// The position after the block comment starting at `i` (comments nest,
/// as PostgreSQL allows).
fn after_block_comment(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0;
    while i < b.len() {
        if b[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if b[i..].starts_with(b"*/") {
            depth -= 1;
            i += 2;
            if depth == 0 {
                break;
            }
        } else {
            i += 1;
        }
    }
    i
}

fn has_inner_semicolon(sql: &str) -> bool {
    statement_spans(sql).len() > 1
}

/// The statements of a query string, split at the semicolons PostgreSQL
/// would split at — not those inside quotes, dollar quotes (function
/// bodies, DO blocks) or comments.
pub fn statements(sql: &str) -> Vec<&str> {
    statement_spans(sql).into_iter().map(|(a, b)| &sql[a..b]).collect()
}

/// Byte ranges of the non-blank statements of `sql`.
fn statement_spans(sql: &str) -> Vec<(usize, usize)> {
    let b = sql.as_bytes();
    let mut spans = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let push = |a: usize, z: usize, spans: &mut Vec<(usize, usize)>| {
        let piece = &sql[a..z];
        if !piece.trim().is_empty() {
            let lead = piece.len() - piece.trim_start().len();
            spans.push((a + lead, a + piece.trim_end().len()));
        }
    };
    while i < b.len() {
        match b[i] {
            b';' => {
                push(start, i, &mut spans);
                start = i + 1;
                i += 1;
            }
            b'\'' => {
                let backslashes = i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e');
                i += 1;
                while i < b.len() {
                    if backslashes && b[i] == b'\\' {
                        i += 2;
                    } else if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                        } else {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            }
            b'"' => {
                i += 1 + sql[i + 1..].find('"').map_or(b.len(), |p| p + 1);
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i += sql[i..].find('\n').unwrap_or(b.len() - i);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = after_block_comment(b, i),
            b'$' => {
                // $tag$ or $$ opens a dollar quote; $1 is a parameter.
                let tag_len = b[i + 1..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == b'_').count();
                let starts_ok = tag_len == 0 || !b[i + 1].is_ascii_digit();
                if starts_ok && b.get(i + 1 + tag_len) == Some(&b'$') {
                    let tag = &sql[i..i + tag_len + 2];
                    let body = i + tag.len();
                    i = sql[body..].find(tag).map_or(b.len(), |p| body + p + tag.len());
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    push(start, b.len().max(start), &mut spans);
    spans
}

fn is_prepare_transaction(sql: &str) -> bool {
    let upper = sql.to_ascii_uppercase();
    upper.split_whitespace().nth(1) == Some("TRANSACTION")
}

#[cfg(test)]
mod tests {
    use super::*;
    use StatementClass::*;

    #[test]
    fn keywords_decide_single_statements() {
        let c = Classifier::default();
        assert_eq!(c.classify("select 1"), Other);
        assert_eq!(c.classify("  INSERT INTO t VALUES (1)"), Other);
        assert_eq!(c.classify("create table t(id int)"), Ddl);
        assert_eq!(c.classify("/* x /* nested */ */ -- c\n ALTER TABLE t ADD c int;"), Ddl);
        assert_eq!(c.classify("vacuum"), Ddl);
        assert_eq!(c.classify("begin"), Transaction);
        assert_eq!(c.classify("COMMIT PREPARED 'x'"), Transaction);
        assert_eq!(c.classify("prepare transaction 'g'"), Transaction);
        assert_eq!(c.classify("prepare s as select 1"), Other);
        assert_eq!(c.classify(""), Other);
        assert_eq!(c.classify("   "), Other);
    }

    #[test]
    fn multi_statement_strings_take_the_strongest_class() {
        let c = Classifier::default();
        assert_eq!(c.classify("insert into t values (1); create table u(id int)"), Ddl);
        assert_eq!(c.classify("begin; insert into t values (1); commit"), Transaction);
        assert_eq!(c.classify("select 1; select 2;"), Other);
        // Not parseable by sqlparser: falls back to keywords per piece.
        assert_eq!(c.classify("select 1; create publication p for all tables"), Ddl);
    }

    #[test]
    fn remote_functions_are_found_by_the_parser() {
        let c = Classifier::new(&["public.do_work".into(), "Refresh_All".into()]);
        assert_eq!(c.classify("select do_work(1)"), RemoteFunction);
        assert_eq!(c.classify("SELECT public.do_work(1), 2"), RemoteFunction);
        assert_eq!(c.classify("select * from t where x = refresh_all()"), RemoteFunction);
        // Mentioned but not called: the parser says no.
        assert_eq!(c.classify("select 'do_work' as name"), Other);
        assert_eq!(c.classify("select do_work_other(1)"), Other);
    }

    #[test]
    fn first_keyword_edges() {
        assert_eq!(first_keyword("((select 1))").as_deref(), Some("SELECT"));
        assert_eq!(first_keyword("/* unterminated"), None);
        assert_eq!(first_keyword("-- only a comment"), None);
    }

    #[test]
    fn intents_for_the_commit_path() {
        assert_eq!(intent("SELECT abalance FROM pgbench_accounts WHERE aid = $1;"), Intent::Read);
        assert_eq!(intent("select count(*), max(x) from t where y in (1, 2)"), Intent::Read);
        assert_eq!(intent("select 'f(' from t"), Intent::Read);
        assert_eq!(intent("select my_upsert(1)"), Intent::Write);
        assert_eq!(intent("select public.f()"), Intent::Write);
        assert_eq!(intent("select pg_catalog.now(), mtm.status()"), Intent::Read);
        assert_eq!(intent("select mtm.alter_sequences()"), Intent::Write);
        assert_eq!(intent("do $$ begin execute 'create table x(i int)'; end $$"), Intent::Write, "one statement");
        assert_eq!(intent("create function f() returns int language plpgsql as $f$ begin return 1; end $f$"), Intent::Write);
        assert_eq!(intent("select * into t2 from t"), Intent::Write);
        assert_eq!(intent("with x as (delete from t returning *) select * from x"), Intent::Write);
        assert_eq!(intent("insert into t values (1)"), Intent::Write);
        assert_eq!(intent("notify chan, 'x'"), Intent::Write, "delivered on every node");
        assert_eq!(intent("select pg_notify('chan', 'x')"), Intent::Write, "delivered on every node");
        assert_eq!(intent("SELECT pg_catalog.setval('public.t_id_seq', 100, true)"), Intent::Write, "moves the sequence on every node");
        assert_eq!(intent("select setval('s', 1)"), Intent::Write);
        assert_eq!(intent("select nextval('s')"), Intent::Read, "a node's own value");
        assert_eq!(intent("SELECT pg_catalog.PG_NOTIFY('chan', 'x')"), Intent::Write);
        assert_eq!(intent("select pg_backend_pid()"), Intent::Read);
        assert_eq!(intent("listen chan"), Intent::Read);
        assert_eq!(intent("UPDATE t SET v = 1"), Intent::Write);
        assert_eq!(intent("copy t from stdin"), Intent::Write);
        assert_eq!(intent("copy t to stdout"), Intent::Read);
        assert_eq!(intent("copy (select * from t) to stdout"), Intent::Read);
        assert_eq!(intent("create table t(id int)"), Intent::Write);
        assert_eq!(intent("vacuum t"), Intent::EveryNode);
        assert_eq!(intent("VACUUM ANALYZE pgbench_branches"), Intent::EveryNode);
        assert_eq!(intent("create index concurrently i on t(x)"), Intent::EveryNode);
        assert_eq!(intent("drop index concurrently i"), Intent::EveryNode);
        assert_eq!(intent("create database d"), Intent::EveryNode);
        assert_eq!(intent("alter system set work_mem = '8MB'"), Intent::EveryNode);
        assert_eq!(intent("alter database d set work_mem = '8MB'"), Intent::EveryNode);
        assert_eq!(intent("alter database d owner to r"), Intent::Write);
        assert_eq!(intent("alter database d rename to e"), Intent::Write);
        assert_eq!(intent("alter database d set search_path = owner"), Intent::EveryNode);
        assert_eq!(intent("create tablespace ts location '/x'"), Intent::Read);
        assert_eq!(intent("create table database_log(id int)"), Intent::Write);
        assert_eq!(intent("vacuum a; vacuum b"), Intent::TransactionControl, "PostgreSQL refuses it: forwarded as sent");
        assert_eq!(intent("commit"), Intent::Commit);
        assert_eq!(intent("END;"), Intent::Commit);
        assert_eq!(intent("commit and no chain"), Intent::Commit);
        assert_eq!(intent("commit and chain"), Intent::CommitAndChain);
        assert_eq!(intent("commit prepared 'x'"), Intent::TransactionControl);
        assert_eq!(intent("prepare transaction 'it''s'"), Intent::PrepareTransaction("it's".into()));
        assert_eq!(intent("prepare s as insert into t values ($1)"), Intent::Read);
        assert_eq!(intent("begin"), Intent::Begin);
        assert_eq!(intent("start transaction isolation level serializable"), Intent::Begin);
        assert_eq!(intent("rollback"), Intent::Rollback);
        assert_eq!(intent("ABORT AND NO CHAIN"), Intent::Rollback);
        assert_eq!(intent("rollback to savepoint a"), Intent::TransactionControl);
        assert_eq!(intent("rollback prepared 'x'"), Intent::TransactionControl);
        assert_eq!(intent("rollback and chain"), Intent::TransactionControl);
        assert_eq!(intent("rollback and no chain"), Intent::Rollback);
        assert_eq!(intent("lock table t in exclusive mode"), Intent::BlockOnly("LOCK TABLE"), "refused outside a block, as by PostgreSQL");
        assert_eq!(intent("declare c cursor for select 1"), Intent::BlockOnly("DECLARE CURSOR"));
        assert_eq!(intent("declare c no scroll cursor without hold for select 1"), Intent::BlockOnly("DECLARE CURSOR"));
        assert_eq!(intent("declare c cursor with hold for select 1"), Intent::Read, "allowed outside a block");
        assert_eq!(intent("lock table t; insert into t values (1)"), Intent::Write, "PostgreSQL's implicit block allows it");
        assert_eq!(intent("lock table t; select 1"), Intent::Read);
        assert_eq!(intent("insert into t values (1); insert into t values (2)"), Intent::Write);
        assert_eq!(intent("select 1; select 2"), Intent::Read);
        assert_eq!(intent("begin; insert into t values (1); commit"), Intent::TransactionControl);
        assert_eq!(intent(""), Intent::Read);
        assert_eq!(intent("explain analyze delete from t"), Intent::Write);
        assert_eq!(intent("explain select 1"), Intent::Read);
    }

    #[test]
    fn a_query_is_cut_after_its_first_transaction_end_that_more_statements_follow() {
        let split = split_after_transaction_end;
        assert_eq!(split("begin; insert into t values (1); commit; insert into t values (2)"), Some(("begin; insert into t values (1); commit", "insert into t values (2)")));
        assert_eq!(split("begin; select 1; ROLLBACK WORK ;\n begin; update t set v = 1; commit"), Some(("begin; select 1; ROLLBACK WORK", "begin; update t set v = 1; commit")));
        assert_eq!(split("commit; select 1"), Some(("commit", "select 1")));
        assert_eq!(split("begin; update t set v = 1; end; abort"), Some(("begin; update t set v = 1; end", "abort")));
        // Nothing after it, or not a plain end: not cut.
        assert_eq!(split("begin; update t set v = 1; commit;  "), None);
        assert_eq!(split("begin; update t set v = 1; commit and chain; select 1"), Some(("begin; update t set v = 1; commit and chain", "select 1")));
        assert_eq!(split("begin; rollback work and chain; select 1"), Some(("begin; rollback work and chain", "select 1")));
        assert_eq!(split("begin; commit and no chain; select 1"), None);
        assert_eq!(strip_trailing_commit_and_chain("begin; update t set v = 1; COMMIT AND CHAIN;"), Some("begin; update t set v = 1"));
        assert_eq!(strip_trailing_commit_and_chain("commit and chain"), Some(""));
        assert_eq!(strip_trailing_commit_and_chain("begin; update t set v = 1; rollback and chain"), None);
        assert_eq!(strip_trailing_commit_and_chain("begin; update t set v = 1; commit"), None);
        assert_eq!(split("begin; savepoint s; rollback to s; select 1"), None);
        assert_eq!(split("begin; select 'commit; x'; select 1"), None);
        assert_eq!(split("do $$ begin commit; end $$; select 1"), None);
        assert_eq!(split("commit prepared 'x'; select 1"), None);
        assert_eq!(split("begin; insert into t values (1); prepare transaction 'x'; select 1"), Some(("begin; insert into t values (1); prepare transaction 'x'", "select 1")));
        assert_eq!(strip_trailing_prepare("begin; insert into t values (1); PREPARE TRANSACTION 'a''b';"), Some(("begin; insert into t values (1)", "a'b".to_string())));
        assert_eq!(strip_trailing_prepare("prepare transaction 'x'"), None);
        assert_eq!(strip_trailing_prepare("begin; prepare p as select 1"), None);
    }

    #[test]
    fn a_trailing_commit_is_found_only_as_a_statement_of_its_own() {
        assert_eq!(strip_trailing_commit("begin; update t set v = 1; commit"), Some("begin; update t set v = 1"));
        assert_eq!(strip_trailing_commit("insert into t values (1); COMMIT WORK;"), Some("insert into t values (1)"));
        assert_eq!(strip_trailing_commit("insert into t values (1); end"), Some("insert into t values (1)"));
        assert_eq!(strip_trailing_commit("commit"), None);
        assert_eq!(strip_trailing_commit("; commit"), None);
        assert_eq!(strip_trailing_commit("insert into t values ('a;commit')"), None);
        assert_eq!(strip_trailing_commit("update t set v = 1; commit and chain"), None);
        assert_eq!(strip_trailing_commit("update t set v = 1; commit prepared 'x'"), None);
        assert_eq!(strip_trailing_commit("do $$ begin perform 1; end $$; commit"), Some("do $$ begin perform 1; end $$"));
        assert_eq!(statements("a; 'b;c'; \"d;\"; -- e;\n f; /* g; /* h; */ */ i; $x$ j; $x$; E'k\\';l'; $1;"), vec![
            "a", "'b;c'", "\"d;\"", "-- e;\n f", "/* g; /* h; */ */ i", "$x$ j; $x$", "E'k\\';l'", "$1"
        ]);
    }
}
