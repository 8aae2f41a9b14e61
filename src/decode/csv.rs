//! DMS CSV: RFC 4180 with DMS's NULL rule.
//!
//! arrow-csv cannot tell `""` (empty string) from an empty unquoted field
//! (NULL in DMS), so this is a small hand-written reader: one pass over the
//! object's bytes, fields borrowed from the buffer, quotes unescaped only
//! where a field holds `""`.

use arrow::array::{ArrayRef, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};

use super::columns::ColumnBuilder;
use super::{DecodeSpec, Op, Piece};
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

/// What [`RecordReader::next`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// A record starting on this line.
    Record(u64),
    /// The end of the data.
    End,
    /// The buffer ends inside a record and more data follows.
    Incomplete,
}

/// Reads records from a buffer, counting physical lines.
#[derive(Clone)]
struct RecordReader<'a> {
    data: &'a [u8],
    pos: usize,
    line: u64,
    delimiter: u8,
    /// The buffer holds the rest of the object: a record may end at its end.
    last: bool,
}

impl<'a> RecordReader<'a> {
    fn new(data: &'a [u8], delimiter: u8, line: u64, last: bool) -> Self {
        RecordReader {
            data,
            pos: 0,
            line,
            delimiter,
            last,
        }
    }

    /// Reads the next record into `fields`. At a buffer end inside a record
    /// that is not the object's end, rewinds to the record's start and
    /// answers [`Next::Incomplete`]. Errors carry the line and a message.
    fn next(&mut self, fields: &mut Vec<Field>) -> Result<Next, (u64, String)> {
        let (start_pos, start_line) = (self.pos, self.line);
        match self.read(fields) {
            Ok(Some(next)) => Ok(next),
            Ok(None) => {
                (self.pos, self.line) = (start_pos, start_line);
                fields.clear();
                Ok(Next::Incomplete)
            }
            Err(err) => Err(err),
        }
    }

