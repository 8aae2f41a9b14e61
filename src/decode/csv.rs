//! DMS CSV: RFC 4180 with DMS's NULL rule.
//!
//! arrow-csv cannot tell `""` (empty string) from an empty unquoted field
//! (NULL in DMS), so this is a small hand-written reader: one pass over the
//! object's bytes, fields borrowed from the buffer, quotes unescaped only
//! where a field holds `""`.

use arrow::array::{ArrayRef, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};

use super::columns::ColumnBuilder;
use super::{DecodeSpec, Op};
use crate::config::UTC;
use crate::error::{Error, Location, Result};

/// One field of a record: a byte range of the buffer.
#[derive(Debug, Clone, Copy)]
struct Field {
    start: usize,
    end: usize,
    quoted: bool,
    escaped_quotes: bool,
}

/// Reads records from a buffer, counting physical lines.
struct Records<'a> {
    data: &'a [u8],
    pos: usize,
    line: u64,
    delimiter: u8,
}

impl<'a> Records<'a> {
    fn new(data: &'a [u8], delimiter: u8) -> Self {
        Records {
            data,
            pos: 0,
            line: 1,
            delimiter,
        }
    }

    /// Reads the next record into `fields`; returns its first line, or
    /// `None` at the end. Errors carry the line and a message.
    fn next(&mut self, fields: &mut Vec<Field>) -> Result<Option<u64>, (u64, String)> {
        fields.clear();
        if self.pos >= self.data.len() {
            return Ok(None);
        }
        let first_line = self.line;
        let data = self.data;
        loop {
            let start = self.pos;
            if data.get(start) == Some(&b'"') {
                let quote_line = self.line;
                let mut i = start + 1;
                let mut escaped = false;
                loop {
                    match data.get(i) {
                        None => {
                            return Err((
                                quote_line,
                                format!(
                                    "quoted field {} opened on line {quote_line} is never closed",
                                    fields.len() + 1
                                ),
                            ));
                        }
                        Some(b'"') if data.get(i + 1) == Some(&b'"') => {
                            escaped = true;
                            i += 2;
                        }
                        Some(b'"') => break,
                        Some(b'\n') => {
                            self.line += 1;
                            i += 1;
                        }
                        Some(_) => i += 1,
                    }
                }
                fields.push(Field {
                    start: start + 1,
                    end: i,
                    quoted: true,
                    escaped_quotes: escaped,
                });
                self.pos = i + 1;
                match data.get(self.pos) {
                    Some(&b) if b == self.delimiter => self.pos += 1,
                    None => return Ok(Some(first_line)),
                    Some(b'\n') => {
                        self.pos += 1;
                        self.line += 1;
                        return Ok(Some(first_line));
                    }
                    Some(b'\r') if data.get(self.pos + 1) == Some(&b'\n') => {
                        self.pos += 2;
                        self.line += 1;
                        return Ok(Some(first_line));
                    }
                    Some(_) => {
                        return Err((
                            self.line,
                            format!(
                                "bad quoting in field {}: a closing quote must be followed by the delimiter or a line end (write a quote inside a field as \"\")",
                                fields.len()
                            ),
                        ));
                    }
                }
            } else {
                let rest = &data[start..];
                let len = rest
                    .iter()
                    .position(|&b| b == self.delimiter || b == b'\n' || b == b'"')
                    .unwrap_or(rest.len());
                let mut end = start + len;
                match data.get(end) {
                    Some(b'"') => {
                        return Err((
                            self.line,
                            format!(
                                "bad quoting in field {}: a quote inside an unquoted field (quote the whole field and double the quote)",
                                fields.len() + 1
                            ),
                        ));
                    }
                    Some(&b) if b == self.delimiter => {
                        fields.push(Field {
                            start,
                            end,
                            quoted: false,
                            escaped_quotes: false,
                        });
                        self.pos = end + 1;
                    }
                    terminator => {
                        self.pos = end + usize::from(terminator.is_some());
                        if terminator.is_some() {
                            self.line += 1;
                        }
                        if end > start && data[end - 1] == b'\r' {
                            end -= 1;
                        }
                        fields.push(Field {
                            start,
                            end,
                            quoted: false,
                            escaped_quotes: false,
                        });
                        return Ok(Some(first_line));
                    }
                }
            }
        }
    }
}

/// What each position of a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Op,
    Timestamp,
    Extra(usize),
    Data(usize),
}

