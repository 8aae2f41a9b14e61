//! A bad object stops its own table at that object, is reported, and waits
//! for the operator; other tables go on; nothing is dropped or doubled.

use std::sync::Arc;

use crate::support::{Workspace, assert_warehouse_matches, output, staged_objects};

const EXIT_TABLES_FAILED: i32 = 3;

/// Stages a dataset, breaks object `bad` of `orders`, publishes everything.
fn broken_workspace(
    bad: usize,
) -> (
    Workspace,
    cdcflow::synth::Dataset,
    std::path::PathBuf,
    Vec<u8>,
) {
    let ws = Workspace::new();
    let data = ws.synth(1500, 21);
    ws.write_pipeline(4, false);
    ws.publish_all();
    let rel = staged_objects(&ws.path("staging"), "orders")
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".gz"))
        .nth(bad)
        .unwrap();
    let path = ws.source().join(&rel);
    let original = std::fs::read(&path).unwrap();
    let mut text = String::from_utf8(original.clone()).unwrap();
    text.insert_str(
        0,
        "U,2024-05-02 10:00:00.000000,1,x,not-a-number,new,,2024-05-01 00:00:00\n",
    );
    std::fs::write(&path, text).unwrap();
    (ws, data, rel, original)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_object_blocks_only_its_table_until_replaced() {
    let (ws, data, rel, original) = broken_workspace(4);
    let key = rel.to_string_lossy().to_string();

    let run = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert_eq!(
        run.status.code(),
        Some(EXIT_TABLES_FAILED),
        "{}",
        output(&run)
    );
    let text = output(&run);
    assert!(
        text.contains(&format!("{key}: line 1, row 1, column \"amount\"")),
        "{text}"
    );
    assert!(
        text.contains("expected a decimal(12,2)") && text.contains("not-a-number"),
        "{text}"
    );
    assert!(
        text.contains("cdcflow skip"),
        "tells the operator what to do: {text}"
    );

    // orders stopped before the bad object; order_items is complete.
    let orders = &data.tables[0];
    let loaded = ws.query("SELECT count(*) FROM orders_history").await;
    let bad_index = staged_objects(&ws.path("staging"), "orders")
        .iter()
        .position(|p| *p == rel)
        .unwrap();
    let before_bad = orders.changes.iter().filter(|c| c.file < bad_index).count();
    assert_eq!(
        crate::support::rows(&loaded)[0][0],
        cdcflow::synth::Value::Int(before_bad as i64)
    );
    let items = crate::support::history_rows(&ws, &data.tables[1]).await;
    assert_eq!(items.len(), data.tables[1].changes.len());

    let status = ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]);
    let text = output(&status);
    assert!(
        text.contains(&format!("waiting at {key}")) && text.contains("behind"),
        "{text}"
    );

    // A second run does not move past it.
    let again = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert_eq!(again.status.code(), Some(EXIT_TABLES_FAILED));

    // The operator replaces the object with a corrected one: the next run takes it and the rest.
    std::fs::write(ws.source().join(&rel), original).unwrap();
    let fixed = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert!(fixed.status.success(), "{}", output(&fixed));
    assert_warehouse_matches(&ws, &data, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipping_is_explicit_and_recorded() {
    let (ws, _data, rel, _) = broken_workspace(3);
    let key = rel.to_string_lossy().to_string();
    assert_eq!(
        ws.cdcflow(&["run", "-p", "pipeline.toml"], &[])
            .status
            .code(),
        Some(EXIT_TABLES_FAILED)
    );

    let wrong = ws.cdcflow(
        &[
            "skip",
            "-p",
            "pipeline.toml",
            "-t",
            "orders",
            "-o",
            "public/orders/nope.csv",
            "-r",
            "x",
        ],
        &[],
    );
    assert!(
        !wrong.status.success() && output(&wrong).contains("no object"),
        "{}",
        output(&wrong)
    );
    let skip = ws.cdcflow(
        &[
            "skip",
            "-p",
            "pipeline.toml",
            "-t",
            "orders",
            "-o",
            &key,
            "-r",
            "corrupt export, ticket 42",
        ],
        &[],
    );
    assert!(skip.status.success(), "{}", output(&skip));

    let run = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    let status = output(&ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]));
    assert!(
        status.contains(&format!("skipped {key} (corrupt export, ticket 42)"))
            && status.contains("up to date"),
        "{status}"
    );
    // every other object of orders was loaded
    let history = crate::support::rows(
        &ws.query("SELECT count(DISTINCT source_file) FROM orders_history")
            .await,
    );
    let total = staged_objects(&ws.path("staging"), "orders").len() as i64;
    assert_eq!(history[0][0], cdcflow::synth::Value::Int(total - 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_changed_after_loading_is_reported_not_reapplied() {
    let ws = Workspace::new();
    let data = ws.synth(800, 22);
    ws.write_pipeline(100, false);
    ws.publish_all();
    assert!(
        ws.cdcflow(&["run", "-p", "pipeline.toml"], &[])
            .status
            .success()
    );
    let rel = &staged_objects(&ws.path("staging"), "orders")[3];
    let path = ws.source().join(rel);
    let mut text = std::fs::read(&path).unwrap();
    text.extend_from_slice(b"D,2024-05-09 00:00:00.000000,1,,1.00,new,,2024-05-01 00:00:00\n");
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&path, text).unwrap();
    let run = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert!(
        output(&run).contains("changed after it was loaded"),
        "{}",
        output(&run)
    );
    assert!(
        output(&ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]))
            .contains("changed after it was loaded")
    );
    assert_warehouse_matches(&ws, &data, false).await;
}

