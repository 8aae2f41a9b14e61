//! Parsing DMS text values into typed values, exactly.
//!
//! Every parser returns `Err(expected)` describing the accepted form, which
//! the caller turns into an error naming the object, row and column.

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};

/// Days from 0001-01-01 (CE day 1) to 1970-01-01.
const UNIX_EPOCH_DAYS_FROM_CE: i32 = 719_163;

/// `true`/`false`, `t`/`f`, `1`/`0`, `yes`/`no` (any case).
pub(crate) fn parse_bool(s: &str) -> Result<bool, &'static str> {
    match s.to_ascii_lowercase().as_str() {
        "t" | "true" | "1" | "y" | "yes" => Ok(true),
        "f" | "false" | "0" | "n" | "no" => Ok(false),
        _ => Err("a boolean (true/false, t/f, 1/0)"),
    }
}

/// An exact decimal with at most `precision` digits and `scale` fraction
/// digits, as the unscaled integer. Extra fraction digits are accepted only
/// when they are zeros: nothing is rounded away.
pub(crate) fn parse_decimal(s: &str, precision: u8, scale: i8) -> Result<i128, String> {
    let expected = || format!("a decimal({precision},{scale}) number such as 1234.56");
    let bytes = s.as_bytes();
    let (negative, digits) = match bytes.first() {
        Some(b'-') => (true, &bytes[1..]),
        Some(b'+') => (false, &bytes[1..]),
        _ => (false, bytes),
    };
    let (int_part, frac_part) = match digits.iter().position(|&b| b == b'.') {
        Some(dot) => (&digits[..dot], &digits[dot + 1..]),
        None => (digits, &digits[digits.len()..]),
    };
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.iter().chain(frac_part).all(u8::is_ascii_digit)
    {
        return Err(expected());
    }
    let scale = scale as usize;
    let (kept, dropped) = frac_part.split_at(frac_part.len().min(scale));
    if dropped.iter().any(|&b| b != b'0') {
        return Err(format!(
            "{} (more than {scale} fraction digits)",
            expected()
        ));
    }
    let mut value: i128 = 0;
    let mut significant = 0usize;
    for &b in int_part.iter().chain(kept) {
        if significant > 0 || b != b'0' {
            significant += 1;
        }
        value = value * 10 + i128::from(b - b'0');
    }
    for _ in kept.len()..scale {
        value *= 10;
    }
    let int_digits = int_part.iter().skip_while(|&&b| b == b'0').count();
    if int_digits + scale > precision as usize || significant > 38 {
        return Err(format!("{} (too many digits)", expected()));
    }
    Ok(if negative { -value } else { value })
}

/// The number written by the ASCII digits `b[range]`.
fn digits(b: &[u8], range: std::ops::Range<usize>) -> Option<u32> {
    b[range].iter().try_fold(0u32, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
    })
}

/// `yyyy-MM-dd` exactly (parsed by hand: chrono's format parser was a tenth
/// of the time of decoding a timestamp column).
fn ymd(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    NaiveDate::from_ymd_opt(digits(b, 0..4)? as i32, digits(b, 5..7)?, digits(b, 8..10)?)
}

/// `yyyy-MM-dd`, as days since 1970-01-01. A midnight time part
/// (`1994-06-07 00:00:00`, as Oracle DATE is written) is accepted.
pub(crate) fn parse_date(s: &str) -> Result<i32, &'static str> {
    const EXPECTED: &str = "a date yyyy-MM-dd";
    let (date, rest) = s.split_at(s.len().min(10));
    let date = ymd(date).ok_or(EXPECTED)?;
    if !rest.is_empty() {
        let time = rest.trim_start_matches([' ', 'T']);
        if time
            .trim_start_matches(['0', ':', '.'])
            .trim_end_matches('Z')
            .is_empty()
        {
            // midnight only
        } else {
            return Err("a date yyyy-MM-dd (a time part must be midnight)");
        }
    }
    Ok(date.num_days_from_ce() - UNIX_EPOCH_DAYS_FROM_CE)
}

use chrono::Datelike;

/// `yyyy-MM-dd HH:mm:ss[.ffffff]` (or `T` as separator), as microseconds
/// since the epoch. With `with_zone`, an offset (`Z`, `+02`, `+05:30`) may
/// follow and the value is converted to UTC; without one it is taken as UTC.
/// Fractions finer than a microsecond must be zeros.
pub(crate) fn parse_timestamp(s: &str, with_zone: bool) -> Result<i64, &'static str> {
    const EXPECTED: &str = "a timestamp yyyy-MM-dd HH:mm:ss[.ffffff]";
    const EXPECTED_TZ: &str = "a timestamp yyyy-MM-dd HH:mm:ss[.ffffff][+HH:MM]";
    let expected = if with_zone { EXPECTED_TZ } else { EXPECTED };
    if s.len() < 10 {
        return Err(expected);
    }
    let (date_str, rest) = s.split_at(10);
    let date = ymd(date_str).ok_or(expected)?;
    let (time, offset_secs) = if rest.is_empty() {
        (NaiveTime::MIN, 0)
    } else {
        let rest = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('T'))
            .ok_or(expected)?;
        let (clock, zone) = split_zone(rest);
        let offset = match zone {
            "" => 0,
            _ if !with_zone => return Err("a timestamp without time zone (found an offset)"),
            zone => parse_offset(zone).ok_or(expected)?,
        };
        (parse_clock(clock).ok_or(expected)?, offset)
    };
    let micros = NaiveDateTime::new(date, time).and_utc().timestamp_micros();
    Ok(micros - i64::from(offset_secs) * 1_000_000)
}

