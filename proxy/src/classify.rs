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
            Err(_) => sql
                .split(';')
                .filter(|p| !p.trim().is_empty())
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
            // Nested comments, as PostgreSQL allows.
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
fn has_inner_semicolon(sql: &str) -> bool {
    match sql.find(';') {
        None => false,
        Some(p) => !sql[p..].trim_start_matches(|c: char| c == ';' || c.is_whitespace()).is_empty(),
    }
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
}
