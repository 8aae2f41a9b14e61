//! The rows of a binlog rows event, decoded straight into [`Value`]s.
//!
//! A row image is read in place from the event's bytes: integers, doubles,
//! decimals, dates and timestamps become typed values that go into the
//! object's columns without a text form; strings are copied once into the
//! image. Nothing is allocated per row once an image has grown to its
//! table's size. The types met less often (FLOAT, TIME, YEAR, BIT, ENUM,
//! SET, MySQL's binary JSON, DATETIME, the pre-5.6 temporal formats) are
//! read by mysql_common one value at a time and given in their text form.
//!
//! The format (MySQL's `log_event.cc`, `Rows_log_event`): each row is a
//! before image (UPDATE, DELETE), an after image (WRITE, UPDATE), or both.
//! An image is a NULL bitmap over the columns present in it (the event's
//! column bitmap), then the values of the present columns that are not
//! NULL, each in its column type's binary form, read with the type's
//! metadata from the table map event.

use mysql_async::Value as MyValue;
use mysql_async::binlog::events::{RowsEventData, TableMapEvent};
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_common::io::ParseBuf;

use super::types::{MyColumn, binlog_text};
use crate::capture::source::{Value, emptied};
use crate::config::SqlType;

/// Bytes of a group of 1 to 9 decimal digits in MySQL's binary decimal.
const DIGIT_BYTES: [usize; 10] = [0, 1, 1, 2, 2, 3, 3, 4, 4, 4];

/// One column as the table map describes it.
struct Column<'a> {
    kind: ColumnType,
    meta: &'a [u8],
}

/// Where reading is in an event's rows.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

/// The rows of one rows event, read one at a time.
pub(super) struct Rows<'a> {
    at: Cursor<'a>,
    columns: Vec<Column<'a>>,
    /// Columns present in the before and after images, where there are such images.
    before: Option<Vec<bool>>,
    after: Option<Vec<bool>>,
    /// A MySQL partial update event: its after images start with value options.
    partial: bool,
    json_columns: usize,
}

/// A value of an image: plain, or text or bytes copied into the image.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Plain(Value<'static>),
    Text(usize, usize),
    Bytes(usize, usize),
}

/// One row image, decoded. Reused from row to row.
#[derive(Debug, Default)]
pub(super) struct Image {
    slots: Vec<Slot>,
    text: String,
    bytes: Vec<u8>,
}

impl Image {
    /// The value of column `i` (NULL when the image does not hold it).
    pub(super) fn value(&self, i: usize) -> Value<'_> {
        match self.slots.get(i) {
            None => Value::Null,
            Some(Slot::Plain(v)) => *v,
            Some(Slot::Text(from, to)) => Value::Text(&self.text[*from..*to]),
            Some(Slot::Bytes(from, to)) => Value::Bytes(&self.bytes[*from..*to]),
        }
    }

    /// Every value, in the table's column order, in the room of `out`.
    pub(super) fn values<'a>(&'a self, out: Vec<Value<'_>>) -> Vec<Value<'a>> {
        let mut out = emptied(out);
        out.extend((0..self.slots.len()).map(|i| self.value(i)));
        out
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.text.clear();
        self.bytes.clear();
    }

    fn push_text(&mut self, text: &str) {
        let from = self.text.len();
        self.text.push_str(text);
        self.slots.push(Slot::Text(from, self.text.len()));
    }
}

