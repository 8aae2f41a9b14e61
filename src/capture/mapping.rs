//! Which tables and columns capture writes, under which names: AWS DMS
//! table-mapping rules (the JSON document DMS takes, as is) and column masking.
//!
//! Rules supported: `selection` (include / exclude, `%` wildcards on schema and
//! table names) and `transformation` with `rule-target` schema, table or column
//! and `rule-action` rename, convert-lowercase, convert-uppercase, add-prefix,
//! add-suffix, remove-column. Other DMS rules are refused with their id, so a
//! document is never half applied.

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::SqlType;
use crate::error::{Error, Result};

/// A table of the source as capture sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceTable {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Columns in table order.
    pub columns: Vec<SourceColumn>,
}

/// One column of a [`SourceTable`].
#[derive(Debug, Clone, PartialEq)]
pub struct SourceColumn {
    /// Column name.
    pub name: String,
    /// Type written to the objects.
    pub sql_type: SqlType,
    /// Part of the primary key (replica identity).
    pub key: bool,
    /// The value rows stored before the column was added hold, as text,
    /// when the server gives it (PostgreSQL's fast default, MySQL's column
    /// default): no row event says so.
    pub existing: Option<String>,
    /// Declared NOT NULL.
    pub not_null: bool,
}

/// A table as written: names after mapping, columns after removal, masks.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTable {
    /// Schema folder.
    pub schema: String,
    /// Table folder.
    pub name: String,
    /// Written columns.
    pub columns: Vec<OutputColumn>,
}

/// One written column.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputColumn {
    /// Index of the column in the source row.
    pub source_index: usize,
    /// Name after mapping.
    pub name: String,
    /// Type as written (`text` when masked).
    pub sql_type: SqlType,
    /// Part of the primary key.
    pub key: bool,
    /// Masking applied to every value.
    pub mask: Option<Mask>,
    /// The value of rows stored before the column was added (masked).
    pub existing: Option<String>,
    /// Declared NOT NULL.
    pub not_null: bool,
}

/// How a column's values are masked.
#[derive(Debug, Clone, PartialEq)]
pub enum Mask {
    /// Hex SHA-256 of salt + value: equal values stay equal (joins, keys), values stay hidden.
    Hash {
        /// Secret salt.
        salt: String,
    },
    /// Every character replaced by `*`.
    Redact,
    /// A fixed value.
    Replace(String),
}

impl Mask {
    /// The masked form of `value`.
    pub fn apply(&self, value: &str) -> String {
        match self {
            Mask::Hash { salt } => {
                let mut h = Sha256::new();
                h.update(salt.as_bytes());
                h.update(value.as_bytes());
                hex::encode(h.finalize())
            }
            Mask::Redact => "*".repeat(value.chars().count()),
            Mask::Replace(fixed) => fixed.clone(),
        }
    }
}

/// `[[masking]]` of the capture file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskFile {
    /// `schema.table` of the source, `%` wildcards allowed.
    pub table: String,
    /// Source column name, `%` wildcards allowed.
    pub column: String,
    /// `hash`, `redact` or `replace`.
    pub method: String,
    /// The fixed value of `replace`.
    #[serde(default)]
    pub value: Option<String>,
    /// Environment variable holding the salt of `hash` (never put a salt in the file).
    #[serde(default)]
    pub salt_env: Option<String>,
}

/// The DMS table-mapping document.
#[derive(Debug, Clone, Deserialize)]
pub struct MappingDocument {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
struct Rule {
    #[serde(rename = "rule-type")]
    rule_type: String,
    #[serde(rename = "rule-id", default)]
    rule_id: serde_json::Value,
    #[serde(rename = "rule-target", default)]
    rule_target: Option<String>,
    #[serde(rename = "object-locator")]
    locator: Locator,
    #[serde(rename = "rule-action")]
    action: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Locator {
    #[serde(rename = "schema-name")]
    schema: String,
    #[serde(rename = "table-name", default)]
    table: Option<String>,
    #[serde(rename = "column-name", default)]
    column: Option<String>,
}

/// Mapping rules and masks, checked.
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    rules: Vec<Rule>,
    masks: Vec<(String, String, Mask)>,
}

/// `%` matches any run of characters; everything else matches itself
/// (case-insensitively, as DMS does).
pub(crate) fn like(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    // Greedy wildcard matching with backtracking to the last `%`.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '%' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some(pi);
            pi += 1;
            mark = ti;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '%')
}

