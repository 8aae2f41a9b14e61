//! The SQL templates of `sql/` and how they are filled in.
//!
//! Templates name their parameters `{name}`; every identifier is quoted
//! here, so source column names with capitals, spaces or keywords work.

/// `sql/late_changes.sql`.
pub const LATE_CHANGES: &str = include_str!("../../sql/late_changes.sql");
/// `sql/versions.sql`.
pub const VERSIONS: &str = include_str!("../../sql/versions.sql");
/// `sql/key_history.sql`.
pub const KEY_HISTORY: &str = include_str!("../../sql/key_history.sql");
/// `sql/history_between.sql`.
pub const HISTORY_BETWEEN: &str = include_str!("../../sql/history_between.sql");
/// `sql/batch_stats.sql`.
pub const BATCH_STATS: &str = include_str!("../../sql/batch_stats.sql");
/// `sql/current_rebuild.sql`.
pub const CURRENT_REBUILD: &str = include_str!("../../sql/current_rebuild.sql");
/// `sql/current_merge.sql`.
pub const CURRENT_MERGE: &str = include_str!("../../sql/current_merge.sql");
/// `sql/bigquery/history_merge.sql`.
pub const BQ_HISTORY_MERGE: &str = include_str!("../../sql/bigquery/history_merge.sql");
/// `sql/bigquery/stage_days.sql`.
pub const BQ_STAGE_DAYS: &str = include_str!("../../sql/bigquery/stage_days.sql");
/// `sql/bigquery/fill_columns.sql`.
pub const BQ_FILL_COLUMNS: &str = include_str!("../../sql/bigquery/fill_columns.sql");
/// `sql/bigquery/current_merge.sql`.
pub const BQ_CURRENT_MERGE: &str = include_str!("../../sql/bigquery/current_merge.sql");
/// `sql/bigquery/current_log.sql`.
pub const BQ_CURRENT_LOG: &str = include_str!("../../sql/bigquery/current_log.sql");

/// `sql/database/common.sql`.
pub const DB_COMMON: &str = include_str!("../../sql/database/common.sql");
/// `sql/database/postgres.sql`.
pub const DB_POSTGRES: &str = include_str!("../../sql/database/postgres.sql");
/// `sql/database/mysql.sql`.
pub const DB_MYSQL: &str = include_str!("../../sql/database/mysql.sql");

/// The SQL dialect a statement is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// DataFusion (the local warehouse): `"name"`.
    DataFusion,
    /// BigQuery GoogleSQL: `` `name` ``.
    BigQuery,
    /// PostgreSQL, and MySQL / MariaDB in `ANSI_QUOTES` and
    /// `NO_BACKSLASH_ESCAPES` mode (the database warehouse's sessions): `"name"`.
    Database,
}

impl Dialect {
    /// Quotes an identifier.
    pub fn ident(self, name: &str) -> String {
        match self {
            Dialect::DataFusion | Dialect::Database => {
                format!("\"{}\"", name.replace('"', "\"\""))
            }
            Dialect::BigQuery => format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`")),
        }
    }

    /// Quotes a string literal: DataFusion doubles `'`; GoogleSQL escapes
    /// with a backslash (where `''` is an error and `\` starts an escape).
    pub fn literal(self, value: &str) -> String {
        match self {
            Dialect::DataFusion | Dialect::Database => literal(value),
            Dialect::BigQuery => {
                let mut out = String::with_capacity(value.len() + 2);
                out.push('\'');
                for c in value.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\'' => out.push_str("\\'"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        '\t' => out.push_str("\\t"),
                        c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
                        c => out.push(c),
                    }
                }
                out.push('\'');
                out
            }
        }
    }

    /// `expr` as text.
    pub fn text(self, expr: &str) -> String {
        match self {
            Dialect::DataFusion | Dialect::BigQuery => format!("CAST({expr} AS STRING)"),
            // A function both PostgreSQL and MySQL have, returning text.
            Dialect::Database => format!("CONCAT({expr})"),
        }
    }

    /// `a."k1" = b."k1" AND a."k2" = b."k2"`.
    pub fn key_equal(self, left: &str, right: &str, key: &[String]) -> String {
        key.iter()
            .map(|k| format!("{left}.{k} = {right}.{k}", k = self.ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `"k1", "k2"`.
    pub fn list(self, names: &[String]) -> String {
        names
            .iter()
            .map(|k| self.ident(k))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Quotes an SQL identifier for DataFusion (`"name"`, doubling inner quotes).
pub fn ident(name: &str) -> String {
    Dialect::DataFusion.ident(name)
}

/// Quotes an SQL string literal.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Replaces each `{name}` of `template` with its value; panics on a
/// parameter the template does not know, which is a bug in the caller.
pub fn render(template: &str, params: &[(&str, &str)]) -> String {
    let mut out = template
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for (name, value) in params {
        let placeholder = format!("{{{name}}}");
        assert!(
            out.contains(&placeholder),
            "template has no parameter {placeholder}"
        );
        out = out.replace(&placeholder, value);
    }
    out.trim().to_string()
}

/// The `-- name: x` section of a sectioned template such as `current_merge.sql`.
pub fn section<'a>(template: &'a str, name: &str) -> &'a str {
    let marker = format!("-- name: {name}\n");
    let start = template
        .find(&marker)
        .unwrap_or_else(|| panic!("template has no section {name}"))
        + marker.len();
    let rest = &template[start..];
    rest[..rest.find("-- name:").unwrap_or(rest.len())].trim()
}

/// `a."k1" = b."k1" AND a."k2" = b."k2"` (DataFusion).
pub fn key_equal(left: &str, right: &str, key: &[String]) -> String {
    Dialect::DataFusion.key_equal(left, right, key)
}

/// `"k1", "k2"` (DataFusion).
pub fn key_list(key: &[String]) -> String {
    Dialect::DataFusion.list(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_quotes() {
        let sql = render("-- c\nSELECT {a} FROM t", &[("a", &ident("We\"ird"))]);
        assert_eq!(sql, "SELECT \"We\"\"ird\" FROM t");
        assert_eq!(
            key_equal("t", "s", &["A".into(), "b".into()]),
            "t.\"A\" = s.\"A\" AND t.\"b\" = s.\"b\""
        );
        assert_eq!(section(CURRENT_MERGE, "insert_when"), "s.{op} <> 'D'");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(Dialect::BigQuery.ident("a`b"), "`a\\`b`");
        assert_eq!(
            Dialect::BigQuery.literal("it's a\\b\n"),
            "'it\\'s a\\\\b\\n'"
        );
        assert_eq!(Dialect::BigQuery.ident("a\\`b"), "`a\\\\\\`b`");
        assert_eq!(Dialect::DataFusion.literal("it's"), "'it''s'");
    }
}
