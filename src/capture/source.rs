//! The seam between a database and the objects: [`ChangeSource`], and the one
//! driver loop ([`drive`]) that writes and confirms its chunks. "Confirm only
//! after the objects are durable, and only at a transaction boundary" lives
//! here, once, for every source (ARCHITECTURE §4).
//!
//! A source lives in a folder of its own with fixed file roles: `connect.rs`
//! (sessions, TLS, what the server must be set to), `snapshot.rs` (the full
//! load), `stream.rs` (the change stream), `types.rs` (column types and the
//! text form of values).

use std::time::{Duration, Instant};

use super::Mode;
use super::sink::Sink;
use crate::error::Result;
use crate::shutdown::Shutdown;

/// One value of a change or a loaded row, as a source gives it to the sink.
///
/// A source gives text where its server does (PostgreSQL, a MySQL full
/// load), and typed values where it decodes binary ones (the MySQL binlog),
/// which go into the object's columns without a text round trip. Every
/// value has one text form, PostgreSQL's ([`Value::write_text`]), used by
/// CSV objects, masks, and a column whose type takes the value only as text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// An unchanged TOAST value the server did not send (PostgreSQL).
    Unchanged,
    /// The value in PostgreSQL's text output form, so one set of parsers
    /// serves every source.
    Text(&'a str),
    /// An integer.
    Int(i64),
    /// A double-precision number.
    Double(f64),
    /// A decimal number: its digits as an integer, and how many of them
    /// follow the point.
    Decimal(i128, u8),
    /// Microseconds since 1970-01-01 00:00:00: UTC when `true` (a
    /// `timestamptz`), else wall-clock time (a `timestamp`).
    Timestamp(i64, bool),
    /// Days since 1970-01-01.
    Date(i32),
    /// Binary data.
    Bytes(&'a [u8]),
}

impl Value<'_> {
    /// Appends the value's text form (PostgreSQL's output) to `out`; NULL
    /// and an unchanged value append nothing.
    pub fn write_text(&self, out: &mut String) {
        use std::fmt::Write;
        match *self {
            Value::Null | Value::Unchanged => {}
            Value::Text(t) => out.push_str(t),
            Value::Int(i) => write!(out, "{i}").expect("writing to a string"),
            Value::Double(f) => write!(out, "{f}").expect("writing to a string"),
            Value::Decimal(digits, scale) => {
                let text = digits.unsigned_abs().to_string();
                let scale = usize::from(scale);
                let text = format!("{text:0>width$}", width = scale + 1);
                let (int, frac) = text.split_at(text.len() - scale);
                if digits < 0 {
                    out.push('-');
                }
                out.push_str(int);
                if scale > 0 {
                    out.push('.');
                    out.push_str(frac);
                }
            }
            Value::Timestamp(micros, utc) => {
                match chrono::DateTime::from_timestamp_micros(micros) {
                    Some(at) => out.push_str(&crate::capture::writer::timestamp_text(at)),
                    None => write!(out, "{micros} microseconds").expect("writing to a string"),
                }
                if utc {
                    out.push_str("+00");
                }
            }
            Value::Date(days) => {
                match chrono::DateTime::from_timestamp(i64::from(days) * 86_400, 0) {
                    Some(at) => {
                        write!(out, "{}", at.format("%Y-%m-%d")).expect("writing to a string")
                    }
                    None => write!(out, "{days} days").expect("writing to a string"),
                }
            }
            Value::Bytes(b) => {
                out.push_str("\\x");
                out.push_str(&hex::encode(b));
            }
        }
    }
}

/// `values` emptied, its room kept for values of any lifetime (an in-place
/// collect: nothing is allocated), so that a source reuses one vector for
/// the values of every row.
pub(crate) fn emptied<'b>(mut values: Vec<Value<'_>>) -> Vec<Value<'b>> {
    values.clear();
    values.into_iter().map(|_| Value::Null).collect()
}

/// Rows of a table above which its full load is copied in key ranges by
/// sessions side by side (`parallel_load`), and the numbers of the rows of
/// the `n`th range start at `n × PART_ROWS`.
pub(crate) const RANGE_ROWS: f64 = 1_000_000.0;
pub(crate) const PART_ROWS: u64 = 1_000_000_000_000;

