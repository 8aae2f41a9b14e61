//! The full load's rows: `COPY … TO STDOUT (FORMAT binary)`, decoded in
//! place into [`Value`]s.
//!
//! Columns of the types read here are sent in their binary form (integers,
//! doubles, booleans, strings, bytea, dates, timestamps) and become typed
//! values without a text round trip; every other column is selected as
//! `::text`, whose binary form is its text. Strings are borrowed from the
//! COPY data, so a row costs no allocation.
//!
//! The format (PostgreSQL's `COPY` documentation, "Binary Format"): a
//! header (`PGCOPY\n\377\r\n\0`, flags, an extension), then per row a
//! 16-bit field count and per field a 32-bit length (-1: NULL) and its
//! bytes, all big-endian; a field count of -1 ends the data.

use super::connect::quote;
use crate::capture::mapping::SourceTable;
use crate::capture::source::Value;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds and days from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const EPOCH_MICROS: i64 = 946_684_800_000_000;
const EPOCH_DAYS: i32 = 10_957;

/// How a column's binary values are read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Binary {
    Bool,
    Int,
    Double,
    Text,
    Bytes,
    Date,
    Timestamp { utc: bool },
}

impl Binary {
    /// How a column of type `oid` is read, `None` when it is selected as text.
    fn of(oid: u32) -> Option<Binary> {
        Some(match oid {
            16 => Binary::Bool,
            20 | 21 | 23 => Binary::Int,
            701 => Binary::Double,
            17 => Binary::Bytes,
            19 | 25 | 114 | 1042 | 1043 => Binary::Text,
            1082 => Binary::Date,
            1114 => Binary::Timestamp { utc: false },
            1184 => Binary::Timestamp { utc: true },
            _ => return None,
        })
    }
}

/// The COPY statement for `table` (columns of type `oids`, `filter` a
/// `WHERE` clause or empty) and how each of its columns is read.
pub(super) fn statement(table: &SourceTable, oids: &[u32], filter: &str) -> (String, Vec<Binary>) {
    let mut kinds = Vec::with_capacity(oids.len());
    let columns: Vec<String> = table
        .columns
        .iter()
        .zip(oids)
        .map(|(column, oid)| match Binary::of(*oid) {
            Some(kind) => {
                kinds.push(kind);
                quote(&column.name)
            }
            None => {
                kinds.push(Binary::Text);
                format!("{}::text", quote(&column.name))
            }
        })
        .collect();
    let sql = format!(
        "COPY (SELECT {} FROM {}.{}{filter}) TO STDOUT (FORMAT binary)",
        columns.join(", "),
        quote(&table.schema),
        quote(&table.name)
    );
    (sql, kinds)
}

/// Reads COPY data, row by row, as it arrives in chunks.
pub(super) struct Parser {
    kinds: Vec<Binary>,
    header: bool,
    ended: bool,
}

impl Parser {
    pub(super) fn new(kinds: Vec<Binary>) -> Parser {
        Parser {
            kinds,
            header: false,
            ended: false,
        }
    }

    /// Whether the data ended with its trailer, `left` bytes after the last
    /// row read (none expected).
    pub(super) fn finish(&self, left: usize) -> Result<(), String> {
        if self.ended && left == 0 {
            Ok(())
        } else {
            Err(format!(
                "the COPY data ended {left} bytes into a row, or without its trailer"
            ))
        }
    }

    /// Reads the header or one row from `data` into `values` (left empty
    /// for the header and the trailer); the bytes used, `None` when `data`
    /// does not hold them whole.
    pub(super) fn next<'a>(
        &mut self,
        data: &'a [u8],
        values: &mut Vec<Value<'a>>,
    ) -> Result<Option<usize>, String> {
        values.clear();
        if !self.header {
            let Some(fixed) = data.get(..SIGNATURE.len() + 8) else {
                return Ok(None);
            };
            if &fixed[..SIGNATURE.len()] != SIGNATURE {
                return Err("the COPY data does not start with the binary signature".into());
            }
            let extension = be_u32(&fixed[SIGNATURE.len() + 4..]) as usize;
            let used = fixed.len() + extension;
            if data.len() < used {
                return Ok(None);
            }
            self.header = true;
            return Ok(Some(used));
        }
        let Some(count) = data.get(..2) else {
            return Ok(None);
        };
        if self.ended {
            return Err("data after the COPY trailer".into());
        }
        let count = i16::from_be_bytes([count[0], count[1]]);
        if count == -1 {
            self.ended = true;
            return Ok(Some(2));
        }
        if count as usize != self.kinds.len() {
            return Err(format!(
                "a row of {count} fields, {} columns expected",
                self.kinds.len()
            ));
        }
        let mut at = 2;
        for (i, kind) in self.kinds.iter().enumerate() {
            let Some(len) = data.get(at..at + 4) else {
                return Ok(None);
            };
            let len = i32::from_be_bytes(len.try_into().expect("4 bytes"));
            at += 4;
            if len < 0 {
                values.push(Value::Null);
                continue;
            }
            let Some(field) = data.get(at..at + len as usize) else {
                return Ok(None);
            };
            at += len as usize;
            values.push(value(*kind, field).map_err(|e| format!("column {}: {e}", i + 1))?);
        }
        Ok(Some(at))
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// One field's value.
fn value(kind: Binary, field: &[u8]) -> Result<Value<'_>, String> {
    let int = |field: &[u8]| -> Result<i64, String> {
        Ok(match field.len() {
            2 => i64::from(i16::from_be_bytes([field[0], field[1]])),
            4 => i64::from(i32::from_be_bytes(field.try_into().expect("4 bytes"))),
            8 => i64::from_be_bytes(field.try_into().expect("8 bytes")),
            n => return Err(format!("an integer of {n} bytes")),
        })
    };
    Ok(match kind {
        Binary::Bool => match field {
            [1] => Value::Text("t"),
            [0] => Value::Text("f"),
            _ => return Err(format!("a boolean of {} bytes", field.len())),
        },
        Binary::Int => Value::Int(int(field)?),
        Binary::Double => Value::Double(f64::from_be_bytes(
            field
                .try_into()
                .map_err(|_| format!("a double of {} bytes", field.len()))?,
        )),
        Binary::Text => Value::Text(
            std::str::from_utf8(field).map_err(|e| format!("text that is not UTF-8: {e}"))?,
        ),
        Binary::Bytes => Value::Bytes(field),
        Binary::Date => match i32::try_from(int(field)?).map_err(|_| "a date of 8 bytes")? {
            i32::MAX => Value::Text("infinity"),
            i32::MIN => Value::Text("-infinity"),
            days => Value::Date(days.checked_add(EPOCH_DAYS).ok_or("a date out of range")?),
        },
        Binary::Timestamp { utc } => match int(field)? {
            i64::MAX => Value::Text("infinity"),
            i64::MIN => Value::Text("-infinity"),
            micros => Value::Timestamp(
                micros
                    .checked_add(EPOCH_MICROS)
                    .ok_or("a timestamp out of range")?,
                utc,
            ),
        },
    })
}
