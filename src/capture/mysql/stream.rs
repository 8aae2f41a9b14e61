//! The change stream: the row binlog from the checkpoint's position (by
//! GTID on MariaDB, else file and position), whole transactions a chunk.

use std::time::{Duration, Instant};

use futures::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn};
use serde::{Deserialize, Serialize};

use super::MySource;
use super::connect::my;
use super::rows::{Image, Rows};
use crate::capture::sink::Sink;
use crate::capture::source::{Chunk, Value, emptied};
use crate::decode::Op;
use crate::error::{Error, Result};
use crate::source::push_padded;

/// Where the binlog is read from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Binlog file.
    pub file: String,
    /// Position in it (the end of the last event read).
    pub pos: u64,
    /// MariaDB GTID position: the last transaction read in each replication
    /// domain (`domain-server-seq`, comma separated, as `@@gtid_binlog_pos`).
    #[serde(default)]
    pub gtid: Option<String>,
}

impl Position {
    /// Moves past the event ending at `log_pos`; a transaction's end takes
    /// the GTID its start announced, in its domain.
    pub(super) fn advance(&mut self, log_pos: u64, gtid: &mut Option<String>) {
        self.pos = log_pos;
        if let Some(gtid) = gtid.take() {
            self.gtid = Some(with_gtid(self.gtid.as_deref(), &gtid));
        }
    }
}

/// The GTID position `set` with `gtid` as its domain's last transaction.
/// A server with several domains (multi-source replication, a former
/// primary) interleaves them; resuming from one domain's GTID alone would
/// send the other domains again from the start.
fn with_gtid(set: Option<&str>, gtid: &str) -> String {
    let domain = |g: &str| {
        g.split('-')
            .next()
            .and_then(|d| d.trim().parse::<u32>().ok())
    };
    let mut entries: Vec<&str> = set
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty() && domain(g) != domain(gtid))
        .collect();
    entries.push(gtid);
    entries.sort_by_key(|g| domain(g));
    entries.join(",")
}

/// Room for decoding a row event's rows, kept from event to event.
#[derive(Default)]
struct Images {
    before: Image,
    after: Image,
    /// The values of a row, emptied.
    spare: Vec<Value<'static>>,
    /// A change's sequence.
    seq: String,
}

/// The binlog being read, and where: what one chunk leaves for the next.
pub(super) struct Reader {
    stream: BinlogStream,
    /// With `--once`: the server's position at start, where reading ends.
    end: Option<Position>,
    /// Just after the last whole transaction (or DDL) read.
    at: Position,
    /// The position last confirmed.
    pub(super) confirmed: Option<Position>,
    /// The current transaction's start, first row index and commit time.
    txn_pos: u64,
    index: u64,
    commit_micros: i64,
    /// The GTID of the transaction read, saved with its end.
    pending_gtid: Option<String>,
    /// Changes given to the sink since the last chunk.
    in_chunk: usize,
    /// Inside a transaction (its GTID or BEGIN read, its end not yet):
    /// no chunk ends here, not even at a stop, so an object never holds
    /// part of a transaction whose position is confirmed before it.
    in_txn: bool,
    /// The current transaction is one statement with no COMMIT after it
    /// (MariaDB's GTID flag `FL_STANDALONE`: DDL, `GRANT`, `ANALYZE`).
    standalone: bool,
    /// Room for decoding rows, reused from row to row.
    images: Images,
    last_event: Instant,
    finished: bool,
}

impl Reader {
    /// The chunk ends here, at a transaction boundary.
    fn ready(&mut self) -> Chunk {
        self.in_chunk = 0;
        Chunk::Ready(serde_json::to_string(&self.at).expect("a position serializes"))
    }

    /// The transaction (or DDL) read ends at `log_pos`.
    fn end_txn(&mut self, log_pos: u64) {
        self.at.advance(log_pos, &mut self.pending_gtid);
        self.in_txn = false;
        self.standalone = false;
    }