fn split_zone(rest: &str) -> (&str, &str) {
    match rest
        .find(['Z', 'z', '+'])
        .or_else(|| rest.rfind('-').filter(|&i| i >= 8))
    {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    }
}

fn parse_offset(zone: &str) -> Option<i32> {
    if zone.eq_ignore_ascii_case("z") {
        return Some(0);
    }
    let sign = match zone.as_bytes()[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits: String = zone[1..].chars().filter(|c| *c != ':').collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m) = match digits.len() {
        2 => (digits.parse::<i32>().ok()?, 0),
        4 => (
            digits[..2].parse::<i32>().ok()?,
            digits[2..].parse::<i32>().ok()?,
        ),
        _ => return None,
    };
    (h <= 23 && m <= 59).then_some(sign * (h * 3600 + m * 60))
}

fn parse_clock(clock: &str) -> Option<NaiveTime> {
    let (hms, frac) = match clock.split_once('.') {
        Some((hms, frac)) => (hms, frac),
        None => (clock, ""),
    };
    let b = hms.as_bytes();
    if b.len() != 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let time = NaiveTime::from_hms_opt(digits(b, 0..2)?, digits(b, 3..5)?, digits(b, 6..8)?)?;
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (micro_digits, below) = frac.split_at(frac.len().min(6));
    if below.bytes().any(|b| b != b'0') {
        return None;
    }
    let micros = if micro_digits.is_empty() {
        0
    } else {
        micro_digits.parse::<u32>().ok()? * 10u32.pow(6 - micro_digits.len() as u32)
    };
    time.with_nanosecond(micros * 1000)
}

use chrono::Timelike;

/// A UUID in 8-4-4-4-12 hex form (braces and case accepted), canonical lowercase.
pub(crate) fn parse_uuid(s: &str) -> Result<String, &'static str> {
    const EXPECTED: &str = "a UUID such as 123e4567-e89b-12d3-a456-426614174000";
    let inner = s.trim_start_matches('{').trim_end_matches('}');
    let groups: Vec<&str> = inner.split('-').collect();
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(inner.to_ascii_lowercase())
    } else {
        Err(EXPECTED)
    }
}

/// Binary as hex, with or without PostgreSQL's `\x` prefix.
pub(crate) fn parse_hex(s: &str) -> Result<Vec<u8>, &'static str> {
    let digits = s.strip_prefix("\\x").unwrap_or(s);
    hex::decode(digits).map_err(|_| "binary as hex digits, optionally prefixed with \\x")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact() {
        assert_eq!(parse_decimal("85100.00", 12, 2), Ok(8_510_000));
        assert_eq!(parse_decimal("-0.5", 12, 2), Ok(-50));
        assert_eq!(parse_decimal("7", 12, 2), Ok(700));
        assert_eq!(parse_decimal("1.230", 12, 2), Ok(123));
        assert_eq!(parse_decimal(".5", 3, 1), Ok(5));
        assert!(parse_decimal("1.234", 12, 2).is_err());
        assert!(parse_decimal("12345", 5, 2).is_err());
        assert!(parse_decimal("1e5", 12, 2).is_err());
        assert!(parse_decimal("", 12, 2).is_err());
        assert!(parse_decimal("-", 12, 2).is_err());
        assert!(parse_decimal("1.2.3", 12, 2).is_err());
        // 38 nines fit decimal(38,0)
        assert!(parse_decimal(&"9".repeat(38), 38, 0).is_ok());
    }

    #[test]
    fn timestamps_in_dms_forms() {
        let base = parse_timestamp("2024-08-09 19:27:17", false).unwrap();
        assert_eq!(base, 1_723_231_637_000_000);
        assert_eq!(
            parse_timestamp("2024-08-09 19:27:17.787000", false),
            Ok(base + 787_000)
        );
        assert_eq!(
            parse_timestamp("2024-08-09T19:27:17.5", false),
            Ok(base + 500_000)
        );
        assert_eq!(parse_timestamp("2024-08-09 21:27:17+02", true), Ok(base));
        assert_eq!(parse_timestamp("2024-08-09 14:57:17-04:30", true), Ok(base));
        assert_eq!(parse_timestamp("2024-08-09 19:27:17Z", true), Ok(base));
        assert_eq!(
            parse_timestamp("2024-08-09 19:27:17.000000000", false),
            Ok(base)
        );
        assert!(parse_timestamp("2024-08-09 19:27:17.0000001", false).is_err());
        assert!(parse_timestamp("2024-08-09 19:27:17+02", false).is_err());
        assert!(parse_timestamp("2024-13-09 19:27:17", false).is_err());
        assert!(parse_timestamp("yesterday", false).is_err());
    }

    #[test]
    fn dates_and_others() {
        assert_eq!(parse_date("1970-01-02"), Ok(1));
        assert_eq!(parse_date("1994-06-07 00:00:00"), parse_date("1994-06-07"));
        assert!(parse_date("1994-06-07 10:00:00").is_err());
        assert_eq!(parse_bool("TRUE"), Ok(true));
        assert!(parse_bool("2").is_err());
        assert_eq!(
            parse_uuid("123E4567-e89b-12d3-a456-426614174000").unwrap(),
            "123e4567-e89b-12d3-a456-426614174000"
        );
        assert!(parse_uuid("123").is_err());
        assert_eq!(
            parse_hex("\\xdeadBEEF").unwrap(),
            vec![0xde, 0xad, 0xbe, 0xef]
        );
        assert!(parse_hex("xyz").is_err());
    }
}
