//! Decoder of the pgoutput logical replication protocol, version 1
//! (PostgreSQL's "Logical Replication Message Formats").
//!
//! Values arrive in the server's text output format; this module keeps them as
//! text and says nothing about types beyond the column's type OID and modifier.

use std::fmt;

/// A decoded message. Tuples borrow from the message bytes.
#[derive(Debug, PartialEq)]
pub enum Message<'a> {
    /// Start of a transaction.
    Begin {
        /// LSN of the commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time: i64,
        /// Transaction id (32 bits).
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// LSN just past the commit record: where a restart resumes.
        end_lsn: u64,
    },
    /// A table's columns; sent before its first change of a session and after DDL.
    Relation(Relation),
    /// A row inserted.
    Insert {
        /// Relation id.
        rel: u32,
        /// The new row.
        new: Tuple<'a>,
    },
    /// A row updated. `old` is the key (primary-key change) or the whole old row
    /// (REPLICA IDENTITY FULL).
    Update {
        /// Relation id.
        rel: u32,
        /// The old key or row, when sent.
        old: Option<Tuple<'a>>,
        /// The new row.
        new: Tuple<'a>,
    },
    /// A row deleted: its key, or its whole old row (REPLICA IDENTITY FULL).
    Delete {
        /// Relation id.
        rel: u32,
        /// The old key or row.
        old: Tuple<'a>,
    },
    /// Tables truncated.
    Truncate {
        /// Relation ids.
        rels: Vec<u32>,
    },
    /// Messages that carry nothing for capture (origin, type, logical messages).
    Other,
}

/// A table as the Relation message describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// Relation id (the table's OID).
    pub id: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// `d` default (primary key), `f` full, `i` index, `n` nothing.
    pub replica_identity: u8,
    /// Columns in table order.
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key).
    pub key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (e.g. numeric precision and scale), -1 when none.
    pub type_modifier: i32,
}

use crate::capture::source::Value;

/// A row's values, in relation column order.
pub type Tuple<'a> = Vec<Value<'a>>;

/// A malformed message.
#[derive(Debug, PartialEq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.0)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            ProtocolError(format!(
                "needed {n} bytes at offset {}, message has {}",
                self.at,
                self.bytes.len()
            ))
        })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let rest = &self.bytes[self.at..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| ProtocolError("unterminated string".into()))?;
        let s = std::str::from_utf8(&rest[..len])
            .map_err(|_| ProtocolError("string is not UTF-8".into()))?;
        self.at += len + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Tuple<'a>, ProtocolError> {
        let n = self.u16()? as usize;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    let text = std::str::from_utf8(self.take(len)?)
                        .map_err(|_| ProtocolError("a text value is not UTF-8".into()))?;
                    Value::Text(text)
                }
                other => {
                    return Err(ProtocolError(format!(
                        "unknown tuple value kind {:?} (binary mode is not requested)",
                        other as char
                    )));
                }
            });
        }
        Ok(values)
    }
}

/// Decodes one message.
pub fn decode(bytes: &[u8]) -> Result<Message<'_>, ProtocolError> {
    let mut r = Reader { bytes, at: 0 };
    Ok(match r.u8()? {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time: r.u64()? as i64,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.u64()?;
            Message::Commit { end_lsn: r.u64()? }
        }
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstr()?.to_string();
            let name = r.cstr()?.to_string();
            let replica_identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                columns.push(RelationColumn {
                    key: r.u8()? & 1 == 1,
                    name: r.cstr()?.to_string(),
                    type_oid: r.u32()?,
                    type_modifier: r.u32()? as i32,
                });
            }
            Message::Relation(Relation {
                id,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let rel = r.u32()?;
            expect(r.u8()?, b'N')?;
            Message::Insert {
                rel,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let rel = r.u32()?;
            let (old, new) = match r.u8()? {
                b'K' | b'O' => {
                    let old = r.tuple()?;
                    expect(r.u8()?, b'N')?;
                    (Some(old), r.tuple()?)
                }
                b'N' => (None, r.tuple()?),
                other => return Err(unexpected(other, "K, O or N")),
            };
            Message::Update { rel, old, new }
        }
        b'D' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete {
                    rel,
                    old: r.tuple()?,
                },
                other => return Err(unexpected(other, "K or O")),
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let rels = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate { rels }
        }
        b'O' | b'Y' | b'M' => Message::Other,
        other => return Err(unexpected(other, "a pgoutput message type")),
    })
}

fn expect(found: u8, wanted: u8) -> Result<(), ProtocolError> {
    if found == wanted {
        Ok(())
    } else {
        Err(unexpected(found, &(wanted as char).to_string()))
    }
}

fn unexpected(found: u8, wanted: &str) -> ProtocolError {
    ProtocolError(format!("found {:?}, expected {wanted}", found as char))
}

/// Microseconds between 1970-01-01 and 2000-01-01 (PostgreSQL's epoch).
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// An LSN in PostgreSQL's `X/X` notation.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `X/X`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple_bytes(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => out.push(b'n'),
                Some("\u{0}unchanged") => out.push(b'u'),
                Some(t) => {
                    out.push(b't');
                    out.extend((t.len() as u32).to_be_bytes());
                    out.extend(t.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn begin_commit_and_rows() {
        let mut begin = vec![b'B'];
        begin.extend(0x16B_3748u64.to_be_bytes());
        begin.extend(5_000_000i64.to_be_bytes());
        begin.extend(742u32.to_be_bytes());
        assert_eq!(
            decode(&begin).unwrap(),
            Message::Begin {
                final_lsn: 0x16B_3748,
                commit_time: 5_000_000,
                xid: 742
            }
        );

        let mut update = vec![b'U'];
        update.extend(16384u32.to_be_bytes());
        update.push(b'K');
        update.extend(tuple_bytes(&[Some("2"), None]));
        update.push(b'N');
        update.extend(tuple_bytes(&[Some("20"), Some("\u{0}unchanged")]));
        assert_eq!(
            decode(&update).unwrap(),
            Message::Update {
                rel: 16384,
                old: Some(vec![Value::Text("2"), Value::Null]),
                new: vec![Value::Text("20"), Value::Unchanged],
            }
        );
        // A truncated message names what it needed.
        let err = decode(&update[..update.len() - 3]).unwrap_err();
        assert!(err.0.contains("needed"), "{err}");
    }

    #[test]
    fn relation() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0orders\0");
        rel.push(b'f');
        rel.extend(2u16.to_be_bytes());
        rel.push(1);
        rel.extend(b"id\0");
        rel.extend(20u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        rel.push(0);
        rel.extend(b"amount\0");
        rel.extend(1700u32.to_be_bytes());
        rel.extend((((12 << 16) | 2) + 4i32).to_be_bytes());
        let Message::Relation(r) = decode(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!((r.schema.as_str(), r.name.as_str()), ("public", "orders"));
        assert_eq!(r.replica_identity, b'f');
        assert!(r.columns[0].key && !r.columns[1].key);
        assert_eq!(r.columns[1].type_modifier, ((12 << 16) | 2) + 4);
    }

    #[test]
    fn lsn_text() {
        assert_eq!(format_lsn(0x1_0000_00A0), "1/A0");
        assert_eq!(parse_lsn("1/A0"), Some(0x1_0000_00A0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("nope"), None);
    }
}