    /// With `--once`: whether a transaction starting at `pos` of the
    /// current file began at or after the server's position when reading
    /// started. Other writers' transactions come after it; reading ends
    /// before them, so a stream that ends inside one is no error.
    fn starts_past_end(&self, pos: u64) -> bool {
        self.end
            .as_ref()
            .is_some_and(|end| (self.at.file.as_str(), pos) >= (end.file.as_str(), end.pos))
    }

    /// The end of the reading (`--once`, a stop): the last chunk, if
    /// anything is left to write or confirm.
    fn last(&mut self, sink: &Sink) -> Result<Chunk> {
        if self.in_txn {
            // The stream ended inside a transaction: its rows so far are not
            // written; the next run reads it again from the confirmed position.
            return Err(Error::capture(
                "reading the binlog",
                format!(
                    "the stream ended inside the transaction at {}:{}; nothing of it was \
                     written, the next run reads it again",
                    self.at.file, self.txn_pos
                ),
            ));
        }
        Ok(
            if sink.has_rows() || Some(&self.at) != self.confirmed.as_ref() {
                self.ready()
            } else {
                Chunk::End
            },
        )
    }
}

impl MySource {
    /// Opens the binlog at `from`; with `once`, reading ends at the
    /// server's position now.
    pub(super) async fn open_stream(&mut self, from: Position, once: bool) -> Result<Reader> {
        let end = if once {
            Some(self.current_position().await?)
        } else {
            None
        };
        let mut conn = Conn::new(self.opts.clone())
            .await
            .map_err(my("connecting for the binlog"))?;
        let mut request = BinlogStreamRequest::new(self.settings.server_id);
        if once {
            request = request.with_non_blocking();
        }
        let filename = from.file.clone().into_bytes();
        if self.mariadb {
            conn.query_drop("SET @mariadb_slave_capability = 4")
                .await
                .map_err(my("announcing MariaDB GTID support"))?;
        }
        match (&from.gtid, self.mariadb) {
            (Some(gtid), true) => {
                conn.query_drop(format!("SET @slave_connect_state = '{gtid}'"))
                    .await
                    .map_err(my("setting the GTID to resume from"))?;
                request = request.with_filename(b"").with_pos(4u64);
            }
            _ => request = request.with_filename(&filename).with_pos(from.pos),
        }
        let stream = conn.get_binlog_stream(request).await.map_err(my(format!(
            "reading the binlog from {}:{}",
            from.file, from.pos
        )))?;
        Ok(Reader {
            stream,
            end,
            at: from.clone(),
            confirmed: Some(from),
            txn_pos: 0,
            index: 0,
            commit_micros: 0,
            pending_gtid: None,
            in_chunk: 0,
            in_txn: false,
            standalone: false,
            images: Images::default(),
            last_event: Instant::now(),
            finished: false,
        })
    }