/// Decodes a whole CSV object. `cdc` is true for CDC files (which carry `Op`).
pub(crate) fn decode(key: &str, data: &[u8], cdc: bool, spec: &DecodeSpec) -> Result<RecordBatch> {
    let text = std::str::from_utf8(data).map_err(|err| {
        let offset = err.valid_up_to();
        let line = data[..offset].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        Error::decode(
            key,
            Location { line: Some(line), ..Location::default() },
            format!("bytes at offset {offset} are not valid UTF-8; DMS writes UTF-8: re-export the object as UTF-8"),
        )
    })?;
    let csv = &spec.csv;
    let mut records = Records::new(text.as_bytes(), csv.delimiter);
    let mut fields = Vec::with_capacity(spec.columns.len() + 3);
    let at_line = |line: u64, row: Option<u64>, column: Option<String>| Location {
        line: Some(line),
        row,
        column,
    };

    let slots = if csv.header {
        match records
            .next(&mut fields)
            .map_err(|(l, m)| Error::decode(key, at_line(l, None, None), m))?
        {
            None => return Ok(RecordBatch::new_empty(spec.output_schema())),
            Some(line) => header_slots(key, line, text, &fields, spec)?,
        }
    } else {
        positional_slots(cdc || spec.include_op_for_full_load, spec)
    };

    let capacity = text.len() / (spec.columns.len() * 8 + 8) + 1;
    let mut ops = StringBuilder::with_capacity(capacity, capacity);
    let mut timestamps = TimestampMicrosecondBuilder::with_capacity(capacity);
    let mut extras: Vec<StringBuilder> = spec
        .extra_columns
        .iter()
        .map(|_| StringBuilder::new())
        .collect();
    let mut data_cols: Vec<ColumnBuilder> = spec
        .columns
        .iter()
        .map(|c| ColumnBuilder::new(c.sql_type, capacity))
        .collect();
    let has_op = slots.contains(&Slot::Op);
    let has_ts = slots.contains(&Slot::Timestamp);
    let mut unescaped = String::new();
    let mut row: u64 = 0;

    while let Some(line) = records
        .next(&mut fields)
        .map_err(|(l, m)| Error::decode(key, at_line(l, Some(row + 1), None), m))?
    {
        row += 1;
        if fields.len() != slots.len() {
            return Err(Error::decode(
                key,
                at_line(line, Some(row), None),
                format!(
                    "expected {} fields ({}), found {}",
                    slots.len(),
                    describe_slots(&slots, spec),
                    fields.len()
                ),
            ));
        }
        for (field, slot) in fields.iter().zip(&slots) {
            let raw = &text[field.start..field.end];
            let value = if field.escaped_quotes {
                unescaped.clear();
                unescaped.push_str(&raw.replace("\"\"", "\""));
                unescaped.as_str()
            } else {
                raw
            };
            let is_null = !field.quoted && value == csv.null_value;
            let column_name = |slot: &Slot| slot_name(*slot, spec);
            let fail = |expected: String| {
                Error::decode(
                    key,
                    at_line(line, Some(row), Some(column_name(slot))),
                    format!("expected {expected}, found {value:?}"),
                )
            };
            match *slot {
                Slot::Op => {
                    ops.append_value(Op::parse(value).map_err(|e| fail(e.to_string()))?.as_str())
                }
                Slot::Timestamp if is_null => timestamps.append_null(),
                Slot::Timestamp => timestamps.append_value(
                    super::text::parse_timestamp(value, true).map_err(|e| fail(e.to_string()))?,
                ),
                Slot::Extra(i) if is_null => extras[i].append_null(),
                Slot::Extra(i) => extras[i].append_value(value),
                Slot::Data(i) if is_null => data_cols[i].append_null(),
                Slot::Data(i) => data_cols[i].append_text(value).map_err(fail)?,
            }
        }
        if !has_op {
            ops.append_value(Op::Insert.as_str());
        }
        if !has_ts {
            timestamps.append_null();
        }
    }

    let mut arrays: Vec<ArrayRef> = vec![
        std::sync::Arc::new(ops.finish()),
        std::sync::Arc::new(timestamps.finish().with_timezone(UTC)),
    ];
    arrays.extend(
        extras
            .into_iter()
            .map(|mut b| std::sync::Arc::new(b.finish()) as ArrayRef),
    );
    arrays.extend(data_cols.into_iter().map(ColumnBuilder::finish));
    Ok(RecordBatch::try_new(spec.output_schema(), arrays)
        .expect("builders match the output schema"))
}