    /// `Ok(None)`: the buffer ended inside the record and more data follows.
    fn read(&mut self, fields: &mut Vec<Field>) -> Result<Option<Next>, (u64, String)> {
        fields.clear();
        if self.pos >= self.data.len() {
            return Ok(Some(if self.last {
                Next::End
            } else {
                Next::Incomplete
            }));
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
                        None if !self.last => return Ok(None),
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
                        Some(b'"') if i + 1 == data.len() && !self.last => return Ok(None),
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
                    None if !self.last => return Ok(None),
                    None => return Ok(Some(Next::Record(first_line))),
                    Some(b'\n') => {
                        self.pos += 1;
                        self.line += 1;
                        return Ok(Some(Next::Record(first_line)));
                    }
                    Some(b'\r') if data.get(self.pos + 1) == Some(&b'\n') => {
                        self.pos += 2;
                        self.line += 1;
                        return Ok(Some(Next::Record(first_line)));
                    }
                    Some(b'\r') if self.pos + 1 == data.len() && !self.last => return Ok(None),
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
                    None if !self.last => return Ok(None),
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
                        return Ok(Some(Next::Record(first_line)));
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

/// Bytes read from the object before decoding what they hold.
pub(crate) const CHUNK_BYTES: usize = 8 << 20;

/// Decodes a CSV object from `reader` chunk by chunk, handing each chunk's
/// rows to `emit`: memory holds one chunk, whatever the object's size.
/// `cdc` is true for CDC files (which carry `Op`).
pub(crate) fn decode_reader(
    key: &str,
    reader: &mut dyn std::io::Read,
    cdc: bool,
    spec: &DecodeSpec,
    chunk_bytes: usize,
    emit: &mut dyn FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    let mut decoder = CsvDecoder::new(key, spec, cdc);
    read_chunks(key, reader, chunk_bytes, &mut |data, last| {
        let (batch, consumed) = decoder.chunk(data, last)?;
        if batch.num_rows() > 0 {
            emit(batch)?;
        }
        Ok(consumed)
    })
}

/// Whole records of a CSV object, with where they start in it and how the
/// object's first records settled its columns.
pub(crate) struct Records {
    key: String,
    spec: std::sync::Arc<DecodeSpec>,
    cdc: bool,
    slots: Vec<Slot>,
    data: Vec<u8>,
    line: u64,
    /// The object's row (0-based) the records start at.
    pub(crate) row: u64,
}

impl Records {
    /// The records' rows: the same as [`decode_reader`] gives for them, and
    /// errors that name the object's line and row.
    pub(crate) fn decode(self) -> Result<RecordBatch> {
        let mut decoder = CsvDecoder {
            key: &self.key,
            spec: &self.spec,
            cdc: self.cdc,
            slots: Some(self.slots),
            line: self.line,
            row: self.row,
        };
        Ok(decoder.chunk(&self.data, true)?.0)
    }
}

/// Cuts a CSV object from `reader` into pieces of whole records of about
/// `chunk_bytes`, for decoding on several threads: the first records (which
/// settle the header and whether full-load rows carry `Op`) are decoded
/// here, the rest handed on as [`Records`] numbered by line and row. Finding
/// where records end reads them as [`decode_reader`] does, so the pieces
/// hold exactly its rows, and malformed quoting is an error here.
pub(crate) fn split_reader(
    key: &str,
    reader: &mut dyn std::io::Read,
    cdc: bool,
    spec: &std::sync::Arc<DecodeSpec>,
    chunk_bytes: usize,
    emit: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<()> {
    let mut decoder = CsvDecoder::new(key, spec, cdc);
    read_chunks(key, reader, chunk_bytes, &mut |data, last| {
        let first_row = decoder.row;
        let Some(slots) = decoder.slots.clone() else {
            let (batch, consumed) = decoder.chunk(data, last)?;
            if batch.num_rows() > 0 {
                emit(Piece::Rows { batch, first_row })?;
            }
            return Ok(consumed);
        };
        let (line, mut fields) = (decoder.line, Vec::new());
        let mut records = RecordReader::new(data, spec.csv.delimiter, line, last);
        let (mut rows, mut whole, mut ended) = (0, 0, Ok(()));
        loop {
            match records.next(&mut fields) {
                Ok(Next::Record(_)) => (rows, whole) = (rows + 1, records.pos),
                Ok(Next::End | Next::Incomplete) => break,
                Err((l, m)) => {
                    let at = Location {
                        line: Some(l),
                        row: Some(first_row + rows + 1),
                        column: None,
                    };
                    // The records before it are handed on first: an error
                    // in them comes first in the object.
                    ended = Err(Error::decode(key, at, m));
                    break;
                }
            }
        }
        if rows > 0 {
            emit(Piece::Records(Records {
                key: key.to_string(),
                spec: spec.clone(),
                cdc,
                slots,
                data: data[..whole].to_vec(),
                line,
                row: first_row,
            }))?;
        }
        ended?;
        (decoder.line, decoder.row) = (records.line, first_row + rows);
        Ok(whole)
    })
}

/// Reads `reader` into a buffer of about `chunk_bytes` and hands it to
/// `step` (with whether it holds the rest of the object), which answers how
/// many bytes it took: whole records. The rest is kept for the next step; a
/// record longer than a chunk makes the next read longer.
fn read_chunks(
    key: &str,
    reader: &mut dyn std::io::Read,
    chunk_bytes: usize,
    step: &mut dyn FnMut(&[u8], bool) -> Result<usize>,
) -> Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(chunk_bytes * 2);
    let mut want = chunk_bytes;
    loop {
        let mut eof = false;
        let mut filled = buf.len();
        while filled < want {
            // Grow as data comes: a small object never pays for a whole chunk.
            if filled == buf.len() {
                buf.resize((filled * 2).max(64 << 10).min(want), 0);
            }
            let n = reader
                .read(&mut buf[filled..])
                .map_err(|e| Error::io("reading the object", key, e))?;
            if n == 0 {
                eof = true;
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        let consumed = step(&buf, eof)?;
        if eof {
            return Ok(());
        }
        buf.drain(..consumed);
        // A record longer than a chunk: read more before trying again.
        want = if consumed == 0 {
            buf.len() * 2
        } else {
            chunk_bytes
        };
    }
}

/// Decoding state carried from one chunk to the next.
struct CsvDecoder<'a> {
    key: &'a str,
    spec: &'a DecodeSpec,
    cdc: bool,
    slots: Option<Vec<Slot>>,
    /// Physical line the next chunk starts on.
    line: u64,
    /// Data rows decoded so far.
    row: u64,
}

impl<'a> CsvDecoder<'a> {
    fn new(key: &'a str, spec: &'a DecodeSpec, cdc: bool) -> Self {
        CsvDecoder {
            key,
            spec,
            cdc,
            slots: None,
            line: 1,
            row: 0,
        }
    }

    /// Decodes the complete records at the start of `data` (all of it when
    /// `last`); returns their rows and how many bytes they took.
    fn chunk(&mut self, data: &[u8], last: bool) -> Result<(RecordBatch, usize)> {
        let (key, spec) = (self.key, self.spec);
        let text = match std::str::from_utf8(data) {
            Ok(text) => text,
            // A character cut by the chunk's end: decode up to it.
            Err(err) if err.error_len().is_none() && !last => {
                std::str::from_utf8(&data[..err.valid_up_to()]).expect("valid prefix")
            }
            Err(err) => {
                let offset = err.valid_up_to();
                let line =
                    self.line + data[..offset].iter().filter(|&&b| b == b'\n').count() as u64;
                return Err(Error::decode(
                    key,
                    Location {
                        line: Some(line),
                        ..Location::default()
                    },
                    format!(
                        "bytes at offset {offset} are not valid UTF-8; DMS writes UTF-8: re-export the object as UTF-8"
                    ),
                ));
            }
        };
        let last = last && text.len() == data.len();
        let csv = &spec.csv;
        let mut records = RecordReader::new(text.as_bytes(), csv.delimiter, self.line, last);
        let mut fields = Vec::with_capacity(spec.columns.len() + 3);
        let at_line = |line: u64, row: Option<u64>, column: Option<String>| Location {
            line: Some(line),
            row,
            column,
        };
        let empty = || (RecordBatch::new_empty(spec.output_schema()), 0);

        if self.slots.is_none() {
            self.slots = Some(if csv.header {
                match records
                    .next(&mut fields)
                    .map_err(|(l, m)| Error::decode(key, at_line(l, None, None), m))?
                {
                    Next::End | Next::Incomplete => return Ok(empty()),
                    Next::Record(line) => header_slots(key, line, text, &fields, spec)?,
                }
            } else {
                // DMS sets includeOpForFullLoad per task, so one bucket can hold
                // full-load files with and without `Op`: each file says by its
                // first record (one field more than declared, and that field an op).
                let declared = self.cdc || spec.include_op_for_full_load;
                let mut peek = records.clone();
                let has_op = match peek.next(&mut fields) {
                    Ok(Next::Record(_)) if !self.cdc => {
                        let first = fields.first().map(|f| &text[f.start..f.end]);
                        let without = positional_slots(false, spec).len();
                        match fields.len() {
                            n if n == without + 1 => first.is_some_and(|v| Op::parse(v).is_ok()),
                            n if n == without => false,
                            _ => declared,
                        }
                    }
                    // Not a whole record yet: decide once one is.
                    Ok(Next::Incomplete) if !last => return Ok(empty()),
                    _ => declared,
                };
                positional_slots(has_op, spec)
            });
        }
        let slots = self.slots.as_ref().expect("set above");

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
        let mut row = self.row;
        let mut consumed = records.pos;

        loop {
            let line = match records
                .next(&mut fields)
                .map_err(|(l, m)| Error::decode(key, at_line(l, Some(row + 1), None), m))?
            {
                Next::Record(line) => line,
                Next::End | Next::Incomplete => break,
            };
            row += 1;
            if fields.len() != slots.len() {
                return Err(Error::decode(
                    key,
                    at_line(line, Some(row), None),
                    format!(
                        "expected {} fields ({}), found {}{}",
                        slots.len(),
                        describe_slots(slots, spec),
                        fields.len(),
                        if self.cdc || csv.header {
                            ""
                        } else {
                            "; a full-load file may or may not start with `Op` \
                             (DMS includeOpForFullLoad, `source.include_op_for_full_load`): \
                             neither form fits this row"
                        }
                    ),
                ));
            }
            for (field, slot) in fields.iter().zip(slots) {
                let raw = &text[field.start..field.end];
                let value = if field.escaped_quotes {
                    unescaped.clear();
                    unescaped.push_str(&raw.replace("\"\"", "\""));
                    unescaped.as_str()
                } else {
                    raw
                };
                let is_null = !field.quoted && value == csv.null_value;
                let fail = |expected: String| {
                    Error::decode(
                        key,
                        at_line(line, Some(row), Some(slot_name(*slot, spec))),
                        format!("expected {expected}, found {value:?}"),
                    )
                };
                match *slot {
                    Slot::Op => ops
                        .append_value(Op::parse(value).map_err(|e| fail(e.to_string()))?.as_str()),
                    Slot::Timestamp if is_null => timestamps.append_null(),
                    Slot::Timestamp => timestamps.append_value(
                        super::text::parse_timestamp(value, true)
                            .map_err(|e| fail(e.to_string()))?,
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
            consumed = records.pos;
        }
        self.row = row;
        self.line = records.line;

        let mut arrays: Vec<ArrayRef> = vec![
            std::sync::Arc::new(ops.finish()),
            std::sync::Arc::new(timestamps.finish().with_timezone(UTC)),
        ];
        arrays.extend(
            extras
                .into_iter()
                .map(|mut b| std::sync::Arc::new(b.finish()) as ArrayRef),
        );
        arrays.extend(data_cols.iter_mut().map(ColumnBuilder::finish));
        let batch = RecordBatch::try_new(spec.output_schema(), arrays)
            .expect("builders match the output schema");
        Ok((batch, consumed))
    }
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
        let mut r = RecordReader::new(text.as_bytes(), b',', 1, true);
        let mut out = Vec::new();
        let mut fields = Vec::new();
        while let Next::Record(_) = r.next(&mut fields)? {
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