/// Objects larger than 8 MiB are streamed, not read whole: the rows and the
/// error location must be the same as for small objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_stream_with_exact_rows_and_error_locations() {
    use std::io::Write;
    let ws = Workspace::new();
    let dir = ws.source().join("public/big");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, rows: usize, bad_row: Option<usize>| {
        let mut out = std::io::BufWriter::new(std::fs::File::create(dir.join(name)).unwrap());
        for i in 0..rows {
            let amount = if bad_row == Some(i + 1) {
                "oops".to_string()
            } else {
                format!("{}.25", i % 1000)
            };
            writeln!(out, "U,2024-05-01 00:00:00.000000,{},\"text, with \"\"quotes\"\" and\nnewlines {i}\",{amount}", i % 50_000).unwrap();
        }
        out.flush().unwrap();
    };
    write("20240501-000000000.csv", 120_000, None);
    write("20240501-010000000.csv", 120_000, Some(119_000));
    assert!(
        std::fs::metadata(dir.join("20240501-000000000.csv"))
            .unwrap()
            .len()
            > 8 << 20,
        "must take the streaming path"
    );
    ws.write_big_pipeline(
        "columns = [{ name = \"id\", type = \"bigint\" }, { name = \"v\", type = \"text\" }, \
         { name = \"amount\", type = \"decimal(12,2)\" }]",
        "",
    );
    let run = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert_eq!(
        run.status.code(),
        Some(EXIT_TABLES_FAILED),
        "{}",
        output(&run)
    );
    // each record spans 2 lines: row 119000 starts on line 237999
    assert!(
        output(&run).contains("20240501-010000000.csv: line 237999, row 119000, column \"amount\""),
        "{}",
        output(&run)
    );
    let loaded = crate::support::rows(
        &ws.query("SELECT count(*), count(DISTINCT id), max(v) FROM big_history")
            .await,
    );
    assert_eq!(loaded[0][0], cdcflow::synth::Value::Int(120_000));
    assert_eq!(loaded[0][1], cdcflow::synth::Value::Int(50_000));
    let last = crate::support::rows(&ws.query("SELECT v, amount FROM big WHERE id = 19999").await);
    assert_eq!(
        last[0][0],
        cdcflow::synth::Value::Text("text, with \"quotes\" and\nnewlines 119999".into())
    );
}

/// A Parquet object larger than 8 MiB is spooled and read 64k rows at a
/// time: every row arrives, and an error names its row within the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_parquet_objects_stream_with_exact_rows_and_error_locations() {
    use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    let ws = Workspace::new();
    let dir = ws.source().join("public/big");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, rows: usize, bad_row: Option<usize>| {
        let ops: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| if bad_row == Some(i + 1) { "X" } else { "U" }),
        ));
        let ts: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..rows).map(|_| "2024-05-01 00:00:00.000000"),
        ));
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(
            (0..rows).map(|i| (i % 50_000) as i64),
        ));
        let texts: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| format!("value {i} {}", "x".repeat(40))),
        ));
        let batch =
            RecordBatch::try_from_iter([("Op", ops), ("ts", ts), ("id", ids), ("v", texts)])
                .unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::UNCOMPRESSED)
            .set_max_row_group_row_count(Some(10_000))
            .build();
        let file = std::fs::File::create(dir.join(name)).unwrap();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    };
    write("20240501-000000000.parquet", 200_000, None);
    write("20240501-010000000.parquet", 200_000, Some(170_001));
    assert!(
        std::fs::metadata(dir.join("20240501-000000000.parquet"))
            .unwrap()
            .len()
            > 8 << 20,
        "must take the streaming path"
    );
    ws.write_big_pipeline("", "");
    let run = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert_eq!(run.status.code(), Some(3), "{}", output(&run));
    assert!(
        output(&run).contains("20240501-010000000.parquet: row 170001, column \"Op\""),
        "{}",
        output(&run)
    );
    let loaded = crate::support::rows(
        &ws.query("SELECT count(*), count(DISTINCT id) FROM big_history")
            .await,
    );
    assert_eq!(loaded[0][0], cdcflow::synth::Value::Int(200_000));
    assert_eq!(loaded[0][1], cdcflow::synth::Value::Int(50_000));
    let last = crate::support::rows(&ws.query("SELECT v FROM big WHERE id = 49999").await);
    assert_eq!(
        last[0][0],
        cdcflow::synth::Value::Text(format!("value 199999 {}", "x".repeat(40)))
    );
}