impl Mapping {
    /// Checks a DMS rules document and the masks. With no document, every
    /// table of the publication is selected.
    pub fn new(document: Option<&str>, masks: &[MaskFile]) -> Result<Mapping> {
        let rules = match document {
            None => vec![],
            Some(text) => {
                let doc: MappingDocument = serde_json::from_str(text).map_err(|e| {
                    Error::Usage(format!(
                        "table-mapping rules: {e} (expected the DMS JSON document with \"rules\")"
                    ))
                })?;
                doc.rules
            }
        };
        for rule in &rules {
            let id = &rule.rule_id;
            let ok = match rule.rule_type.as_str() {
                "selection" => matches!(rule.action.as_str(), "include" | "exclude" | "explicit"),
                "transformation" => {
                    matches!(
                        (rule.rule_target.as_deref(), rule.action.as_str()),
                        (
                            Some("schema" | "table" | "column"),
                            "rename"
                                | "convert-lowercase"
                                | "convert-uppercase"
                                | "add-prefix"
                                | "add-suffix"
                        ) | (Some("column"), "remove-column")
                    ) && (!matches!(rule.action.as_str(), "rename" | "add-prefix" | "add-suffix")
                        || rule.value.is_some())
                }
                _ => false,
            };
            if !ok {
                return Err(Error::Usage(format!(
                    "table-mapping rule {id}: {} {:?} on {:?} is not supported; supported: selection include/exclude, \
                     transformation rename, convert-lowercase, convert-uppercase, add-prefix, add-suffix (with \"value\") \
                     on schema/table/column, and remove-column",
                    rule.rule_type, rule.action, rule.rule_target
                )));
            }
        }
        let masks = masks
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mask = match m.method.as_str() {
                    "hash" => {
                        let var = m.salt_env.as_deref().unwrap_or("CDCFLOW_MASK_SALT");
                        let salt = std::env::var(var).map_err(|_| {
                            Error::Usage(format!(
                                "masking[{i}]: method hash needs a salt in the environment variable {var}"
                            ))
                        })?;
                        Mask::Hash { salt }
                    }
                    "redact" => Mask::Redact,
                    "replace" => Mask::Replace(m.value.clone().ok_or_else(|| {
                        Error::Usage(format!("masking[{i}]: method replace needs `value`"))
                    })?),
                    other => {
                        return Err(Error::Usage(format!(
                            "masking[{i}]: unknown method {other:?}; use hash, redact or replace"
                        )));
                    }
                };
                Ok((m.table.clone(), m.column.clone(), mask))
            })
            .collect::<Result<_>>()?;
        Ok(Mapping { rules, masks })
    }

    /// Whether capture writes this table.
    pub fn selects(&self, schema: &str, table: &str) -> bool {
        let selection = self.rules.iter().filter(|r| r.rule_type == "selection");
        let (mut included, mut any) = (false, false);
        for rule in selection {
            any = true;
            let hit = like(&rule.locator.schema, schema)
                && like(rule.locator.table.as_deref().unwrap_or("%"), table);
            if hit && rule.action == "exclude" {
                return false;
            }
            included |= hit;
        }
        included || !any
    }

    fn rename(&self, target: &str, current: String, hit: impl Fn(&Locator) -> bool) -> String {
        let mut name = current;
        for rule in self
            .rules
            .iter()
            .filter(|r| r.rule_type == "transformation" && r.rule_target.as_deref() == Some(target))
        {
            if !hit(&rule.locator) {
                continue;
            }
            let value = rule.value.clone().unwrap_or_default();
            name = match rule.action.as_str() {
                "rename" => value,
                "convert-lowercase" => name.to_lowercase(),
                "convert-uppercase" => name.to_uppercase(),
                "add-prefix" => format!("{value}{name}"),
                "add-suffix" => format!("{name}{value}"),
                _ => name,
            };
        }
        name
    }

    /// The table as written.
    pub fn output(&self, table: &SourceTable) -> OutputTable {
        let (s, t) = (&table.schema, &table.name);
        let schema = self.rename("schema", s.clone(), |l| like(&l.schema, s));
        let name = self.rename("table", t.clone(), |l| {
            like(&l.schema, s) && like(l.table.as_deref().unwrap_or("%"), t)
        });
        let qualified = format!("{s}.{t}");
        let columns = table
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| !self.removes(s, t, &c.name))
            .map(|(i, c)| {
                let col = &c.name;
                let mask = self
                    .masks
                    .iter()
                    .find(|(tp, cp, _)| like(tp, &qualified) && like(cp, col))
                    .map(|(_, _, m)| m.clone());
                OutputColumn {
                    source_index: i,
                    name: self.rename("column", col.clone(), |l| self.column_hit(l, s, t, col)),
                    sql_type: if mask.is_some() {
                        SqlType::Text
                    } else {
                        c.sql_type
                    },
                    key: c.key,
                    existing: c
                        .existing
                        .as_deref()
                        .map(|v| mask.as_ref().map_or_else(|| v.to_string(), |m| m.apply(v))),
                    not_null: c.not_null,
                    mask,
                }
            })
            .collect();
        OutputTable {
            schema,
            name,
            columns,
        }
    }

    fn column_hit(&self, l: &Locator, schema: &str, table: &str, column: &str) -> bool {
        like(&l.schema, schema)
            && like(l.table.as_deref().unwrap_or("%"), table)
            && like(l.column.as_deref().unwrap_or("%"), column)
    }

    fn removes(&self, schema: &str, table: &str, column: &str) -> bool {
        self.rules.iter().any(|r| {
            r.rule_type == "transformation"
                && r.action == "remove-column"
                && self.column_hit(&r.locator, schema, table, column)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SourceTable {
        let col = |name: &str, key| SourceColumn {
            name: name.into(),
            sql_type: SqlType::Text,
            key,
            existing: None,
            not_null: key,
        };
        SourceTable {
            schema: "public".into(),
            name: "customers".into(),
            columns: vec![col("id", true), col("email", false), col("ssn", false)],
        }
    }

    #[test]
    fn wildcards() {
        assert!(like("%", "anything"));
        assert!(like("cust%", "Customers"));
        assert!(like("%omer%", "customers"));
        assert!(like("a%b%c", "axxbyyc"));
        assert!(!like("a%b%c", "axxbyy"));
        assert!(!like("orders", "orders2"));
    }

    #[test]
    fn dms_rules_select_rename_and_remove() {
        let doc = r#"{"rules": [
          {"rule-type":"selection","rule-id":"1","rule-name":"1",
           "object-locator":{"schema-name":"public","table-name":"%"},"rule-action":"include"},
          {"rule-type":"selection","rule-id":"2","rule-name":"2",
           "object-locator":{"schema-name":"public","table-name":"audit%"},"rule-action":"exclude"},
          {"rule-type":"transformation","rule-id":"3","rule-name":"3","rule-target":"table",
           "object-locator":{"schema-name":"public","table-name":"customers"},"rule-action":"rename","value":"clients"},
          {"rule-type":"transformation","rule-id":"4","rule-name":"4","rule-target":"schema",
           "object-locator":{"schema-name":"public"},"rule-action":"convert-uppercase"},
          {"rule-type":"transformation","rule-id":"5","rule-name":"5","rule-target":"column",
           "object-locator":{"schema-name":"%","table-name":"%","column-name":"ssn"},"rule-action":"remove-column"},
          {"rule-type":"transformation","rule-id":"6","rule-name":"6","rule-target":"column",
           "object-locator":{"schema-name":"%","table-name":"customers","column-name":"email"},"rule-action":"add-prefix","value":"contact_"}
        ]}"#;
        let masks = [MaskFile {
            table: "public.cust%".into(),
            column: "email".into(),
            method: "redact".into(),
            value: None,
            salt_env: None,
        }];
        let m = Mapping::new(Some(doc), &masks).unwrap();
        assert!(m.selects("public", "customers"));
        assert!(!m.selects("public", "audit_log"));
        assert!(!m.selects("other", "customers"));
        let out = m.output(&table());
        assert_eq!(
            (out.schema.as_str(), out.name.as_str()),
            ("PUBLIC", "clients")
        );
        let names: Vec<_> = out.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "contact_email"]);
        assert_eq!(out.columns[1].mask, Some(Mask::Redact));
        assert_eq!(out.columns[1].source_index, 1);
    }

    #[test]
    fn unsupported_rules_are_refused() {
        let doc = r#"{"rules": [{"rule-type":"transformation","rule-id":"9","rule-target":"column",
           "object-locator":{"schema-name":"%","table-name":"%"},"rule-action":"add-column","value":"x"}]}"#;
        let err = Mapping::new(Some(doc), &[]).unwrap_err().to_string();
        assert!(err.contains("rule \"9\""), "{err}");
    }

    #[test]
    fn masks() {
        let hash = Mask::Hash { salt: "s".into() };
        assert_eq!(hash.apply("a@b.c"), hash.apply("a@b.c"));
        assert_ne!(hash.apply("a@b.c"), hash.apply("a@b.d"));
        assert_eq!(hash.apply("x").len(), 64);
        assert_eq!(Mask::Redact.apply("héllo"), "*****");
        assert_eq!(Mask::Replace("n/a".into()).apply("secret"), "n/a");
    }
}