    /// Reads whole transactions into `sink` until `max_changes` changes, an
    /// idle half second with rows buffered, the end (`--once`) or a stop,
    /// always at a transaction boundary (see `ChangeSource::next_chunk`).
    pub(super) async fn read_chunk(
        &mut self,
        r: &mut Reader,
        sink: &mut Sink,
        stop: &crate::shutdown::Shutdown,
    ) -> Result<Chunk> {
        const IDLE: Duration = Duration::from_millis(500);
        if r.finished {
            return Ok(Chunk::End);
        }
        loop {
            if stop.requested() && !r.in_txn {
                r.finished = true;
                return r.last(sink);
            }
            let next = if r.end.is_some() {
                r.stream.next().await
            } else {
                match tokio::time::timeout(IDLE, r.stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        // Idle: write what is buffered, at a transaction boundary.
                        if !r.in_txn && sink.has_rows() && r.last_event.elapsed() >= IDLE {
                            return Ok(r.ready());
                        }
                        continue;
                    }
                }
            };
            let Some(event) = next else {
                r.finished = true;
                return r.last(sink);
            };
            let event = event.map_err(my("reading the binlog"))?;
            r.last_event = Instant::now();
            let header = event.header();
            let log_pos = u64::from(header.log_pos());
            let raw_type = header.event_type_raw();
            let event_start = log_pos.saturating_sub(u64::from(header.event_size()));
            if raw_type == 0xa2 {
                // MariaDB GTID event: the start of a transaction.
                if r.starts_past_end(event_start) {
                    r.finished = true;
                    return r.last(sink);
                }
                let data = event.data();
                if data.len() >= 12 {
                    let seq = u64::from_le_bytes(data[0..8].try_into().expect("8"));
                    let domain = u32::from_le_bytes(data[8..12].try_into().expect("4"));
                    r.pending_gtid = Some(format!("{domain}-{}-{seq}", header.server_id()));
                }
                const FL_STANDALONE: u8 = 1;
                r.standalone = data.get(12).is_some_and(|flags| flags & FL_STANDALONE != 0);
                r.txn_pos = log_pos;
                r.index = 0;
                r.commit_micros = i64::from(header.timestamp()) * 1_000_000;
                r.in_txn = true;
                continue;
            }
            let Some(data) = event
                .read_data()
                .map_err(|e| Error::capture("decoding a binlog event", e))?
            else {
                continue;
            };
            match data {
                EventData::RotateEvent(rotate) => {
                    r.at.file = binlog_name(rotate.name_raw()).ok_or_else(|| {
                        Error::capture(
                            "reading the binlog",
                            format!(
                                "a rotate event names {:?}, not a binlog file (<base>.<6 or 7 digits>)",
                                rotate.name()
                            ),
                        )
                    })?;
                    r.at.pos = rotate.position();
                    continue;
                }
                EventData::QueryEvent(q) => {
                    let sql = q.query().to_string();
                    let upper = sql.trim_start().to_ascii_uppercase();
                    if upper.starts_with("BEGIN") {
                        if !r.in_txn && r.starts_past_end(event_start) {
                            r.finished = true;
                            return r.last(sink);
                        }
                        r.in_txn = true;
                        r.txn_pos = log_pos;
                        r.index = 0;
                        r.commit_micros = i64::from(header.timestamp()) * 1_000_000;
                    } else if upper.starts_with("ALTER")
                        || upper.starts_with("CREATE")
                        || upper.starts_with("DROP")
                        || upper.starts_with("RENAME")
                    {
                        // Columns are read again at the table's next row event.
                        self.tables.clear();
                        r.end_txn(log_pos);
                    } else if upper.starts_with("TRUNCATE") {
                        let schema = q.schema().to_string();
                        let name = truncate_target(&sql);
                        if let Some(name) = name {
                            let (schema, name) = match name.split_once('.') {
                                Some((s, n)) => (s.to_string(), n.to_string()),
                                None => (
                                    if schema.is_empty() {
                                        self.database.clone()
                                    } else {
                                        schema
                                    },
                                    name,
                                ),
                            };
                            let key = self.table_for(&schema, &name, None, sink).await?;
                            let table = &self.tables[&key];
                            if let Some(id) = &table.id {
                                let seq =
                                    format!("{:06}{log_pos:014}{:015}", file_index(&r.at.file), 0);
                                let nulls = vec![Value::Null; table.columns.len()];
                                sink.row(
                                    id,
                                    Op::Truncate,
                                    i64::from(header.timestamp()) * 1_000_000,
                                    &seq,
                                    &nulls,
                                )?;
                            }
                        }
                        r.end_txn(log_pos);
                    } else if upper.starts_with("COMMIT") {
                        r.end_txn(log_pos);
                        if r.in_chunk >= self.settings.max_changes {
                            return Ok(r.ready());
                        }
                    } else if r.standalone || !r.in_txn {
                        // A statement of its own (`GRANT`, `ANALYZE TABLE`):
                        // no COMMIT follows, it is the whole transaction.
                        r.end_txn(log_pos);
                    }
                }
                EventData::XidEvent(_) => {
                    r.end_txn(log_pos);
                    if r.in_chunk >= self.settings.max_changes {
                        return Ok(r.ready());
                    }
                }
                EventData::RowsEvent(rows) => {
                    let Some(tme) = r.stream.get_tme(rows.table_id()) else {
                        return Err(Error::capture(
                            "reading the binlog",
                            "a row event without its table map",
                        ));
                    };
                    let (schema, name) = (tme.database_name(), tme.table_name());
                    let names = column_names(tme);
                    let key = self
                        .table_for(&schema, &name, names.as_deref(), sink)
                        .await?;
                    let table = &self.tables[&key];
                    let Some(id) = &table.id else { continue };
                    if tme.columns_count() as usize != table.columns.len() {
                        return Err(Error::capture(
                            format!("{key} at {}:{log_pos}", r.at.file),
                            format!(
                                "the binlog row has {} columns and the table now has {}: the table changed \
                                 again after this point; capture from a new full load",
                                tme.columns_count(),
                                table.columns.len()
                            ),
                        ));
                    }
                    let kind = match &rows {
                        RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => {
                            'I'
                        }
                        RowsEventData::UpdateRowsEventV1(_)
                        | RowsEventData::UpdateRowsEvent(_)
                        | RowsEventData::PartialUpdateRowsEvent(_) => 'U',
                        _ => 'D',
                    };
                    let file = file_index(&r.at.file);
                    let context = || format!("decoding a row of {key} at {}:{log_pos}", r.at.file);
                    let mut images =
                        Rows::new(&rows, tme).map_err(|e| Error::capture(context(), e))?;
                    let Images {
                        before,
                        after,
                        spare,
                        seq,
                    } = &mut r.images;
                    while images
                        .next(&table.columns, before, after)
                        .map_err(|e| Error::capture(context(), e))?
                    {
                        let mut emit = |sink: &mut Sink, op: Op, image: &Image| -> Result<()> {
                            r.index += 1;
                            seq.clear();
                            push_padded(seq, file, 6);
                            push_padded(seq, r.txn_pos, 14);
                            push_padded(seq, r.index, 15);
                            let values = image.values(std::mem::take(spare));
                            let written = sink.row(id, op, r.commit_micros, seq, &values);
                            *spare = emptied(values);
                            written
                        };
                        match kind {
                            'I' => emit(sink, Op::Insert, after)?,
                            'D' => emit(sink, Op::Delete, before)?,
                            _ => {
                                let key_changed = table
                                    .source
                                    .columns
                                    .iter()
                                    .enumerate()
                                    .any(|(i, c)| c.key && before.value(i) != after.value(i));
                                if key_changed {
                                    emit(sink, Op::Delete, before)?;
                                    emit(sink, Op::Insert, after)?;
                                } else {
                                    emit(sink, Op::Update, after)?;
                                }
                            }
                        }
                        r.in_chunk += 1;
                    }
                    sink.spill_if_full().await?;
                }
                _ => {}
            }
            if let Some(end) = &r.end
                && r.at.file == end.file
                && r.at.pos >= end.pos
                && !r.in_txn
            {
                r.finished = true;
                return r.last(sink);
            }
        }
    }

    /// The key of a table whose rows follow, described (and declared to the
    /// sink, when selected) unless already known with these column `names`.
    async fn table_for(
        &mut self,
        schema: &str,
        name: &str,
        names: Option<&[String]>,
        sink: &mut Sink,
    ) -> Result<String> {
        let key = format!("{schema}.{name}");
        let known = self.tables.get(&key).is_some_and(|t| {
            names.is_none_or(|n| {
                n.len() == t.source.columns.len()
                    && n.iter().zip(&t.source.columns).all(|(a, c)| *a == c.name)
            })
        });
        if !known {
            let table = self.describe(schema, name, names, sink).await?;
            if table.id.is_some() {
                sink.table(&table.source);
            }
            self.tables.insert(key.clone(), table);
        }
        Ok(key)
    }
}

