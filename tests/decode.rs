//! Decoding DMS objects: the format's edge cases and every kind of bad input,
//! each with the error that names the object, line/row, column and expectation.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use bytes::Bytes;
use cdcflow::config::{Column, CsvOptions};
use cdcflow::decode::{DecodeSpec, decode};
use cdcflow::source::{ObjectName, SourceObject};
use cdcflow::synth::Value;

use crate::support::rows;

fn object(key: &str) -> SourceObject {
    SourceObject {
        key: key.to_string(),
        etag: String::new(),
        size: 0,
        last_modified: chrono::DateTime::default(),
        name: ObjectName::parse(key).expect("DMS name"),
    }
}

fn spec(columns: &[(&str, &str)]) -> DecodeSpec {
    DecodeSpec {
        columns: columns
            .iter()
            .map(|(n, t)| Column {
                name: n.to_string(),
                sql_type: t.parse().unwrap(),
                existing: None,
            })
            .collect(),
        op_name: "op".into(),
        commit_ts_name: "commit_ts".into(),
        timestamp_column: Some("ts".into()),
        extra_columns: vec![],
        include_op_for_full_load: false,
        csv: CsvOptions::default(),
        evolving: false,
    }
}

fn orders() -> DecodeSpec {
    spec(&[
        ("id", "bigint"),
        ("name", "text"),
        ("amount", "decimal(12,2)"),
    ])
}

fn csv(key: &str, text: &str, spec: &DecodeSpec) -> cdcflow::error::Result<RecordBatch> {
    decode(&object(key), Bytes::from(text.to_string()), spec)
}

fn error(key: &str, text: &[u8], spec: &DecodeSpec) -> String {
    decode(&object(key), Bytes::from(text.to_vec()), spec)
        .expect_err("should fail")
        .to_string()
}

const CDC: &str = "public/t/20240809-192717787.csv";
const TS: &str = "2024-08-09 19:27:17.787001";

#[test]
fn rfc4180_quoting_and_the_null_rule() {
    let text = format!(
        "I,{TS},1,\"Smith, John\",1.50\n\
         U,{TS},1,\"O\"\"Brien\",2\n\
         U,{TS},1,\"two\nlines\",3.25\n\
         U,{TS},1,\"\",4\n\
         U,{TS},1,,5\n\
         D,{TS},1,Carine ,\n"
    );
    let batch = csv(CDC, &text, &orders()).unwrap();
    let got = rows(&[batch]);
    let name: Vec<&Value> = got.iter().map(|r| &r[3]).collect();
    let t = |s: &str| Value::Text(s.into());
    assert_eq!(
        name,
        [
            &t("Smith, John"),
            &t("O\"Brien"),
            &t("two\nlines"),
            &t(""),
            &Value::Null,
            &t("Carine ")
        ]
    );
    let ops: Vec<&Value> = got.iter().map(|r| &r[0]).collect();
    assert_eq!(ops, [&t("I"), &t("U"), &t("U"), &t("U"), &t("U"), &t("D")]);
    let amounts: Vec<&Value> = got.iter().map(|r| &r[4]).collect();
    assert_eq!(
        amounts,
        [
            &Value::Decimal(150),
            &Value::Decimal(200),
            &Value::Decimal(325),
            &Value::Decimal(400),
            &Value::Decimal(500),
            &Value::Null
        ]
    );
    // µs, UTC
    assert_eq!(got[0][1], Value::Micros(1_723_231_637_787_001));
}

#[test]
fn full_load_files_have_no_op_unless_configured() {
    let load = csv(
        "public/t/LOAD00000001.csv",
        &format!("{TS},7,x,1\n"),
        &orders(),
    )
    .unwrap();
    assert_eq!(rows(&[load])[0][0], Value::Text("I".into()));
    let mut with_op = orders();
    with_op.include_op_for_full_load = true;
    let load = csv(
        "public/t/LOAD00000001.csv",
        &format!("I,{TS},7,x,1\n"),
        &with_op,
    )
    .unwrap();
    assert_eq!(rows(&[load])[0][2], Value::Int(7));
}

#[test]
fn header_rows_map_columns_by_name() {
    let mut s = orders();
    s.csv.header = true;
    let text = format!("Op,TS,amount,ID,name\r\nU,{TS},9.99,3,\"a,b\"\r\n");
    let got = rows(&[csv(CDC, &text, &s).unwrap()]);
    assert_eq!(
        got[0][2..],
        [
            Value::Int(3),
            Value::Text("a,b".into()),
            Value::Decimal(999)
        ]
    );
    let err = error(
        CDC,
        format!("Op,ts,id,name,amount,extra\nI,{TS},1,a,1,z\n").as_bytes(),
        &s,
    );
    assert!(
        err.contains("\"extra\"") && err.contains("does not declare"),
        "{err}"
    );
}

#[test]
fn gzip_and_custom_dialects() {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(format!("I|{TS}|1|NULL|2.5\n").as_bytes())
        .unwrap();
    let mut s = orders();
    s.csv = CsvOptions {
        delimiter: b'|',
        header: false,
        null_value: "NULL".into(),
    };
    let batch = decode(
        &object("public/t/2024/08/09/20240809-192717787.csv.gz"),
        Bytes::from(gz.finish().unwrap()),
        &s,
    )
    .unwrap();
    assert_eq!(rows(&[batch])[0][3..], [Value::Null, Value::Decimal(250)]);
    let err = error("public/t/20240809-192717787.csv.gz", b"not gzip", &s);
    assert!(err.contains("not valid gzip"), "{err}");
}

