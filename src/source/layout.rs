//! DMS object names and the order they impose (ARCHITECTURE §1).
//!
//! Full-load files `LOAD00000001.csv` come first, by number; then CDC files
//! `yyyyMMdd-HHmmssSSS.csv`, by the time in their name. Date folders
//! (`2024/05/01/`, any DatePartitionSequence or delimiter) are not needed
//! for the order, since the file name carries the full time, so any folder
//! layout under the table prefix is accepted.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::config::Format;

/// Position of an object in its table's change order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectOrder {
    /// `LOADnnnnnnnn`: full load, by file number.
    Load(u64),
    /// `yyyyMMdd-HHmmssSSS[SSS]`: CDC, by the time in the name
    /// (microseconds since the epoch; DMS writes four fraction digits).
    Cdc(i64),
}

impl ObjectOrder {
    /// Fixed-width text that sorts like the order, the prefix of `change_seq`.
    pub fn sort_key(self) -> String {
        match self {
            ObjectOrder::Load(n) => format!("0{n:017}"),
            // Milliseconds as before, then the microseconds within them: the
            // sub-millisecond digits of a name order objects of one millisecond.
            ObjectOrder::Cdc(us) => {
                format!("1{:017}{:03}", us.div_euclid(1000), us.rem_euclid(1000))
            }
        }
    }

    /// The time a CDC file name states, used as `commit_ts` when the files carry none.
    pub fn cdc_time(self) -> Option<DateTime<Utc>> {
        match self {
            ObjectOrder::Load(_) => None,
            ObjectOrder::Cdc(us) => DateTime::from_timestamp_micros(us),
        }
    }
}

/// Appends `n` in decimal, zero-padded to `width` digits: a fixed-width part
/// of a sequence (`change_seq`, capture's `Seq`). By hand: `format!`'s padding writes a character at a time
/// and showed up in perf on the per-row path.
pub fn push_padded(out: &mut String, n: u64, width: usize) {
    // 20 digits hold any u64; the zeros before them are the padding.
    let mut digits = [b'0'; 20];
    let mut rest = n;
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for _ in digits.len()..width {
        out.push('0');
    }
    let from = at.min(digits.len().saturating_sub(width));
    out.push_str(std::str::from_utf8(&digits[from..]).expect("ASCII digits"));
}

/// Compression of an object, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain.
    None,
    /// `.gz`.
    Gzip,
}

/// What a DMS object name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectName {
    /// Order within the table.
    pub order: ObjectOrder,
    /// `Csv` or `Parquet` (never `Auto`).
    pub format: Format,
    /// Compression.
    pub compression: Compression,
}

impl ObjectName {
    /// Parses the last path segment of an object key; `None` for files that
    /// are not DMS data files (e.g. schema files, `_SUCCESS`).
    pub fn parse(key: &str) -> Option<ObjectName> {
        let file = key.rsplit('/').next()?;
        let (stem, compression) = match file.strip_suffix(".gz") {
            Some(stem) => (stem, Compression::Gzip),
            None => (file, Compression::None),
        };
        let (stem, format) = if let Some(s) = stem.strip_suffix(".csv") {
            (s, Format::Csv)
        } else if let Some(s) = stem.strip_suffix(".parquet") {
            (s, Format::Parquet)
        } else {
            return None;
        };
        let order = if let Some(num) = stem.strip_prefix("LOAD") {
            if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            ObjectOrder::Load(num.parse().ok()?)
        } else {
            ObjectOrder::Cdc(parse_cdc_stem(stem)?)
        };
        Some(ObjectName {
            order,
            format,
            compression,
        })
    }
}

/// `yyyyMMdd-HHmmss` and a fraction of the second, to microseconds (DMS
/// writes `SSSS`; digits past the sixth are dropped, and objects whose names
/// then tie are refused by the run, see `pipeline::table`).
fn parse_cdc_stem(stem: &str) -> Option<i64> {
    let (date, time) = stem.split_once('-')?;
    if date.len() != 8 || time.len() < 6 || !time.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (hms, frac) = time.split_at(6);
    let base = NaiveDateTime::parse_from_str(&format!("{date}{hms}"), "%Y%m%d%H%M%S").ok()?;
    let micros: i64 = match frac.len() {
        0 => 0,
        n => {
            let digits = &frac[..n.min(6)];
            digits.parse::<i64>().ok()? * 10_i64.pow(6 - digits.len() as u32)
        }
    };
    Some(base.and_utc().timestamp_micros() + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_numbers_are_formats_padding() {
        for (n, width) in [
            (0, 20),
            (0, 1),
            (7, 15),
            (123, 5),
            (12_345, 3),
            (u64::MAX, 20),
            (u64::MAX, 25),
        ] {
            let mut out = String::from("x");
            push_padded(&mut out, n, width);
            assert_eq!(out, format!("x{n:0width$}"));
        }
    }

    #[test]
    fn orders_load_before_cdc_and_cdc_by_time() {
        let a = ObjectName::parse("public/t/LOAD00000002.csv")
            .unwrap()
            .order;
        let b = ObjectName::parse("public/t/2024/08/09/20240809-192717787.csv")
            .unwrap()
            .order;
        let c = ObjectName::parse("public/t/20240809-192717788.parquet")
            .unwrap()
            .order;
        assert!(a < b && b < c);
        assert!(a.sort_key() < b.sort_key() && b.sort_key() < c.sort_key());
        assert_eq!(
            b.cdc_time().unwrap().to_rfc3339(),
            "2024-08-09T19:27:17.787+00:00"
        );
    }

    #[test]
    fn fraction_digits_past_the_millisecond_order_objects() {
        let order = |name: &str| ObjectName::parse(name).unwrap().order;
        // DMS's documented form has four fraction digits.
        let (a, b) = (
            order("t/20141029-1134010000.csv"),
            order("t/20141029-1134010001.csv"),
        );
        assert!(a < b && a.sort_key() < b.sort_key());
        assert_eq!(
            order("t/20141029-113401123.csv"),
            order("t/20141029-113401123000.csv")
        );
        assert!(order("t/20141029-113401123.csv") < order("t/20141029-1134011231.csv"));
        assert_eq!(b.sort_key(), "100001414582441000100");
        assert_eq!(
            b.cdc_time().unwrap().to_rfc3339(),
            "2014-10-29T11:34:01.000100+00:00"
        );
    }

    #[test]
    fn recognizes_compression_and_ignores_other_files() {
        let n = ObjectName::parse("a/20211018-223933563.csv.gz").unwrap();
        assert_eq!(n.compression, Compression::Gzip);
        assert_eq!(n.format, Format::Csv);
        assert!(ObjectName::parse("a/_SUCCESS").is_none());
        assert!(ObjectName::parse("a/orders.schema.json").is_none());
        assert!(ObjectName::parse("a/LOADX.csv").is_none());
        assert!(ObjectName::parse("a/2021-10-18.csv").is_none());
    }
}