/// The column names of a table map (binlog_row_metadata = FULL), if it has them.
fn column_names(tme: &mysql_async::binlog::events::TableMapEvent<'_>) -> Option<Vec<String>> {
    let meta =
        mysql_async::binlog::events::OptionalMetaExtractor::new(tme.iter_optional_meta()).ok()?;
    let names: Vec<String> = meta
        .iter_column_name()
        .map(|n| n.map(|n| n.name().into_owned()))
        .collect::<Result<_, _>>()
        .ok()?;
    (!names.is_empty()).then_some(names)
}

/// The binlog file name in a rotate event's name bytes, `None` when they
/// hold none.
///
/// MariaDB's first (fake) rotate event comes before the format description,
/// so mysql_common leaves its four checksum bytes at the end of the name
/// (blackbeam/mysql_async#189). Those bytes are random: they may hold a `.`,
/// digits, or half of a UTF-8 character, so the name cannot be found by its
/// last `.` in the lossy text. A binlog name is `<base>.<6 or 7 digits>`
/// (the index is zero-padded to six digits): the name without the last four
/// bytes is taken when it is one (the checksum was there), else the whole
/// name. Both cannot be names: that would need an index of ten digits.
fn binlog_name(raw: &[u8]) -> Option<String> {
    fn name(bytes: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (base, index) = text.rsplit_once('.')?;
        (!base.is_empty()
            && (6..=7).contains(&index.len())
            && index.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.to_string())
    }
    raw.len()
        .checked_sub(4)
        .and_then(|n| name(&raw[..n]))
        .or_else(|| name(raw))
}