fn positional_slots(has_op: bool, spec: &DecodeSpec) -> Vec<Slot> {
    let mut slots = Vec::new();
    if has_op {
        slots.push(Slot::Op);
    }
    if spec.timestamp_column.is_some() {
        slots.push(Slot::Timestamp);
    }
    slots.extend((0..spec.extra_columns.len()).map(Slot::Extra));
    slots.extend((0..spec.columns.len()).map(Slot::Data));
    slots
}

fn header_slots(
    key: &str,
    line: u64,
    text: &str,
    fields: &[Field],
    spec: &DecodeSpec,
) -> Result<Vec<Slot>> {
    let mut slots = Vec::with_capacity(fields.len());
    for (i, field) in fields.iter().enumerate() {
        let name = &text[field.start..field.end];
        let slot = if name.eq_ignore_ascii_case("op") {
            Some(Slot::Op)
        } else if spec
            .timestamp_column
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case(name))
        {
            Some(Slot::Timestamp)
        } else if let Some(x) = spec
            .extra_columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
        {
            Some(Slot::Extra(x))
        } else {
            spec.columns
                .iter()
                .position(|c| c.name.eq_ignore_ascii_case(name))
                .map(Slot::Data)
        };
        let header_error = |message: String| {
            let column = Some(name.to_string());
            Error::decode(
                key,
                Location {
                    line: Some(line),
                    row: None,
                    column,
                },
                message,
            )
        };
        match slot {
            Some(slot) if !slots.contains(&slot) => slots.push(slot),
            Some(_) => {
                return Err(header_error(format!(
                    "header names column {name:?} twice (field {})",
                    i + 1
                )));
            }
            None => {
                return Err(header_error(format!(
                    "header names column {name:?}, which the pipeline does not declare; add it to the table's `columns`"
                )));
            }
        }
    }
    let missing: Vec<&str> = spec
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| !slots.contains(&Slot::Data(*i)))
        .map(|(_, c)| c.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(Error::decode(
            key,
            Location {
                line: Some(line),
                ..Location::default()
            },
            format!("header lacks declared columns {missing:?}"),
        ));
    }
    Ok(slots)
}

fn slot_name(slot: Slot, spec: &DecodeSpec) -> String {
    match slot {
        Slot::Op => "Op".to_string(),
        Slot::Timestamp => spec.timestamp_column.clone().unwrap_or_default(),
        Slot::Extra(i) => spec.extra_columns[i].clone(),
        Slot::Data(i) => spec.columns[i].name.clone(),
    }
}

fn describe_slots(slots: &[Slot], spec: &DecodeSpec) -> String {
    let names: Vec<String> = slots.iter().map(|s| slot_name(*s, spec)).collect();
    if names.len() <= 6 {
        names.join(", ")
    } else {
        format!(
            "{}, …, {}",
            names[..3].join(", "),
            names[names.len() - 2..].join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (text, quoted) per field, per record.
    type Parsed = Vec<Vec<(String, bool)>>;

    fn records(text: &str) -> Result<Parsed, (u64, String)> {
        let mut r = Records::new(text.as_bytes(), b',');
        let mut out = Vec::new();
        let mut fields = Vec::new();
        while r.next(&mut fields)?.is_some() {
            out.push(
                fields
                    .iter()
                    .map(|f| (text[f.start..f.end].replace("\"\"", "\""), f.quoted))
                    .collect(),
            );
        }
        Ok(out)
    }

    #[test]
    fn rfc4180_fields() {
        let r = records("a,\"b,c\",\"say \"\"hi\"\"\"\r\n,\"\",\"line\nbreak\"\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0][1], ("b,c".into(), true));
        assert_eq!(r[0][2], ("say \"hi\"".into(), true));
        assert_eq!(r[1][0], ("".into(), false));
        assert_eq!(r[1][1], ("".into(), true));
        assert_eq!(r[1][2], ("line\nbreak".into(), true));
    }

    #[test]
    fn trailing_spaces_are_data_and_last_line_may_lack_newline() {
        let r = records("Carine ,x\ny,z").unwrap();
        assert_eq!(r[0][0].0, "Carine ");
        assert_eq!(r[1][1].0, "z");
    }

    #[test]
    fn bad_quoting_names_the_line() {
        assert_eq!(records("a,b\n\"open,c\n").unwrap_err().0, 2);
        assert!(
            records("a,\"x\"y\n")
                .unwrap_err()
                .1
                .contains("closing quote")
        );
        assert!(records("a,x\"y\n").unwrap_err().1.contains("unquoted"));
    }
}