/// `WHERE` clauses of `parts` key ranges of equal width over `low..=high` of
/// the integer `column` (quoted for the server), each key in exactly one.
pub(crate) fn range_filters(column: &str, low: i64, high: i64, parts: usize) -> Vec<String> {
    ranges(low, high, parts)
        .into_iter()
        .map(|(from, to)| match to {
            Some(to) => format!(" WHERE {column} >= {from} AND {column} < {to}"),
            None => format!(" WHERE {column} >= {from}"),
        })
        .collect()
}

/// `parts` ranges `[from, to)` of equal width covering `low..=high`, the
/// last one open (`to` `None`).
fn ranges(low: i64, high: i64, parts: usize) -> Vec<(i64, Option<i64>)> {
    let width = (i128::from(high) - i128::from(low) + 1).max(1);
    let parts = (parts as i128).clamp(1, width);
    let bound = |i: i128| (i128::from(low) + width * i / parts) as i64;
    (0..parts)
        .map(|i| (bound(i), (i + 1 < parts).then(|| bound(i + 1))))
        .collect()
}

/// What [`ChangeSource::next_chunk`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// Whole transactions were given to the sink (perhaps none of a selected
    /// table); the position just after the last of them, in the form the
    /// checkpoint keeps (and [`ChangeSource::confirm`] reads back).
    Ready(String),
    /// Nothing new yet: the driver waits `target.interval` and asks again.
    Idle,
    /// The end: `--once` reached the position the server was at when it
    /// started, or a stop was requested at a transaction boundary.
    End,
}

/// What a full load leaves for the checkpoint.
pub struct FullLoad {
    /// What the change stream needs to know of the snapshot (kept as the
    /// checkpoint's `full_load`; its presence means the load is done).
    pub state: serde_json::Value,
    /// The position streaming starts from, where the source keeps it in the
    /// checkpoint (MySQL); `None` where the server keeps it (a slot).
    pub position: Option<String>,
    /// Rows copied.
    pub rows: u64,
}

/// A database capture reads: PostgreSQL (`postgres/`) or MySQL / MariaDB
/// (`mysql/`).
///
/// Contract, as [`drive`] calls it:
/// 1. [`full_load`](ChangeSource::full_load) at most once per capture (until
///    its state is in the checkpoint): every selected table from one
///    consistent snapshot, as LOAD objects, and what the stream needs to
///    neither miss nor repeat a change across the snapshot.
/// 2. [`start`](ChangeSource::start): the stream begins at the checkpoint's
///    position (a first CDC-only run: at the server's position now, saved
///    before anything is read); with `once` it ends at the server's
///    position now.
/// 3. [`next_chunk`](ChangeSource::next_chunk): gives the sink whole
///    transactions in commit order, every change with a sequence above all
///    before it, each table declared (`Sink::table`) before its rows and
///    again when its columns change. It returns only at a transaction
///    boundary. Inside a transaction it may call `Sink::spill_if_full`,
///    never `Sink::commit` or `Sink::confirm`.
/// 4. [`confirm`](ChangeSource::confirm): called once the chunk's objects
///    are durable; the source tells the server (a slot advance), then the
///    driver saves the position in the checkpoint. A crash before that
///    makes the next run read the chunk again, with the same sequences,
///    and the sink drops what is already written.
///
/// A lost connection is `Error::SourceLost` (the run restarts from the
/// checkpoint); anything else the server refuses is `Error::Capture`.
#[async_trait::async_trait]
pub trait ChangeSource: Send {
    /// Copies every selected table (see the trait's contract, step 1).
    async fn full_load(&mut self, sink: &mut Sink) -> Result<FullLoad>;

    /// Where the stream starts and, with `once`, ends (step 2).
    async fn start(&mut self, sink: &mut Sink, once: bool) -> Result<()>;

    /// The next whole transactions (step 3). Returns at a boundary once
    /// `stop` is requested.
    async fn next_chunk(&mut self, sink: &mut Sink, stop: &Shutdown) -> Result<Chunk>;

    /// Everything up to `position` is in durable objects (step 4).
    async fn confirm(&mut self, sink: &mut Sink, position: &str) -> Result<()>;