impl<'a> Rows<'a> {
    /// The rows of `event`, whose table map is `map`.
    pub(super) fn new(
        event: &'a RowsEventData<'a>,
        map: &'a TableMapEvent<'a>,
    ) -> Result<Rows<'a>, String> {
        let count = map.columns_count() as usize;
        let columns = (0..count)
            .map(|i| match map.get_column_type(i) {
                Ok(Some(kind)) => Ok(Column {
                    kind,
                    meta: map.get_column_metadata(i).unwrap_or(&[]),
                }),
                Ok(None) => Err(format!("the table map has no type for column {}", i + 1)),
                Err(e) => Err(format!("column {}: {e}", i + 1)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Rows {
            at: Cursor {
                data: event.rows_data(),
                pos: 0,
            },
            columns,
            before: event.columns_before_image().map(|bits| {
                (0..count)
                    .map(|i| bits.get(i).is_some_and(|b| *b))
                    .collect()
            }),
            after: event.columns_after_image().map(|bits| {
                (0..count)
                    .map(|i| bits.get(i).is_some_and(|b| *b))
                    .collect()
            }),
            partial: matches!(event, RowsEventData::PartialUpdateRowsEvent(_)),
            json_columns: map.json_column_count(),
        })
    }

    /// Reads the next row into `before` and `after` (each that the event
    /// has); `false` at the end of the event.
    pub(super) fn next(
        &mut self,
        table: &[MyColumn],
        before: &mut Image,
        after: &mut Image,
    ) -> Result<bool, String> {
        if self.at.pos >= self.at.data.len() {
            return Ok(false);
        }
        if let Some(present) = &self.before {
            self.at.image(&self.columns, present, table, before)?;
        }
        if let Some(present) = &self.after {
            if self.partial {
                self.at.value_options(self.json_columns)?;
            }
            self.at.image(&self.columns, present, table, after)?;
        }
        Ok(true)
    }
}

impl<'a> Cursor<'a> {
    /// A MySQL partial update's after image starts with its value options:
    /// with partial JSON updates, a bitmap of the JSON columns sent as diffs.
    fn value_options(&mut self, json_columns: usize) -> Result<(), String> {
        let options = self.length_encoded()?;
        if options & 1 != 0 {
            let bitmap = self.take(json_columns.div_ceil(8))?;
            if bitmap.iter().any(|b| *b != 0) {
                return Err("a partial JSON update (set binlog_row_value_options = '')".into());
            }
        }
        Ok(())
    }

