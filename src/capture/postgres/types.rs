//! Column types, table shapes and the rows a change becomes.

use std::collections::HashMap;

use super::pgoutput::Relation;
use crate::capture::mapping::{SourceColumn, SourceTable};
use crate::capture::source::Value;
use crate::config::SqlType;
use crate::decode::Op;
use crate::error::{Error, Result};

/// The SQL type a column of `oid` (with its type modifier) is written as.
/// Types without an exact Arrow counterpart (numeric without precision,
/// arrays, intervals, ranges, enums…) are written as their text form.
pub(crate) fn sql_type(oid: u32, typmod: i32) -> SqlType {
    match oid {
        16 => SqlType::Boolean,
        17 => SqlType::Bytes,
        20 => SqlType::BigInt,
        21 => SqlType::SmallInt,
        23 => SqlType::Integer,
        26 => SqlType::BigInt,
        700 => SqlType::Real,
        701 => SqlType::Double,
        114 | 3802 => SqlType::Json,
        1082 => SqlType::Date,
        1114 => SqlType::Timestamp,
        1184 => SqlType::TimestampTz,
        2950 => SqlType::Uuid,
        1700 if typmod >= 4 => {
            let precision = ((typmod - 4) >> 16) & 0xffff;
            let scale = (typmod - 4) & 0xffff;
            if (1..=38).contains(&precision) && scale <= precision {
                SqlType::Decimal {
                    precision: precision as u8,
                    scale: scale as i8,
                }
            } else {
                SqlType::Text
            }
        }
        _ => SqlType::Text,
    }
}

/// The same table with the same columns and types (key flags aside: they
/// come from the catalog).
pub(super) fn same_shape(a: &Relation, b: &Relation) -> bool {
    (&a.schema, &a.name, a.replica_identity) == (&b.schema, &b.name, b.replica_identity)
        && a.columns.len() == b.columns.len()
        && a.columns.iter().zip(&b.columns).all(|(x, y)| {
            (&x.name, x.type_oid, x.type_modifier) == (&y.name, y.type_oid, y.type_modifier)
        })
}

/// The table of `rel`, with what the catalog says of its columns beside
/// the Relation message: `facts` (see [`PgSource::column_facts`]).
pub(super) fn source_table(
    rel: &Relation,
    facts: &HashMap<String, (Option<String>, bool)>,
) -> SourceTable {
    SourceTable {
        schema: rel.schema.clone(),
        name: rel.name.clone(),
        columns: rel
            .columns
            .iter()
            .map(|c| {
                let (existing, not_null) = facts.get(&c.name).cloned().unwrap_or_default();
                SourceColumn {
                    name: c.name.clone(),
                    sql_type: sql_type(c.type_oid, c.type_modifier),
                    key: c.key,
                    existing,
                    not_null,
                }
            })
            .collect(),
    }
}

/// An error unless `values` has one value per column of `relation` (the
/// server sends them so; anything else is a malformed message, which must
/// not be indexed past its end).
pub(super) fn check_width(relation: &Relation, values: &[Value<'_>], at: &str) -> Result<()> {
    if values.len() == relation.columns.len() {
        return Ok(());
    }
    Err(Error::capture(
        at,
        format!(
            "a row of {} values for a table of {} columns ({}): the Relation message and the \
             change disagree; recreate the slot with a full load if this repeats",
            values.len(),
            relation.columns.len(),
            relation
                .columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// The rows an UPDATE becomes: one update, or a delete of the old key and
/// an insert of the new one when the key changed; unchanged TOAST values
/// are taken from the old row (REPLICA IDENTITY FULL), never written as NULL.
pub(super) fn update_rows<'a>(
    relation: &Relation,
    at: &str,
    old: Option<Vec<Value<'a>>>,
    mut new: Vec<Value<'a>>,
) -> Result<Vec<(Op, Vec<Value<'a>>)>> {
    check_width(relation, &new, at)?;
    if let Some(old) = &old {
        check_width(relation, old, at)?;
    }
    let key_changed = match (&old, relation.replica_identity) {
        (None, _) => false,
        (Some(_), b'd' | b'i') => true,
        (Some(old), _) => relation
            .columns
            .iter()
            .enumerate()
            .any(|(i, c)| c.key && old[i] != new[i]),
    };
    for (i, v) in new.iter_mut().enumerate() {
        if *v == Value::Unchanged {
            match old.as_ref().map(|o| o[i]) {
                Some(Value::Text(t)) => *v = Value::Text(t),
                Some(Value::Null) => *v = Value::Null,
                _ => {
                    let id = format!("{}.{}", relation.schema, relation.name);
                    return Err(Error::capture(
                        at,
                        format!(
                            "the server did not send the unchanged TOAST value of column {:?} \
                             (REPLICA IDENTITY DEFAULT) and cdcflow never writes it as NULL; \
                             run `ALTER TABLE {id} REPLICA IDENTITY FULL` so later changes \
                             carry it, and recreate the slot with a full load",
                            relation.columns[i].name
                        ),
                    ));
                }
            }
        }
    }
    Ok(match old {
        Some(old) if key_changed => vec![(Op::Delete, old), (Op::Insert, new)],
        _ => vec![(Op::Update, new)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::postgres::pgoutput;

    #[test]
    fn types() {
        assert_eq!(
            sql_type(1700, ((12 << 16) | 2) + 4),
            SqlType::Decimal {
                precision: 12,
                scale: 2
            }
        );
        assert_eq!(sql_type(1700, -1), SqlType::Text);
        assert_eq!(sql_type(1184, -1), SqlType::TimestampTz);
        assert_eq!(sql_type(1007, -1), SqlType::Text); // int4[]
    }

    fn relation(columns: &[(&str, bool)], identity: u8) -> Relation {
        Relation {
            id: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: identity,
            columns: columns
                .iter()
                .map(|(name, key)| pgoutput::RelationColumn {
                    key: *key,
                    name: name.to_string(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn rows_of_the_wrong_width_are_errors_not_panics() {
        let rel = relation(&[("id", true), ("a", false), ("b", false)], b'f');
        let (one, two) = (Value::Text("1"), Value::Text("2"));
        // Fewer values than columns, in the new row, the old row, or both.
        for (old, new) in [
            (None, vec![one]),
            (Some(vec![one]), vec![one, two, two]),
            (Some(vec![one, two, two]), vec![one, Value::Unchanged]),
            (Some(vec![one, two]), vec![two, two]),
        ] {
            let err = update_rows(&rel, "public.t, change at LSN 0/1", old, new).unwrap_err();
            assert!(err.to_string().contains("a row of"), "{err}");
        }
        let ok = update_rows(
            &rel,
            "x",
            Some(vec![one, two, two]),
            vec![two, two, Value::Unchanged],
        );
        assert_eq!(
            ok.unwrap(),
            vec![
                (Op::Delete, vec![one, two, two]),
                (Op::Insert, vec![two, two, two])
            ]
        );
        assert!(check_width(&rel, &[one, two], "x").is_err());
        assert!(check_width(&rel, &[one, two, Value::Null], "x").is_ok());
    }
}