    /// How far the checkpoint is behind the server (`status`, `/metrics`).
    async fn lag(&mut self, sink: &Sink) -> Result<Lag>;
}

/// How far a capture's checkpoint is behind its server.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    /// Bytes of WAL or binlog the server wrote past the checkpoint, where
    /// the server can tell (a slot that exists; a binlog position in the
    /// server's current file).
    pub bytes: Option<u64>,
    /// What an operator reads.
    pub text: String,
}

/// Runs capture over `source`: the full load when `mode` asks for it and the
/// checkpoint has none, then chunks until the end (`once`) or `stop`: each
/// written (`Sink::commit`), then confirmed to the source, then to the
/// checkpoint. Returns the rows written.
pub async fn drive(
    source: &mut dyn ChangeSource,
    sink: &mut Sink,
    mode: Mode,
    once: bool,
    stop: &Shutdown,
    interval: Duration,
) -> Result<u64> {
    let mut loaded = 0;
    if mode != Mode::Cdc && sink.checkpoint.full_load.is_none() {
        let load = source.full_load(sink).await?;
        loaded = load.rows;
        sink.write_schema_files().await?;
        sink.checkpoint.full_load = Some(load.state);
        match load.position {
            Some(position) => sink.confirm(position).await?,
            None => sink.save().await?,
        }
    }
    if mode == Mode::FullLoad {
        return Ok(loaded);
    }
    source.start(sink, once).await?;
    let started = Instant::now();
    while !stop.requested() {
        let before = sink.rows();
        match source.next_chunk(sink, stop).await? {
            Chunk::End => break,
            Chunk::Idle => stop.sleep(interval).await,
            Chunk::Ready(position) => {
                if sink.has_rows() {
                    let objects = sink.commit().await?;
                    tracing::info!(%position, rows = sink.rows() - before, objects, "changes written");
                }
                crate::failpoint::hit("capture.before_confirm");
                source.confirm(sink, &position).await?;
                sink.confirm(position).await?;
            }
        }
    }
    tracing::info!(
        rows = sink.rows(),
        seconds = started.elapsed().as_secs_f64(),
        "capture stopped"
    );
    Ok(loaded + sink.rows())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emptied_values_keep_their_room() {
        let text = String::from("borrowed");
        let values = vec![Value::Text(&text); 12];
        let room = values.capacity();
        let emptied: Vec<Value<'static>> = emptied(values);
        assert!(emptied.is_empty());
        assert_eq!(emptied.capacity(), room, "no new allocation");
    }

    #[test]
    fn typed_values_have_postgresqls_text() {
        let text = |v: Value<'_>| {
            let mut out = String::new();
            v.write_text(&mut out);
            out
        };
        assert_eq!(text(Value::Int(-42)), "-42");
        assert_eq!(text(Value::Double(0.5)), "0.5");
        assert_eq!(text(Value::Decimal(-5, 2)), "-0.05");
        assert_eq!(text(Value::Decimal(1234, 0)), "1234");
        assert_eq!(
            text(Value::Timestamp(1_500_000, true)),
            "1970-01-01 00:00:01.500000+00"
        );
        assert_eq!(
            text(Value::Timestamp(-1, false)),
            "1969-12-31 23:59:59.999999"
        );
        assert_eq!(text(Value::Date(-1)), "1969-12-31");
        assert_eq!(text(Value::Date(19_782)), "2024-02-29");
        assert_eq!(text(Value::Bytes(&[0, 255])), "\\x00ff");
        assert_eq!(text(Value::Null), "");
    }

    #[test]
    fn key_ranges_cover_the_keys_once() {
        assert_eq!(
            ranges(1, 100, 4),
            [(1, Some(26)), (26, Some(51)), (51, Some(76)), (76, None)]
        );
        assert_eq!(ranges(5, 6, 4), [(5, Some(6)), (6, None)]);
        assert_eq!(ranges(7, 7, 3), [(7, None)]);
        let extreme = ranges(i64::MIN, i64::MAX, 3);
        assert_eq!(extreme.first().unwrap().0, i64::MIN);
        assert_eq!(extreme.last().unwrap().1, None);
        for pair in extreme.windows(2) {
            assert_eq!(pair[0].1, Some(pair[1].0), "ranges meet");
        }
    }
}