    fn image(
        &mut self,
        columns: &[Column<'_>],
        present: &[bool],
        table: &[MyColumn],
        image: &mut Image,
    ) -> Result<(), String> {
        image.clear();
        let nulls = self.take(present.iter().filter(|p| **p).count().div_ceil(8))?;
        let mut n = 0;
        for (i, is_present) in present.iter().enumerate() {
            let null = *is_present && nulls[n / 8] & (1 << (n % 8)) != 0;
            if *is_present {
                n += 1;
            }
            if !*is_present || null {
                image.slots.push(Slot::Plain(Value::Null));
                continue;
            }
            let (Some(column), Some(my)) = (columns.get(i), table.get(i)) else {
                return Err("more columns in the row than in the table".into());
            };
            self.value(column, my, image)
                .map_err(|e| format!("column {}: {e}", i + 1))?;
        }
        Ok(())
    }

    /// Reads one value of `column` (`my` as information_schema describes it) into `image`.
    fn value(
        &mut self,
        column: &Column<'_>,
        my: &MyColumn,
        image: &mut Image,
    ) -> Result<(), String> {
        use ColumnType::*;
        let (kind, meta, column) = (column.kind, column.meta, my);
        let plain = match kind {
            MYSQL_TYPE_TINY => self.int(1, column.unsigned)?,
            MYSQL_TYPE_SHORT => self.int(2, column.unsigned)?,
            MYSQL_TYPE_INT24 => self.int(3, column.unsigned)?,
            MYSQL_TYPE_LONG => self.int(4, column.unsigned)?,
            MYSQL_TYPE_LONGLONG => {
                let raw = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
                match (column.unsigned, i64::try_from(raw)) {
                    (true, Err(_)) => {
                        image.push_text(&raw.to_string());
                        return Ok(());
                    }
                    (true, Ok(v)) => Value::Int(v),
                    (false, _) => Value::Int(raw as i64),
                }
            }
            MYSQL_TYPE_DOUBLE => Value::Double(f64::from_le_bytes(
                self.take(8)?.try_into().expect("8 bytes"),
            )),
            MYSQL_TYPE_NEWDECIMAL if meta.len() >= 2 && meta[0] <= 38 => {
                let (precision, scale) = (meta[0], meta[1]);
                let digits = decimal(
                    self.take(decimal_size(precision, scale)?)?,
                    precision,
                    scale,
                )?;
                Value::Decimal(digits, scale)
            }
            MYSQL_TYPE_NEWDATE => {
                let raw = self.take(3)?;
                let packed = u32::from(raw[0]) | u32::from(raw[1]) << 8 | u32::from(raw[2]) << 16;
                let (year, month, day) = (packed >> 9, packed >> 5 & 15, packed & 31);
                match chrono::NaiveDate::from_ymd_opt(year as i32, month, day) {
                    Some(date) => Value::Date(date.to_epoch_days()),
                    // A zero date: its text, which the column refuses as it would the server's.
                    None => {
                        image.push_text(&format!("{year:04}-{month:02}-{day:02}"));
                        return Ok(());
                    }
                }
            }
            MYSQL_TYPE_TIMESTAMP2 if column.sql_type == SqlType::TimestampTz => {
                let secs = u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes"));
                let fraction = self.fraction(meta.first().copied().unwrap_or(0))?;
                Value::Timestamp(i64::from(secs) * 1_000_000 + fraction, true)
            }
            MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING if meta.len() >= 2 => {
                let max = usize::from(u16::from_le_bytes([meta[0], meta[1]]));
                let len = self.length(if max < 256 { 1 } else { 2 })?;
                return self.string(len, 0, column, image);
            }
            MYSQL_TYPE_STRING if meta.len() >= 2 => {
                let (byte0, byte1) = (usize::from(meta[0]), usize::from(meta[1]));
                let max = if byte0 & 0x30 != 0x30 {
                    byte1 | ((byte0 & 0x30) ^ 0x30) << 4
                } else {
                    byte1
                };
                let len = self.length(if max < 256 { 1 } else { 2 })?;
                // BINARY(n) is sent without its trailing zero bytes.
                return self.string(len, max, column, image);
            }
            MYSQL_TYPE_BLOB if (1..=4).contains(&meta.first().copied().unwrap_or(0)) => {
                let len = self.length(usize::from(meta[0]))?;
                return self.string(len, 0, column, image);
            }
            kind => return self.other(kind, meta, column, image),
        };
        image.slots.push(Slot::Plain(plain));
        Ok(())
    }

    /// A value of a type met less often, read by mysql_common.
    fn other(
        &mut self,
        kind: ColumnType,
        meta: &[u8],
        column: &MyColumn,
        image: &mut Image,
    ) -> Result<(), String> {
        let mut buf = ParseBuf(&self.data[self.pos..]);
        let value: BinlogValue<'_> = buf
            .parse((kind, meta, column.unsigned, false))
            .map_err(|e| format!("{kind:?}: {e}"))?;
        self.pos = self.data.len() - buf.0.len();
        if let (BinlogValue::Value(MyValue::Date(y, mo, d, h, mi, s, us)), SqlType::Timestamp) =
            (&value, column.sql_type)
            && let Some(at) =
                chrono::NaiveDate::from_ymd_opt(i32::from(*y), u32::from(*mo), u32::from(*d))
                    .and_then(|date| {
                        date.and_hms_micro_opt(u32::from(*h), u32::from(*mi), u32::from(*s), *us)
                    })
        {
            image.slots.push(Slot::Plain(Value::Timestamp(
                at.and_utc().timestamp_micros(),
                false,
            )));
            return Ok(());
        }
        let digits = if kind == ColumnType::MYSQL_TYPE_TIME2 {
            meta.first().copied().unwrap_or(0)
        } else {
            0
        };
        let text = binlog_text(&value, column, digits)
            .map_err(|expected| format!("expected {expected}"))?;
        image.push_text(&text);
        Ok(())
    }

    /// `len` bytes of a string column: text, or bytes for a binary column,
    /// zero-padded to `pad` bytes.
    fn string(
        &mut self,
        len: usize,
        pad: usize,
        column: &MyColumn,
        image: &mut Image,
    ) -> Result<(), String> {
        let raw = self.take(len)?;
        if column.sql_type == SqlType::Bytes {
            let from = image.bytes.len();
            image.bytes.extend_from_slice(raw);
            image.bytes.resize(from + len.max(pad), 0);
            image.slots.push(Slot::Bytes(from, image.bytes.len()));
        } else {
            match std::str::from_utf8(raw) {
                Ok(text) => image.push_text(text),
                Err(_) => image.push_text(&String::from_utf8_lossy(raw)),
            }
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let data: &'a [u8] = self.data;
        let bytes = data
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or_else(|| format!("the row ends after {} bytes, {n} more expected", data.len()))?;
        self.pos += n;
        Ok(bytes)
    }

    /// A little-endian length of `n` bytes.
    fn length(&mut self, n: usize) -> Result<usize, String> {
        Ok(self
            .take(n)?
            .iter()
            .rev()
            .fold(0, |len, b| len << 8 | usize::from(*b)))
    }

    /// A length-encoded integer.
    fn length_encoded(&mut self) -> Result<u64, String> {
        let n = match self.take(1)?[0] {
            0xfc => 2,
            0xfd => 3,
            0xfe => 8,
            first => return Ok(u64::from(first)),
        };
        Ok(self.length(n)? as u64)
    }

    /// A little-endian integer of `n` bytes.
    fn int(&mut self, n: usize, unsigned: bool) -> Result<Value<'static>, String> {
        let raw = self.length(n)? as u64;
        let bits = 64 - 8 * n as u32;
        Ok(Value::Int(if unsigned {
            raw as i64
        } else {
            (raw << bits) as i64 >> bits
        }))
    }

    /// The microseconds of a TIMESTAMP2 or DATETIME2 with `digits` fraction digits.
    fn fraction(&mut self, digits: u8) -> Result<i64, String> {
        let (bytes, unit) = match digits {
            1 | 2 => (1, 10_000),
            3 | 4 => (2, 100),
            5 | 6 => (3, 1),
            _ => return Ok(0),
        };
        let raw = self.take(bytes)?;
        Ok(raw.iter().fold(0i64, |v, b| v << 8 | i64::from(*b)) * unit)
    }
}

/// Bytes of a binary decimal of `precision` digits, `scale` after the point.
fn decimal_size(precision: u8, scale: u8) -> Result<usize, String> {
    let integral = usize::from(
        precision
            .checked_sub(scale)
            .ok_or("a decimal's scale above its precision")?,
    );
    let scale = usize::from(scale);
    Ok(integral / 9 * 4 + DIGIT_BYTES[integral % 9] + scale / 9 * 4 + DIGIT_BYTES[scale % 9])
}

/// MySQL's binary decimal (`decimal2bin`): groups of nine digits in four
/// big-endian bytes, the integral part's leading group and the fraction's
/// last group in fewer; the first bit inverted; every bit of a negative
/// number inverted. Gives the digits as one integer, `scale` of them after
/// the point.
fn decimal(raw: &[u8], precision: u8, scale: u8) -> Result<i128, String> {
    let negative = raw.first().is_some_and(|b| b & 0x80 == 0);
    let mask = if negative { 0xff } else { 0 };
    let byte = |i: usize| raw[i] ^ mask ^ if i == 0 { 0x80 } else { 0 };
    let integral = usize::from(precision - scale);
    let scale = usize::from(scale);
    // Digits per group, in order.
    let groups = std::iter::once(integral % 9)
        .chain(std::iter::repeat_n(9, integral / 9 + scale / 9))
        .chain(std::iter::once(scale % 9))
        .filter(|digits| *digits > 0);
    let mut at = 0;
    let mut value: i128 = 0;
    for digits in groups {
        let n = DIGIT_BYTES[digits];
        let group = (at..at + n).fold(0i128, |g, i| g << 8 | i128::from(byte(i)));
        at += n;
        value = value
            .checked_mul(10i128.pow(digits as u32))
            .and_then(|v| v.checked_add(group))
            .ok_or("a decimal with more digits than its precision")?;
    }
    Ok(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MySQL's own encoding (`decimal2bin`), written from its description
    /// for the test: the digits of `text` grouped, the sign applied.
    fn encode(text: &str, precision: usize, scale: usize) -> Vec<u8> {
        let negative = text.starts_with('-');
        let text = text.trim_start_matches('-');
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let int = format!(
            "{:0>width$}",
            int.trim_start_matches('0'),
            width = precision - scale
        );
        let frac = format!("{frac:0<scale$}");
        let mut out = vec![];
        let mut put = |digits: &str| {
            if digits.is_empty() {
                return;
            }
            let v: u32 = digits.parse().unwrap();
            let n = DIGIT_BYTES[digits.len()];
            out.extend_from_slice(&v.to_be_bytes()[4 - n..]);
        };
        let lead = int.len() % 9;
        put(&int[..lead]);
        for g in int.as_bytes()[lead..].chunks(9) {
            put(std::str::from_utf8(g).unwrap());
        }
        for g in frac.as_bytes().chunks(9) {
            put(std::str::from_utf8(g).unwrap());
        }
        out[0] ^= 0x80;
        if negative {
            out.iter_mut().for_each(|b| *b = !*b);
        }
        out
    }

    /// Reads the images in `data` of a table with `columns`, every column present.
    fn read(
        columns: &[(ColumnType, &[u8], MyColumn)],
        data: &[u8],
    ) -> Result<Vec<Vec<String>>, String> {
        let meta: Vec<Column<'_>> = columns
            .iter()
            .map(|(kind, meta, _)| Column { kind: *kind, meta })
            .collect();
        let table: Vec<MyColumn> = columns.iter().map(|(.., c)| c.clone()).collect();
        let present = vec![true; columns.len()];
        let mut at = Cursor { data, pos: 0 };
        let mut image = Image::default();
        let mut rows = vec![];
        while at.pos < data.len() {
            at.image(&meta, &present, &table, &mut image)?;
            rows.push(
                (0..columns.len())
                    .map(|i| format!("{:?}", image.value(i)))
                    .collect(),
            );
        }
        Ok(rows)
    }

    #[test]
    fn row_images_give_typed_values_and_a_short_one_an_error() {
        use ColumnType::*;
        let columns = [
            (
                MYSQL_TYPE_LONG,
                &[][..],
                MyColumn::of(SqlType::Integer, false),
            ),
            (
                MYSQL_TYPE_INT24,
                &[][..],
                MyColumn::of(SqlType::Integer, false),
            ),
            (
                MYSQL_TYPE_VARCHAR,
                &[40, 0][..],
                MyColumn::of(SqlType::Text, false),
            ),
            (
                MYSQL_TYPE_NEWDECIMAL,
                &[12, 2][..],
                MyColumn::of(
                    SqlType::Decimal {
                        precision: 12,
                        scale: 2,
                    },
                    false,
                ),
            ),
            (
                MYSQL_TYPE_TIMESTAMP2,
                &[6][..],
                MyColumn::of(SqlType::TimestampTz, false),
            ),
            (
                MYSQL_TYPE_NEWDATE,
                &[][..],
                MyColumn::of(SqlType::Date, false),
            ),
            (
                MYSQL_TYPE_STRING,
                &[0xfe, 4][..],
                MyColumn::of(SqlType::Bytes, false),
            ),
            (
                MYSQL_TYPE_TIMESTAMP2,
                &[2][..],
                MyColumn::of(SqlType::TimestampTz, false),
            ),
            (
                MYSQL_TYPE_LONGLONG,
                &[][..],
                MyColumn::of(
                    SqlType::Decimal {
                        precision: 20,
                        scale: 0,
                    },
                    true,
                ),
            ),
        ];
        let mut row = vec![0b0000_0000, 0b0000_0000];
        row.extend_from_slice(&(-5i32).to_le_bytes());
        row.extend_from_slice(&[0x00, 0x00, 0x80]); // -8388608 in three bytes
        row.push(6);
        row.extend_from_slice("héllo".as_bytes());
        row.extend_from_slice(&encode("-12.50", 12, 2));
        row.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        row.extend_from_slice(&[0x07, 0xa1, 0x20]); // 500000 microseconds
        let (y, m, d) = (2024u32, 2u32, 29u32);
        row.extend_from_slice(&(y << 9 | m << 5 | d).to_le_bytes()[..3]);
        row.extend_from_slice(&[2, 0xab, 0xcd]); // BINARY(4): trailing zeros not sent
        row.extend_from_slice(&1u32.to_be_bytes());
        row.push(25); // 0.25 s in hundredths
        row.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut nulls = vec![0b1111_1110, 0b0000_0001];
        nulls.extend_from_slice(&7i32.to_le_bytes());
        let data = [row.clone(), nulls].concat();
        let date = chrono::NaiveDate::from_ymd_opt(2024, 2, 29)
            .unwrap()
            .to_epoch_days();
        assert_eq!(
            read(&columns, &data).unwrap(),
            vec![
                vec![
                    "Int(-5)".to_string(),
                    "Int(-8388608)".into(),
                    "Text(\"héllo\")".into(),
                    "Decimal(-1250, 2)".into(),
                    "Timestamp(1700000000500000, true)".into(),
                    format!("Date({date})"),
                    "Bytes([171, 205, 0, 0])".into(),
                    "Timestamp(1250000, true)".into(),
                    "Text(\"18446744073709551615\")".into(),
                ],
                vec![
                    "Int(7)".to_string(),
                    "Null".into(),
                    "Null".into(),
                    "Null".into(),
                    "Null".into(),
                    "Null".into(),
                    "Null".into(),
                    "Null".into(),
                    "Null".into(),
                ],
            ]
        );
        // Cut anywhere inside the first row: an error, never a panic or a made-up value.
        for cut in 0..row.len() {
            assert!(
                read(&columns, &row[..cut]).is_err() || cut == 0,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn binary_decimals_give_their_digits() {
        for (text, p, s, digits) in [
            ("1234567890.1234", 14, 4, 12_345_678_901_234i128),
            ("-1234567890.1234", 14, 4, -12_345_678_901_234),
            ("0.05", 5, 2, 5),
            ("-0.05", 5, 2, -5),
            ("12.50", 12, 2, 1250),
            ("0", 10, 0, 0),
            ("-99999", 5, 0, -99_999),
            ("0.123456789012", 12, 12, 123_456_789_012),
            (
                "-12345678901234567890123456.789012345678",
                38,
                12,
                -12_345_678_901_234_567_890_123_456_789_012_345_678,
            ),
        ] {
            let raw = encode(text, p, s);
            assert_eq!(raw.len(), decimal_size(p as u8, s as u8).unwrap(), "{text}");
            assert_eq!(decimal(&raw, p as u8, s as u8), Ok(digits), "{text}");
            let mut shown = String::new();
            Value::Decimal(digits, s as u8).write_text(&mut shown);
            assert_eq!(shown, text, "its text");
        }
        assert!(decimal_size(2, 3).is_err());
    }
}