/// `binlog.000003` → 3.
fn file_index(file: &str) -> u64 {
    file.rsplit('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The table of `TRUNCATE [TABLE] name`.
fn truncate_target(sql: &str) -> Option<String> {
    let mut words = sql.split_whitespace().skip(1);
    let mut word = words.next()?;
    if word.eq_ignore_ascii_case("table") {
        word = words.next()?;
    }
    Some(word.trim_end_matches(';').replace('`', ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binlog_names_positions_and_gtids() {
        assert_eq!(file_index("binlog.000012"), 12);
        assert_eq!(with_gtid(None, "0-1-5"), "0-1-5");
        assert_eq!(with_gtid(Some("0-1-5,7-1-2"), "0-1-6"), "0-1-6,7-1-2");
        assert_eq!(with_gtid(Some("0-1-5"), "7-2-1"), "0-1-5,7-2-1");
        assert_eq!(
            with_gtid(Some("7-1-2, 10-1-1"), "3-1-9"),
            "3-1-9,7-1-2,10-1-1"
        );
        // The name of MariaDB's fake rotate event, with checksum bytes that
        // hold a `.` (binlog.000124 for server-id 1), digits, or half of a
        // UTF-8 character: the lossy text's last `.` gave junk, or a panic.
        for crc in [
            [0xe3, 0x2e, 0x54, 0x2d],
            [0x2e, 0x31, 0x32, 0x33],
            [0x2e, 0xc3, 0xa9, 0x2e],
            [0x31, 0x32, 0x33, 0x34],
            [0xff, 0xfe, 0xe2, 0x82],
        ] {
            let raw = [b"binlog.000124".as_slice(), &crc].concat();
            assert_eq!(
                binlog_name(&raw).as_deref(),
                Some("binlog.000124"),
                "{crc:x?}"
            );
        }
        // A rotate event read after the format description: no checksum bytes.
        assert_eq!(
            binlog_name(b"binlog.000124").as_deref(),
            Some("binlog.000124")
        );
        assert_eq!(
            binlog_name(b"my.bin.log.1000000").as_deref(),
            Some("my.bin.log.1000000")
        );
        assert_eq!(binlog_name(b"binlog"), None);
        assert_eq!(binlog_name(b"\xff\x2e"), None);
        assert_eq!(
            truncate_target("TRUNCATE TABLE `shop`.`items`"),
            Some("shop.items".into())
        );
        assert_eq!(truncate_target("truncate items"), Some("items".into()));
    }
}