#[test]
fn decimals_and_timestamps_are_exact() {
    let s = spec(&[
        ("id", "bigint"),
        ("big", "decimal(38,10)"),
        ("at", "timestamptz"),
        ("d", "date"),
        ("ok", "boolean"),
    ]);
    let text = format!(
        "I,{TS},1,1234567890123456789012345678.0123456789,2024-02-29 23:59:59.999999+01:00,1994-06-07 00:00:00,t\n"
    );
    let got = rows(&[csv(CDC, &text, &s).unwrap()]);
    assert_eq!(
        got[0][3],
        Value::Decimal(12_345_678_901_234_567_890_123_456_780_123_456_789)
    );
    assert_eq!(
        got[0][4],
        Value::Micros(1_709_251_199_999_999 - 3_600_000_000)
    );
    assert_eq!(got[0][5], Value::Int(8923)); // days since 1970-01-01
    assert_eq!(got[0][6], Value::Int(1));
}

#[test]
fn wrong_column_count_names_line_row_and_layout() {
    let err = error(
        CDC,
        format!("I,{TS},1,a,1\nI,{TS},2,b\n").as_bytes(),
        &orders(),
    );
    assert!(
        err.starts_with("public/t/20240809-192717787.csv: line 2, row 2"),
        "{err}"
    );
    assert!(
        err.contains("expected 5 fields (Op, ts, id, name, amount), found 4"),
        "{err}"
    );
}

#[test]
fn unparsable_value_names_the_column_and_the_expected_form() {
    let err = error(
        CDC,
        format!("I,{TS},1,\"x\ny\",1\nU,{TS},1,a,12.3.4\n").as_bytes(),
        &orders(),
    );
    assert!(err.contains("line 3, row 2, column \"amount\""), "{err}");
    assert!(
        err.contains("expected a decimal(12,2) number") && err.contains("\"12.3.4\""),
        "{err}"
    );
    let err = error(CDC, format!("I,{TS},x1,a,1\n").as_bytes(), &orders());
    assert!(
        err.contains("column \"id\"") && err.contains("expected a bigint"),
        "{err}"
    );
}

#[test]
fn unknown_op_bad_quoting_and_non_utf8() {
    let err = error(CDC, format!("X,{TS},1,a,1\n").as_bytes(), &orders());
    assert!(
        err.contains("row 1, column \"Op\"")
            && err.contains("I, U, D or T")
            && err.contains("\"X\""),
        "{err}"
    );
    let err = error(CDC, format!("I,{TS},1,\"a\"b,1\n").as_bytes(), &orders());
    assert!(
        err.contains("line 1") && err.contains("bad quoting"),
        "{err}"
    );
    let err = error(
        CDC,
        format!("I,{TS},1,\"open,1\nI,{TS},2,b,1\n").as_bytes(),
        &orders(),
    );
    assert!(err.contains("never closed"), "{err}");
    let mut bytes = format!("I,{TS},1,a,1\nI,{TS},2,").into_bytes();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(b",1\n");
    let err = error(CDC, &bytes, &orders());
    assert!(
        err.contains("line 2") && err.contains("not valid UTF-8"),
        "{err}"
    );
}

fn parquet(batch: &RecordBatch) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
    buf
}

fn text_batch(columns: &[(&str, Vec<Option<&str>>)]) -> RecordBatch {
    let schema = Schema::new(
        columns
            .iter()
            .map(|(n, _)| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    );
    let arrays = columns
        .iter()
        .map(|(_, v)| {
            Arc::new(arrow::array::StringArray::from(v.clone())) as arrow::array::ArrayRef
        })
        .collect();
    RecordBatch::try_new(Arc::new(schema), arrays).unwrap()
}

const PQ: &str = "public/t/20240809-192717787.parquet";

#[test]
fn parquet_values_are_converted_with_row_precise_errors() {
    let good = text_batch(&[
        ("Op", vec![Some("I"), Some("D")]),
        ("ts", vec![Some(TS), Some(TS)]),
        ("id", vec![Some("1"), Some("2")]),
        ("name", vec![Some("a"), None]),
        ("amount", vec![Some("1.10"), Some("2")]),
    ]);
    let batch = decode(&object(PQ), Bytes::from(parquet(&good)), &orders()).unwrap();
    assert_eq!(batch.column(0).as_string::<i32>().value(1), "D");
    assert_eq!(
        rows(&[batch])[1][2..],
        [Value::Int(2), Value::Null, Value::Decimal(200)]
    );

    let bad = text_batch(&[
        ("Op", vec![Some("I"), Some("U")]),
        ("ts", vec![Some(TS), Some(TS)]),
        ("id", vec![Some("1"), Some("abc")]),
        ("name", vec![Some("a"), Some("b")]),
        ("amount", vec![Some("1"), Some("2")]),
    ]);
    let err = error(PQ, &parquet(&bad), &orders());
    assert!(
        err.contains("row 2, column \"id\"")
            && err.contains("expected a bigint")
            && err.contains("\"abc\""),
        "{err}"
    );
}

#[test]
fn parquet_structure_problems() {
    let no_op = text_batch(&[
        ("ts", vec![Some(TS)]),
        ("id", vec![Some("1")]),
        ("name", vec![None]),
        ("amount", vec![None]),
    ]);
    let err = error(PQ, &parquet(&no_op), &orders());
    assert!(err.contains("needs an Op column"), "{err}");
    let missing = text_batch(&[
        ("Op", vec![Some("I")]),
        ("ts", vec![Some(TS)]),
        ("id", vec![Some("1")]),
    ]);
    let err = error(PQ, &parquet(&missing), &orders());
    assert!(err.contains("has no column \"name\""), "{err}");
    let mut bytes = parquet(&missing);
    bytes.truncate(bytes.len() / 2);
    let err = error(PQ, &bytes, &orders());
    assert!(
        err.starts_with(PQ) && err.contains("not a readable Parquet file"),
        "{err}"
    );
}
