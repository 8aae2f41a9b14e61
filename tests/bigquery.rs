//! The BigQuery warehouse against a real BigQuery API emulator (bqemulator,
//! started by `scripts/peers.sh bq start`). Each test uses its own dataset.
//!
//! bqemulator runs every job again when its id is reused, so idempotency is
//! proved here at the pipeline level: a crashed run, rerun, leaves exactly
//! the rows the independent replay expects.

use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use cdcflow::failpoint::{BIGQUERY_NAMES, NAMES};

use crate::support::{
    SERVICE_UNAVAILABLE, TOO_MANY_REQUESTS, Workspace, assert_warehouse_matches, faulty_proxy,
    http_fault_proxy, output, peer, rows, staged_objects,
};

const PROJECT: &str = "test-proj";

/// A fresh dataset named after the workspace.
async fn dataset(endpoint: &str, ws: &Workspace) -> String {
    create_dataset(endpoint, ws.unique_name("t", '_')).await
}

/// Creates dataset `name`; returns its name.
async fn create_dataset(endpoint: &str, name: String) -> String {
    create_dataset_in(endpoint, name, "US").await
}

/// Creates dataset `name` in `location`; returns its name.
async fn create_dataset_in(endpoint: &str, name: String, location: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!(
            "{endpoint}/bigquery/v2/projects/{PROJECT}/datasets"
        ))
        .json(&serde_json::json!({
            "datasetReference": { "projectId": PROJECT, "datasetId": name },
            "location": location
        }))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "creating dataset {name}");
    name
}

/// The `[warehouse]` keys of a BigQuery dataset on the emulator.
fn bigquery(endpoint: &str, dataset: &str) -> String {
    format!(
        "kind = \"bigquery\"\nproject = \"{PROJECT}\"\ndataset = \"{dataset}\"\nendpoint = \"{endpoint}\""
    )
}

/// The `[warehouse]` keys of a local warehouse in `ws`.
fn local_warehouse(ws: &Workspace) -> String {
    format!(
        "kind = \"local\"\npath = \"{}/warehouse\"",
        ws.dir.path().display()
    )
}

/// Tests of one scenario, `check(&ws, warehouse)` with `warehouse` the
/// `[warehouse]` keys: into BigQuery (on the emulator) with current state in
/// a log compacted as usual, never compacted (read from the log by the
/// view) and MERGEd every batch; and into the local warehouse.
macro_rules! in_both_warehouses {
    ($bigquery:ident, $log:ident, $merged:ident, $local:ident, $check:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $bigquery() {
            in_bigquery_with!("", $check);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $log() {
            in_bigquery_with!(UNCOMPACTED, $check);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $merged() {
            in_bigquery_with!(MERGED, $check);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $local() {
            let ws = Workspace::new();
            $check(&ws, &local_warehouse(&ws)).await;
        }
    };
}

/// `[warehouse]` keys that keep current state by a MERGE of every batch.
const MERGED: &str = "current = \"merge\"";

/// `[warehouse]` keys that compact the log only into an empty base: every
/// later change stays in the log, and `<t>` reads it through the view.
const UNCOMPACTED: &str = "compact_ratio = 1000";

/// `check(&ws, warehouse)` into a new dataset on the emulator, with the
/// `[warehouse]` keys `extra` besides.
macro_rules! in_bigquery_with {
    ($extra:expr, $check:ident) => {
        let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
            return;
        };
        let ws = Workspace::new();
        let dataset = dataset(&endpoint, &ws).await;
        $check(
            &ws,
            &format!("{}\n{}", bigquery(&endpoint, &dataset), $extra),
        )
        .await;
    };
}

/// A workspace with a generated dataset published and `pipeline.toml` into
/// BigQuery, with the `[warehouse]` keys `extra` besides.
async fn bigquery_workspace(
    endpoint: &str,
    changes: usize,
    seed: u64,
    max_objects: usize,
    extra: &str,
) -> (Workspace, cdcflow::synth::Dataset) {
    let ws = Workspace::new();
    let data = ws.synth(changes, seed);
    ws.publish_all();
    let dataset = dataset(endpoint, &ws).await;
    ws.write_pipeline_into(
        "pipeline.toml",
        max_objects,
        true,
        "",
        &format!("{}\n{extra}", bigquery(endpoint, &dataset)),
    );
    (ws, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bigquery_holds_what_the_local_warehouse_holds() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let (ws, data) = bigquery_workspace(&endpoint, 2000, 5, 4, "").await;
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    assert_warehouse_matches(&ws, &data, true).await;

    // The same files into the local warehouse: the same versions, row for row.
    ws.write_pipeline_into("local.toml", 4, true, "", &local_warehouse(&ws));
    let run = ws.cdcflow(&["run", "--now", "-p", "local.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    for sql in [
        "SELECT id, customer, amount, op, change_seq, valid_from, valid_to, is_current \
         FROM orders_versions ORDER BY change_seq",
        "SELECT order_id, line_no, qty, price, deleted, commit_ts FROM order_items \
         ORDER BY order_id, line_no",
    ] {
        let in_bigquery = rows(&ws.query(sql).await);
        let in_local = rows(&ws.runner_for("local.toml").query(sql).await.unwrap());
        assert!(!in_local.is_empty(), "{sql}");
        assert_eq!(in_bigquery, in_local, "{sql}");
    }

    // Nothing new: nothing loaded, nothing changed.
    let again = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(again.status.success(), "{}", output(&again));
    assert_warehouse_matches(&ws, &data, true).await;

    // `history` reads the versions view in BigQuery.
    let history = ws.cdcflow(
        &[
            "history",
            "-p",
            "pipeline.toml",
            "--table",
            "orders",
            "--key",
            "7",
            "--format",
            "json",
        ],
        &[],
    );
    assert!(history.status.success(), "{}", output(&history));
    let expected = data.tables[0]
        .changes
        .iter()
        .filter(|c| c.values[0] == cdcflow::synth::Value::Int(7))
        .count();
    let lines = String::from_utf8_lossy(&history.stdout).lines().count();
    assert_eq!(lines, expected, "one line per change of key 7");
}

async fn crash_then_recover(endpoint: &str, failpoint: &str, extra: &str) {
    let (ws, data) = bigquery_workspace(endpoint, 1200, 11, 3, extra).await;
    let crashed = ws.cdcflow(
        &["run", "--pipeline", "pipeline.toml"],
        &[("CDCFLOW_FAILPOINT", failpoint)],
    );
    assert!(
        !crashed.status.success() && output(&crashed).contains("failpoint"),
        "{failpoint}: the run should have aborted: {}",
        output(&crashed)
    );
    let recovered = ws.cdcflow(&["run", "--pipeline", "pipeline.toml"], &[]);
    assert!(
        recovered.status.success(),
        "{failpoint}: {}",
        output(&recovered)
    );
    assert_warehouse_matches(&ws, &data, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_step_neither_loses_nor_doubles_a_change() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    for name in NAMES.iter().chain(BIGQUERY_NAMES) {
        crash_then_recover(&endpoint, name, "").await;
        crash_then_recover(&endpoint, &format!("{name}@2"), "").await;
    }
}

/// The same with current state MERGEd every batch (`current = "merge"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_step_neither_loses_nor_doubles_a_change_when_merged() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    for name in NAMES {
        crash_then_recover(&endpoint, name, MERGED).await;
    }
}

/// The same with every change after the first batch left in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_step_neither_loses_nor_doubles_a_change_in_the_log() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    for name in NAMES {
        crash_then_recover(&endpoint, &format!("{name}@2"), UNCOMPACTED).await;
    }
}

/// Publishes a copy of the newest `order_items` object, later by name, with
/// an extra column `gift_note`; returns how many rows it holds.
fn publish_object_with_a_new_column(ws: &Workspace) -> usize {
    let staged = staged_objects(&ws.path("staging"), "order_items");
    let newest = ws.path("staging").join(staged.last().unwrap());
    let file = std::fs::File::open(&newest).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    let old = batches[0].schema();
    let mut fields: Vec<Field> = old.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("gift_note", DataType::Utf8, true));
    let schema = std::sync::Arc::new(Schema::new(fields));
    let to = ws
        .source()
        .join("public/order_items/2099/01/01/20990101-000000000.parquet");
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&to).unwrap(),
        schema.clone(),
        None,
    )
    .unwrap();
    let mut count = 0;
    for batch in &batches {
        let notes: ArrayRef = std::sync::Arc::new(StringArray::from_iter_values(
            (0..batch.num_rows()).map(|i| format!("note {}", count + i)),
        ));
        let mut columns = batch.columns().to_vec();
        columns.push(notes);
        writer
            .write(&RecordBatch::try_new(schema.clone(), columns).unwrap())
            .unwrap();
        count += batch.num_rows();
    }
    writer.close().unwrap();
    count
}

/// A Parquet object with a column the table lacks: both tables grow it,
/// the rows before it hold NULL, its own rows hold their values.
async fn a_new_column_is_added(ws: &Workspace) {
    let first = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(first.status.success(), "{}", output(&first));
    a_new_column_is_added_to_loaded_tables(ws).await;
}

/// The second half of [`a_new_column_is_added`], after the first run.
async fn a_new_column_is_added_to_loaded_tables(ws: &Workspace) {
    let before = rows(&ws.query("SELECT count(*) FROM order_items_history").await);
    let added = publish_object_with_a_new_column(ws);
    let second = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(second.status.success(), "{}", output(&second));

    let count = |sql: &'static str| async move {
        match rows(&ws.query(sql).await)[0][0] {
            cdcflow::synth::Value::Int(n) => n as usize,
            ref other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        rows(
            &ws.query("SELECT count(*) FROM order_items_history WHERE gift_note IS NULL")
                .await
        ),
        before,
        "every earlier change keeps its values, with NULL in the new column"
    );
    assert_eq!(
        count("SELECT count(*) FROM order_items_history WHERE gift_note IS NOT NULL").await,
        added
    );
    // The current state of each key of the new object is its last change there.
    let keys = count(
        "SELECT count(*) FROM (SELECT DISTINCT order_id, line_no FROM order_items_history \
         WHERE gift_note IS NOT NULL) k",
    )
    .await;
    assert!(keys > 0);
    assert_eq!(
        count("SELECT count(*) FROM order_items WHERE gift_note IS NOT NULL").await,
        keys
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_column_mid_stream_in_bigquery() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let (ws, _) = bigquery_workspace(&endpoint, 600, 21, 100, "").await;
    a_new_column_is_added(&ws).await;
}

/// Other tools (dbt docs, Dataplex) rewrite column descriptions, where
/// cdcflow keeps each column's declared type. With every description of the
/// tables replaced, the types are read from BigQuery's own column types and a
/// Parquet table still takes a new column and loads as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_whose_descriptions_were_rewritten_still_loads() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    ws.synth(600, 81);
    ws.publish_all();
    let dataset = dataset(&endpoint, &ws).await;
    ws.write_pipeline_into(
        "pipeline.toml",
        100,
        true,
        "",
        &bigquery(&endpoint, &dataset),
    );
    let first = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(first.status.success(), "{}", output(&first));
    let http = reqwest::Client::new();
    let tables = format!("{endpoint}/bigquery/v2/projects/{PROJECT}/datasets/{dataset}/tables");
    for table in [
        "order_items_history",
        "order_items__base",
        "order_items__log",
    ] {
        let url = format!("{tables}/{table}");
        let got: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        let mut fields = got["schema"]["fields"].as_array().unwrap().clone();
        for field in &mut fields {
            field["description"] = "Documented by the data team".into();
        }
        let patched = http
            .patch(&url)
            .json(&serde_json::json!({ "schema": { "fields": fields } }))
            .send()
            .await
            .unwrap();
        assert!(
            patched.status().is_success(),
            "{}",
            patched.text().await.unwrap()
        );
        let again: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        assert!(!again.to_string().contains("cdcflow:"), "{again}");
    }
    a_new_column_is_added_to_loaded_tables(&ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_column_mid_stream_in_the_local_warehouse() {
    let ws = Workspace::new();
    ws.synth(600, 21);
    ws.publish_all();
    ws.write_pipeline(100, true);
    a_new_column_is_added(&ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_rate_limits_are_retried() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(800, 31);
    ws.publish_all();
    let dataset = dataset(&endpoint, &ws).await;
    let answers = [SERVICE_UNAVAILABLE, TOO_MANY_REQUESTS, SERVICE_UNAVAILABLE];
    let (proxy, seen) = faulty_proxy(endpoint.clone(), &answers).await;
    ws.write_pipeline_into("pipeline.toml", 5, true, "", &bigquery(&proxy, &dataset));
    let report = ws.run_now().await;
    assert!(report.ok(), "{report:?}");
    assert!(
        seen.load(Ordering::SeqCst) > answers.len(),
        "the proxy refused 3 connections and then served"
    );
    assert_warehouse_matches(&ws, &data, true).await;
}

/// Every job cdcflow starts carries labels naming the pipeline and the
/// destination dataset, and a batch's jobs the table, state store, batch and
/// step too, so a project's job list tells whose batch a job was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_is_labelled_with_its_dataset_store_batch_and_step() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    ws.synth(300, 41);
    ws.publish_all();
    let dataset = dataset(&endpoint, &ws).await;
    let inserts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = inserts.clone();
    let (proxy, _) = http_fault_proxy(endpoint, move |request| {
        let head = request.lines().next().unwrap_or_default();
        if head.starts_with("POST") && head.contains("/jobs") {
            seen.lock().unwrap().push(request.to_string());
        }
        None
    })
    .await;
    ws.write_pipeline_into("pipeline.toml", 100, true, "", &bigquery(&proxy, &dataset));
    let report = ws.run_now().await;
    assert!(report.ok(), "{report:?}");
    let store: String = rusqlite::Connection::open(ws.path("state/pipeline.toml.db"))
        .unwrap()
        .query_row("SELECT store_id FROM store", [], |r| r.get(0))
        .unwrap();
    let mut steps = Vec::new();
    for request in inserts.lock().unwrap().iter() {
        let at = request
            .find("\"labels\":")
            .unwrap_or_else(|| panic!("a job insert without labels: {request}"));
        let labels: serde_json::Value =
            serde_json::Deserializer::from_str(&request[at + "\"labels\":".len()..])
                .into_iter()
                .next()
                .unwrap()
                .unwrap();
        assert_eq!(labels["cdcflow_pipeline"], "test", "{labels}");
        assert_eq!(
            labels["cdcflow_dataset"],
            dataset.to_lowercase(),
            "{labels}"
        );
        if labels.get("cdcflow_step").is_none() {
            continue; // not a batch's job (DDL, a query)
        }
        assert_eq!(labels["cdcflow_store"], store.to_lowercase(), "{labels}");
        assert_eq!(labels["cdcflow_batch"], "1", "{labels}");
        steps.push(format!(
            "{} {}",
            labels["cdcflow_table"], labels["cdcflow_step"]
        ));
    }
    steps.sort();
    // One batch; the log is compacted at once into the empty base.
    let expected: Vec<String> = ["order_items", "orders"]
        .iter()
        .flat_map(|t| {
            ["clean", "compact", "current", "history", "load"].map(|s| format!("\"{t}\" \"{s}\""))
        })
        .collect();
    assert_eq!(steps, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dataset_or_a_bad_credential_says_what_to_fix() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    ws.synth(200, 41);
    ws.publish_all();
    ws.write_pipeline_into(
        "pipeline.toml",
        5,
        true,
        "",
        &bigquery(&endpoint, "no_such_dataset"),
    );
    let out = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", output(&out));
    assert!(
        output(&out).contains("no_such_dataset")
            && output(&out).contains("bq mk --dataset")
            && output(&out).contains("after 1 tries"),
        "not retried, and says how to create it:\n{}",
        output(&out)
    );

    // A credentials file of a type cdcflow does not know.
    std::fs::write(ws.path("key.json"), "{\"type\": \"nonsense\"}").unwrap();
    let with_key = format!(
        "kind = \"bigquery\"\nproject = \"{PROJECT}\"\ndataset = \"shop\"\ncredentials = \"{}\"",
        ws.path("key.json").display()
    );
    ws.write_pipeline_into("pipeline.toml", 5, true, "", &with_key);
    let out = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", output(&out));
    assert!(
        output(&out).contains("credentials file")
            && output(&out).contains("key.json")
            && output(&out).contains("\"nonsense\"; cdcflow reads service_account"),
        "{}",
        output(&out)
    );

    // A key file that is not there is a configuration error.
    let missing = with_key.replace("key.json", "missing.json");
    ws.write_pipeline_into("pipeline.toml", 5, true, "", &missing);
    let out = ws.cdcflow(&["validate", "-p", "pipeline.toml"], &[]);
    assert!(!out.status.success(), "{}", output(&out));
    assert!(
        output(&out).contains("warehouse.credentials"),
        "{}",
        output(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_whose_type_changes_stops_its_table_with_a_clear_error() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(600, 51);
    ws.publish("orders", 0..3);
    let dataset = dataset(&endpoint, &ws).await;
    let file = ws.write_pipeline_into(
        "pipeline.toml",
        100,
        true,
        "",
        &bigquery(&endpoint, &dataset),
    );
    let first = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(first.status.success(), "{}", output(&first));

    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace(
            r#"name = "amount", type = "decimal(12,2)""#,
            r#"name = "amount", type = "text""#,
        ),
    )
    .unwrap();
    ws.publish("orders", 3..usize::MAX);
    let second = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert_eq!(second.status.code(), Some(3), "{}", output(&second));
    assert!(
        output(&second).contains("column amount is decimal(12,2) there but text in this batch"),
        "{}",
        output(&second)
    );
    // Nothing of the refused batch reached the tables.
    let first_objects = data.tables[0].changes.iter().filter(|c| c.file < 3).count();
    assert_eq!(
        rows(&ws.query("SELECT count(*) FROM orders_history").await),
        vec![vec![cdcflow::synth::Value::Int(first_objects as i64)]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_replaces_its_days_and_a_crash_in_it_is_finished_later() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let (ws, data) = bigquery_workspace(&endpoint, 1500, 61, 4, "").await;
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    let outside = "SELECT change_seq, ingested_at FROM orders_history \
                   WHERE source_file NOT LIKE '%/2024/05/02/%' ORDER BY change_seq";
    let outside_before = rows(&ws.query(outside).await);
    let backfill = [
        "backfill",
        "-p",
        "pipeline.toml",
        "--from",
        "2024-05-02",
        "--to",
        "2024-05-02",
    ];
    for _ in 0..2 {
        let out = ws.cdcflow(&backfill, &[]);
        assert!(out.status.success(), "{}", output(&out));
        assert_warehouse_matches(&ws, &data, true).await;
    }
    assert_eq!(
        rows(&ws.query(outside).await),
        outside_before,
        "other days untouched"
    );

    let crashed = ws.cdcflow(
        &backfill,
        &[("CDCFLOW_FAILPOINT", "load.between_history_and_current")],
    );
    assert!(!crashed.status.success(), "{}", output(&crashed));
    let rerun = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(rerun.status.success(), "{}", output(&rerun));
    assert_warehouse_matches(&ws, &data, true).await;
}

/// The id of the history MERGE job of `table`'s first batch, from the state
/// store: the batch, and a scope of the destination dataset and the store
/// (sha256 of `project \0 dataset \0 store id`, 6 bytes in hex).
fn first_history_job(ws: &Workspace, table: &str) -> String {
    use sha2::{Digest, Sha256};
    let db = rusqlite::Connection::open(ws.path("state/pipeline.toml.db")).unwrap();
    let batch_id: String = db
        .query_row(
            "SELECT batch_id FROM batches WHERE tbl = ?1 AND batch_no = 1",
            [format!("public.{table}")],
            |row| row.get(0),
        )
        .unwrap();
    let store: String = db
        .query_row("SELECT store_id FROM store", [], |row| row.get(0))
        .unwrap();
    let pipeline = std::fs::read_to_string(ws.path("pipeline.toml")).unwrap();
    let dataset = pipeline
        .lines()
        .find_map(|l| l.strip_prefix("dataset = \""))
        .unwrap()
        .trim_end_matches('"');
    let scope = Sha256::digest(format!("{PROJECT}\0{dataset}\0{store}").as_bytes());
    format!(
        "cdcflow_test_{table}_1_{batch_id}_{}_history",
        hex::encode(&scope[..6])
    )
}

async fn job_exists(endpoint: &str, id: &str) -> bool {
    let url = format!("{endpoint}/bigquery/v2/projects/{PROJECT}/jobs/{id}");
    reqwest::get(url).await.unwrap().status().is_success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_merge_is_recognized_by_its_job_id_and_harmless_without_it() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let crash = [("CDCFLOW_FAILPOINT", "load.between_history_and_current")];
    let verbose = [("RUST_LOG", "cdcflow=info")];

    // 1. The rerun finds the history MERGE done under its id and does not run it again.
    let (ws, data) = bigquery_workspace(&endpoint, 800, 71, 1000, "").await;
    let crashed = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &crash);
    assert!(!crashed.status.success(), "{}", output(&crashed));
    // The abort stops at the first table to reach it; the other may not have merged yet.
    let mut merged = None;
    for table in ["orders", "order_items"] {
        let job = first_history_job(&ws, table);
        if job_exists(&endpoint, &job).await {
            merged = Some(job);
        }
    }
    let job = merged.expect("a history MERGE ran before the abort");
    let rerun = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &verbose);
    assert!(rerun.status.success(), "{}", output(&rerun));
    assert!(
        output(&rerun).contains("job already done; not run again") && output(&rerun).contains(&job),
        "{}",
        output(&rerun)
    );
    assert!(!job_exists(&endpoint, &format!("{job}_2")).await);
    assert_warehouse_matches(&ws, &data, true).await;

    // 2. With the job's record gone, the MERGE runs again and adds nothing.
    let (ws, data) = bigquery_workspace(&endpoint, 800, 72, 1000, "").await;
    let crashed = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &crash);
    assert!(!crashed.status.success(), "{}", output(&crashed));
    let mut deleted = 0;
    for table in ["orders", "order_items"] {
        let job = first_history_job(&ws, table);
        if job_exists(&endpoint, &job).await {
            let url = format!("{endpoint}/bigquery/v2/projects/{PROJECT}/jobs/{job}/delete");
            let answer = reqwest::Client::new().delete(url).send().await.unwrap();
            assert!(answer.status().is_success(), "deleting {job}");
            deleted += 1;
        }
    }
    assert!(deleted > 0, "a history MERGE ran before the abort");
    let rerun = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &verbose);
    assert!(rerun.status.success(), "{}", output(&rerun));
    assert!(
        !output(&rerun).contains("job already done"),
        "{}",
        output(&rerun)
    );
    assert_warehouse_matches(&ws, &data, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_object_is_applied_in_its_place() {
    a_late_object_in("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_object_is_applied_in_its_place_when_merged() {
    a_late_object_in(MERGED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_object_is_applied_in_its_place_in_the_log() {
    a_late_object_in(UNCOMPACTED).await;
}

/// A late object, loaded with the `[warehouse]` keys `extra`, lands in its
/// place among the changes loaded before it.
async fn a_late_object_in(extra: &str) {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(2000, 4);
    let dataset = dataset(&endpoint, &ws).await;
    ws.write_pipeline_into(
        "pipeline.toml",
        1000,
        true,
        "",
        &format!("{}\n{extra}", bigquery(&endpoint, &dataset)),
    );
    for table in ["orders", "order_items"] {
        ws.publish(table, 0..5);
        ws.publish(table, 6..usize::MAX);
    }
    assert!(ws.run_now().await.ok());
    ws.publish("orders", 5..6);
    ws.publish("order_items", 5..6);
    let report = ws.run_now().await;
    assert!(report.tables.iter().all(|t| t.objects == 1), "{report:?}");
    assert_warehouse_matches(&ws, &data, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_datetime_bytes_uuid_and_numeric_columns_keep_their_values() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let dataset = dataset(&endpoint, &ws).await;
    let dir = ws.source().join("public/ev");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("20240101-000000000.csv"),
        "I,1,\"{\"\"a\"\": [1, \"\"x\"\"]}\",2024-01-01 10:20:30.123456,\\x01ff,\
         3e4d1e2a-0000-0000-0000-0000000000aa,12345678901234567890.123456789\n\
         I,2,,,,,\n",
    )
    .unwrap();
    let pipeline = format!(
        "name = \"test\"\n[source]\nurl = \"file://{}\"\n[state]\nurl = \"sqlite://{}/state.db\"\n\
         [warehouse]\n{}\n[[tables]]\nschema = \"public\"\nname = \"ev\"\nprimary_key = [\"id\"]\n\
         columns = [{{ name = \"id\", type = \"bigint\" }}, {{ name = \"doc\", type = \"jsonb\" }}, \
         {{ name = \"at\", type = \"timestamp\" }}, {{ name = \"raw\", type = \"bytea\" }}, \
         {{ name = \"u\", type = \"uuid\" }}, {{ name = \"big\", type = \"decimal(30,9)\" }}]\n",
        ws.source().display(),
        ws.dir.path().display(),
        bigquery(&endpoint, &dataset)
    );
    std::fs::write(ws.path("pipeline.toml"), pipeline).unwrap();
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    let text = |v: &str| cdcflow::synth::Value::Text(v.to_string());
    for table in ["ev", "ev_history"] {
        let got = rows(
            &ws.query(&format!(
                "SELECT TO_JSON_STRING(doc), CAST(at AS STRING), TO_HEX(raw), u, CAST(big AS STRING) \
                 FROM {table} ORDER BY id"
            ))
            .await,
        );
        let null = cdcflow::synth::Value::Null;
        assert_eq!(
            got,
            vec![
                vec![
                    text(r#"{"a":[1,"x"]}"#),
                    text("2024-01-01 10:20:30.123456"),
                    text("01ff"),
                    text("3e4d1e2a-0000-0000-0000-0000000000aa"),
                    text("12345678901234567890.123456789"),
                ],
                vec![null.clone(), null.clone(), null.clone(), null.clone(), null],
            ],
            "{table}"
        );
    }
}

/// `pipeline.toml`: table `public.<table>` (`id bigint` key, `v text`) from
/// the workspace's source with the `[source]` keys `source`, into `warehouse`.
pub(crate) fn write_id_v_pipeline(ws: &Workspace, table: &str, source: &str, warehouse: &str) {
    let pipeline = format!(
        "name = \"test\"\n[source]\nurl = \"file://{}\"\n{source}\n[state]\nurl = \"sqlite://{}/state.db\"\n\
         [warehouse]\n{warehouse}\n[[tables]]\nschema = \"public\"\nname = \"{table}\"\nprimary_key = [\"id\"]\n\
         columns = [{{ name = \"id\", type = \"bigint\" }}, {{ name = \"v\", type = \"text\" }}]\n",
        ws.source().display(),
        ws.dir.path().display(),
    );
    std::fs::write(ws.path("pipeline.toml"), pipeline).unwrap();
}

/// A truncate (`Op` T, written by capture) in the second batch: the row
/// changed before it in the batch and the row loaded before it that the batch
/// does not touch are gone; rows changed after it stay.
async fn a_truncate_removes_every_older_row(ws: &Workspace, warehouse: &str) {
    a_truncate_removes_every_older_row_in(ws, warehouse, true).await;
}

/// [`a_truncate_removes_every_older_row`]; `history`: the warehouse keeps it.
pub(crate) async fn a_truncate_removes_every_older_row_in(
    ws: &Workspace,
    warehouse: &str,
    history: bool,
) {
    let dir = ws.source().join("public/tt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("LOAD00000001.csv"), "1,a\n2,b\n3,c\n").unwrap();
    write_id_v_pipeline(ws, "tt", "", warehouse);
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    std::fs::write(
        dir.join("20240102-000000000.csv"),
        "U,2,b2\nT,,\nI,4,d\nU,3,c3\n",
    )
    .unwrap();
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    let text = |v: &str| cdcflow::synth::Value::Text(v.to_string());
    let got = rows(&ws.query("SELECT v FROM tt ORDER BY id").await);
    assert_eq!(got, vec![vec![text("c3")], vec![text("d")]]);
    if !history {
        return;
    }
    let history = rows(
        &ws.query("SELECT op FROM tt_history ORDER BY change_seq")
            .await,
    );
    let ops: Vec<_> = ["I", "I", "I", "U", "T", "I", "U"]
        .map(|o| vec![text(o)])
        .into();
    assert_eq!(history, ops);
}

/// A late object that updates a key deleted by a newer change loaded
/// before it: the key stays deleted (the delete is its newest change), and
/// another key the late object updates takes the update.
pub(crate) async fn a_late_change_older_than_a_delete_leaves_the_key_deleted(
    ws: &Workspace,
    warehouse: &str,
) {
    let dir = ws.source().join("public/ld");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("20240101-000000000.csv"), "I,1,a\nI,2,b\n").unwrap();
    std::fs::write(dir.join("20240103-000000000.csv"), "D,1,\n").unwrap();
    write_id_v_pipeline(ws, "ld", "", warehouse);
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    std::fs::write(dir.join("20240102-000000000.csv"), "U,1,late\nU,2,b2\n").unwrap();
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    let text = |v: &str| cdcflow::synth::Value::Text(v.to_string());
    let got = rows(&ws.query("SELECT v FROM ld ORDER BY id").await);
    assert_eq!(got, vec![vec![text("b2")]]);
}

in_both_warehouses!(
    a_late_change_older_than_a_delete_in_bigquery,
    a_late_change_older_than_a_delete_in_bigquerys_log,
    a_late_change_older_than_a_delete_in_bigquery_merged,
    a_late_change_older_than_a_delete_in_the_local_warehouse,
    a_late_change_older_than_a_delete_leaves_the_key_deleted
);

in_both_warehouses!(
    a_truncate_in_bigquery,
    a_truncate_in_bigquerys_log,
    a_truncate_in_bigquery_merged,
    a_truncate_in_the_local_warehouse,
    a_truncate_removes_every_older_row
);

/// With a sequence column, a change delivered twice (DMS after a task
/// restart, capture after a crash) carries the same sequence in two objects:
/// history holds it once, whether its first copy was loaded by an earlier
/// batch or is in the same batch. Another key's change that shares the
/// sequence value is a different change and stays.
pub(crate) async fn a_change_delivered_twice_lands_once(ws: &Workspace, warehouse: &str) {
    let dir = ws.source().join("public/t");
    std::fs::create_dir_all(&dir).unwrap();
    let object = |name: &str, rows: &str| std::fs::write(dir.join(name), rows).unwrap();
    object(
        "20240501-100000000.csv",
        "I,2024-05-01 10:00:00,0010,1,first\nI,2024-05-01 10:00:01,0020,2,first\n",
    );
    let source = "timestamp_column = \"ts\"\nextra_columns = [\"seq\"]\nsequence_column = \"seq\"";
    write_id_v_pipeline(ws, "t", source, warehouse);
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    // One batch of two objects: key 2's loaded change again (other values:
    // the first copy is the change, whatever a copy says), key 5's late
    // change (below the loaded maximum, but new), then key 1's new change,
    // which the next object repeats; key 3 is new, and key 4's change shares
    // key 3's sequence value.
    object(
        "20240501-110000000.csv",
        "I,2024-05-01 10:00:01,0020,2,again\nI,2024-05-01 10:00:00,0015,5,late\n\
         U,2024-05-01 11:00:00,0030,1,second\n",
    );
    object(
        "20240501-120000000.csv",
        "U,2024-05-01 11:00:00,0030,1,second\nI,2024-05-01 12:00:00,0040,3,new\n\
         I,2024-05-01 12:00:00,0040,4,new\n",
    );
    // A crash after history took the batch: the run that finishes it must
    // not take the batch's own rows for copies of loaded ones.
    let crashed = ws.cdcflow(
        &["run", "--now", "-p", "pipeline.toml"],
        &[("CDCFLOW_FAILPOINT", "load.between_history_and_current")],
    );
    assert!(!crashed.status.success(), "{}", output(&crashed));
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    let row = |cells: &[&str]| cells.iter().map(|c| Some(c.to_string())).collect();
    let expected: Vec<Vec<Option<String>>> = [
        ["0010", "1", "I", "first"],
        ["0015", "5", "I", "late"],
        ["0020", "2", "I", "first"],
        ["0030", "1", "U", "second"],
        ["0040", "3", "I", "new"],
        ["0040", "4", "I", "new"],
    ]
    .iter()
    .map(|r| row(r))
    .collect();
    let current: Vec<Vec<Option<String>>> = [
        ["1", "second"],
        ["2", "first"],
        ["3", "new"],
        ["4", "new"],
        ["5", "late"],
    ]
    .iter()
    .map(|r| row(r))
    .collect();
    // A backfill of every object loads them again: the same tables.
    for step in ["run", "backfill"] {
        if step == "backfill" {
            let args = [
                "backfill",
                "-p",
                "pipeline.toml",
                "--from",
                "2024-05-01",
                "--to",
                "2024-05-01",
            ];
            let out = ws.cdcflow(&args, &[]);
            assert!(out.status.success(), "{}", output(&out));
        }
        assert_eq!(
            ws.text_rows("SELECT seq, id, op, v FROM t_history").await,
            expected,
            "after the {step}"
        );
        assert_eq!(
            ws.text_rows("SELECT id, v FROM t").await,
            current,
            "after the {step}"
        );
    }
}

in_both_warehouses!(
    a_change_delivered_twice_lands_once_in_bigquery,
    a_change_delivered_twice_lands_once_in_bigquerys_log,
    a_change_delivered_twice_lands_once_in_bigquery_merged,
    a_change_delivered_twice_lands_once_in_the_local_warehouse,
    a_change_delivered_twice_lands_once
);

/// A Parquet object of `fields` and `columns` at `path`.
fn write_parquet(path: &std::path::Path, fields: Vec<Field>, columns: Vec<ArrayRef>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let batch = RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), columns).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// Objects as capture writes them around `ALTER TABLE ta ADD COLUMN tier …
/// DEFAULT 'it''s std'`: its first object carries the value of the rows stored
/// before it (field metadata `cdcflow.existing`). Every current row not
/// changed since has it, a change before it in the same run does not undo
/// it, a NULL written after it stays NULL, and history keeps NULL for the
/// changes made before the column existed.
async fn a_column_added_with_a_default_fills_unchanged_rows(ws: &Workspace, warehouse: &str) {
    let dir = ws.source().join("public/ta");
    let ids =
        |v: &[i64]| std::sync::Arc::new(arrow::array::Int64Array::from(v.to_vec())) as ArrayRef;
    let texts = |v: &[Option<&str>]| std::sync::Arc::new(StringArray::from(v.to_vec())) as ArrayRef;
    let (id, v, op) = (
        Field::new("id", DataType::Int64, false),
        Field::new("v", DataType::Utf8, true),
        Field::new("Op", DataType::Utf8, false),
    );
    write_parquet(
        &dir.join("LOAD00000001.parquet"),
        vec![id.clone(), v.clone()],
        vec![ids(&[1, 2, 3]), texts(&[Some("a"); 3])],
    );
    write_parquet(
        &dir.join("20240501-100000000.parquet"),
        vec![op.clone(), id.clone(), v.clone()],
        vec![texts(&[Some("U")]), ids(&[1]), texts(&[Some("b")])],
    );
    let tier = Field::new("tier", DataType::Utf8, true)
        .with_metadata([("cdcflow.existing".to_string(), "it's std".to_string())].into());
    write_parquet(
        &dir.join("20240501-110000000.parquet"),
        vec![op, id, v, tier],
        vec![
            texts(&[Some("U"), Some("U"), Some("I")]),
            ids(&[2, 3, 4]),
            texts(&[Some("c"), Some("a"), Some("d")]),
            texts(&[Some("it's std"), Some("gold"), None]),
        ],
    );
    std::fs::write(
        ws.path("pipeline.toml"),
        format!(
            "name = \"test\"\n[source]\nurl = \"file://{}\"\n[state]\nurl = \"sqlite://{}/state.db\"\n\
             [warehouse]\n{warehouse}\n[[tables]]\nschema = \"public\"\nname = \"ta\"\nprimary_key = [\"id\"]\n",
            ws.source().display(),
            ws.dir.path().display(),
        ),
    )
    .unwrap();
    let row = |cells: [Option<&str>; 3]| cells.iter().map(|c| c.map(str::to_string)).collect();
    let expected: Vec<Vec<Option<String>>> = vec![
        row([Some("1"), Some("b"), Some("it's std")]),
        row([Some("2"), Some("c"), Some("it's std")]),
        row([Some("3"), Some("a"), Some("gold")]),
        row([Some("4"), Some("d"), None]),
    ];
    // A crash in the batch that adds the column (the second: the first ends
    // before the column's object), after history took it; then the run
    // that finishes it, and one more.
    let args = ["run", "--now", "-p", "pipeline.toml"];
    let crash = [("CDCFLOW_FAILPOINT", "load.between_history_and_current@2")];
    let crashed = ws.cdcflow(&args, &crash);
    assert!(!crashed.status.success(), "{}", output(&crashed));
    for _ in 0..2 {
        let run = ws.cdcflow(&args, &[]);
        assert!(run.status.success(), "{}", output(&run));
        assert_eq!(ws.text_rows("SELECT id, v, tier FROM ta").await, expected);
    }
    let history = ws.text_rows("SELECT id, v, tier FROM ta_history").await;
    let without: Vec<_> = history.iter().filter(|r| r[2].is_none()).collect();
    assert_eq!((history.len(), without.len()), (7, 5), "{history:?}");
}

in_both_warehouses!(
    a_column_added_with_a_default_fills_unchanged_rows_in_bigquery,
    a_column_added_with_a_default_fills_unchanged_rows_in_bigquerys_log,
    a_column_added_with_a_default_fills_unchanged_rows_in_bigquery_merged,
    a_column_added_with_a_default_fills_unchanged_rows_in_the_local_warehouse,
    a_column_added_with_a_default_fills_unchanged_rows
);

/// BigQuery job ids are project-wide and kept for months: the same pipeline
/// loading a second dataset of the project (dev, then prod) must not take
/// the first dataset's jobs for its own and skip its loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_pipeline_into_two_datasets_of_a_project_loads_both() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let (ws, data) = bigquery_workspace(&endpoint, 800, 41, 4, "").await;
    let dev = create_dataset(&endpoint, ws.unique_name("dev", '_')).await;
    ws.write_pipeline_into("dev.toml", 4, true, "", &bigquery(&endpoint, &dev));
    let first = ws.cdcflow(&["run", "--now", "-p", "dev.toml"], &[]);
    assert!(first.status.success(), "{}", output(&first));
    let second = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(second.status.success(), "{}", output(&second));
    assert_warehouse_matches(&ws, &data, true).await;
}

/// Object keys may hold any character: a backfill names its objects to
/// BigQuery as query parameters, so a key with `'` replaces exactly its own
/// rows (before, the MERGE's SQL broke on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_of_keys_with_quotes_replaces_exactly_their_rows() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(600, 42);
    let dataset = dataset(&endpoint, &ws).await;
    for table in ["orders", "order_items"] {
        for rel in staged_objects(&ws.path("staging"), table) {
            let name = rel.file_name().unwrap();
            let to = ws
                .source()
                .join("public")
                .join(table)
                .join("it's odd")
                .join(name);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(ws.path("staging").join(&rel), to).unwrap();
        }
    }
    ws.write_pipeline_into("pipeline.toml", 4, true, "", &bigquery(&endpoint, &dataset));
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    let backfill = ws.cdcflow(&crate::support::BACKFILL_ALL, &[]);
    assert!(backfill.status.success(), "{}", output(&backfill));
    assert_warehouse_matches(&ws, &data, true).await;
}

/// A job insert that reached BigQuery but whose answer was lost is retried,
/// and BigQuery answers the retry 409 "duplicate": the job is ours and
/// running, so cdcflow waits for it instead of stopping the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_job_insert_answered_duplicate_waits_for_the_job() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let (ws, data) = bigquery_workspace(&endpoint, 400, 44, 100, "").await;
    // The first query-job insert reaches the emulator, its answer is lost;
    // the retry of that job is answered as BigQuery answers it (the emulator
    // would run it again).
    let lost = std::sync::Mutex::new(None::<String>);
    let (proxy, injected) = crate::support::http_fault_proxy(endpoint.clone(), move |request| {
        // A job insert under cdcflow's own id (an insert without one is never a duplicate).
        if !request.starts_with("POST /bigquery/v2/projects/") || !request.contains("/jobs ") {
            return None;
        }
        let id = request
            .split(r#""jobId":""#)
            .nth(1)?
            .split('"')
            .next()?
            .to_string();
        if !id.starts_with("cdcflow_") {
            return None;
        }
        let mut lost = lost.lock().unwrap();
        match lost.as_deref() {
            None => {
                *lost = Some(id);
                Some("lost")
            }
            Some(first) if first == id => Some("duplicate"),
            Some(_) => None,
        }
    })
    .await;
    let path = ws.path("pipeline.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace(&endpoint, &proxy)).unwrap();
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    assert_eq!(
        injected.load(Ordering::SeqCst),
        2,
        "a lost answer, then a duplicate"
    );
    assert_warehouse_matches(&ws, &data, true).await;
}

/// `run` and `backfill` SIGKILLed at random moments over a load of one
/// object per batch into BigQuery, then a clean run: the tables equal the
/// replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_killed_at_random_moments_lose_and_double_nothing_in_bigquery() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(800, 45);
    let dataset = dataset(&endpoint, &ws).await;
    ws.write_pipeline_into("pipeline.toml", 1, true, "", &bigquery(&endpoint, &dataset));
    let rounds = crate::chaos::rounds();
    let figures =
        crate::chaos::kill_runs_and_backfills(&ws, rounds, &mut crate::chaos::Delays::new());
    assert_warehouse_matches(&ws, &data, true).await;
    println!(
        "chaos (BigQuery): {} runs and backfills SIGKILLed, {} ended before their kill; {} changes \
         compared with the replay: 0 lost, 0 doubled",
        figures.killed,
        figures.finished,
        data.tables.iter().map(|t| t.changes.len()).sum::<usize>()
    );
}

/// A dataset outside the US with no `location` in the pipeline: cdcflow
/// reads the dataset's location and sends every job there (BigQuery fails
/// jobs sent to another location; the emulator does not, so a proxy records
/// the requests). A `location` that contradicts the dataset's is refused
/// before any job, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_in_the_datasets_own_location() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(300, 61);
    ws.publish_all();
    let dataset =
        create_dataset_in(&endpoint, ws.unique_name("tokyo", '_'), "asia-northeast1").await;
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = requests.clone();
    let (proxy, _) = http_fault_proxy(endpoint.clone(), move |request| {
        seen.lock().unwrap().push(request.to_string());
        None
    })
    .await;
    ws.write_pipeline_into("pipeline.toml", 100, false, "", &bigquery(&proxy, &dataset));
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    assert_warehouse_matches(&ws, &data, false).await;
    let requests = requests.lock().unwrap().clone();
    let jobs: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("POST") && r.contains("/jobs"))
        .collect();
    assert!(jobs.len() >= 4, "jobs sent: {}", jobs.len());
    for job in &jobs {
        assert!(
            job.contains(r#""location":"asia-northeast1""#) && !job.contains(r#""location":"US""#),
            "{job}"
        );
    }

    let wrong = format!("{}\nlocation = \"EU\"", bigquery(&endpoint, &dataset));
    ws.write_pipeline_into("eu.toml", 100, false, "", &wrong);
    let refused = ws.cdcflow(&["run", "--now", "-p", "eu.toml"], &[]);
    let text = output(&refused);
    assert!(!refused.status.success(), "{text}");
    assert!(
        text.contains("in location asia-northeast1") && text.contains("says EU"),
        "{text}"
    );
}

/// A batch job's request as a proxy saw it: its labels and its SQL.
struct SentJob {
    table: String,
    step: String,
    batch: String,
    sql: String,
}

/// A proxy to `endpoint` that keeps every batch job a pipeline inserts.
async fn job_recorder(
    endpoint: String,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<SentJob>>>) {
    let jobs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = jobs.clone();
    let (proxy, _) = http_fault_proxy(endpoint, move |request| {
        let head = request.lines().next().unwrap_or_default();
        let body = request.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if head.starts_with("POST")
            && head.contains("/jobs")
            && let Ok(job) = serde_json::from_str::<serde_json::Value>(body)
        {
            let config = &job["configuration"];
            let label = |k: &str| config["labels"][k].as_str().unwrap_or_default().to_string();
            if !label("cdcflow_step").is_empty() {
                seen.lock().unwrap().push(SentJob {
                    table: label("cdcflow_table"),
                    step: label("cdcflow_step"),
                    batch: label("cdcflow_batch"),
                    sql: config["query"]["query"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                });
            }
        }
        None
    })
    .await;
    (proxy, jobs)
}

/// What BigQuery bills a query for is the columns it reads of the tables it
/// names. With `current = "log"`, no job of a batch names the table's base
/// (the whole current state) except a compaction, and compactions happen
/// only when the log outgrew a share of the base: here at most every other
/// batch, though every batch changes keys already loaded. A late object
/// reads no history. History MERGEs filter on constant commit_ts ranges (the
/// partitioning column, so BigQuery prunes to the batch's days).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reads_only_itself_and_the_base_only_when_the_log_is_compacted() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(1500, 73);
    let dataset = dataset(&endpoint, &ws).await;
    let (proxy, jobs) = job_recorder(endpoint).await;
    let keys = format!("{}\ncompact_ratio = 1.0", bigquery(&proxy, &dataset));
    ws.write_pipeline_into("pipeline.toml", 1, true, "", &keys);
    for table in ["orders", "order_items"] {
        ws.publish(table, 0..3);
        ws.publish(table, 4..usize::MAX);
    }
    assert!(ws.run_now().await.ok());
    ws.publish("orders", 3..4);
    ws.publish("order_items", 3..4);
    assert!(ws.run_now().await.ok());
    assert_warehouse_matches(&ws, &data, true).await;

    let jobs = jobs.lock().unwrap();
    for table in ["orders", "order_items"] {
        let of_table: Vec<&SentJob> = jobs.iter().filter(|j| j.table == table).collect();
        let batches: std::collections::BTreeSet<&str> =
            of_table.iter().map(|j| j.batch.as_str()).collect();
        let compactions = of_table.iter().filter(|j| j.step == "compact").count();
        assert!(batches.len() >= 6, "{table}: {} batches", batches.len());
        assert!(
            compactions >= 1 && compactions * 2 <= batches.len(),
            "{table}: {compactions} compactions in {} batches",
            batches.len()
        );
        let base = format!("{table}__base`");
        for job in &of_table {
            match job.step.as_str() {
                "compact" | "clean" => assert!(job.sql.contains(&base), "{}", job.sql),
                "history" => {
                    assert!(!job.sql.contains(&base), "{}", job.sql);
                    assert!(
                        job.sql.contains(">= TIMESTAMP '") && !job.sql.contains("DATE(h."),
                        "{}",
                        job.sql
                    );
                }
                _ => {
                    assert!(!job.sql.contains(&base), "{} step: {}", job.step, job.sql);
                    assert!(
                        !job.sql.contains(&format!("{table}_history`")),
                        "{}",
                        job.sql
                    );
                }
            }
        }
    }
}

/// The bytes each batch's jobs processed and billed are recorded with the
/// batch (the emulator reports 0, a real BigQuery what it billed), shown by
/// `run` and summed into `/metrics`; a Delta warehouse, which bills
/// nothing, records none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bytes_each_batch_billed_are_recorded_and_shown() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let (ws, _) =
        bigquery_workspace(&endpoint, 600, 75, 2, "maximum_bytes_billed = 1000000000").await;
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    assert!(output(&run).contains("billed"), "{}", output(&run));
    let figures = |file: &str| -> Vec<(Option<i64>, Option<i64>)> {
        rusqlite::Connection::open(ws.path(&format!("state/{file}.db")))
            .unwrap()
            .prepare("SELECT bytes_processed, bytes_billed FROM batches ORDER BY tbl, batch_no")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let batches = figures("pipeline.toml");
    assert!(batches.len() >= 4, "{batches:?}");
    assert!(
        batches.iter().all(|(p, b)| p.is_some() && b.is_some()),
        "{batches:?}"
    );
    for command in ["runs", "status"] {
        let shown = ws.cdcflow(&[command, "-p", "pipeline.toml"], &[]);
        assert!(
            output(&shown).contains("billed"),
            "{command}: {}",
            output(&shown)
        );
    }
    ws.write_pipeline_into("local.toml", 2, true, "", &local_warehouse(&ws));
    let run = ws.cdcflow(&["run", "--now", "-p", "local.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    assert!(!output(&run).contains("billed"), "{}", output(&run));
    assert!(
        figures("local.toml")
            .iter()
            .all(|(p, b)| p.is_none() && b.is_none()),
        "a Delta warehouse bills nothing"
    );
    for command in ["runs", "status"] {
        let shown = ws.cdcflow(&[command, "-p", "local.toml"], &[]);
        assert!(
            !output(&shown).contains("billed"),
            "{command}: {}",
            output(&shown)
        );
    }
}

/// A staged batch larger than an upload chunk goes up in chunks of one
/// resumable session. The connection of one chunk is reset before the
/// chunk arrives, and the answer to another is lost after it arrived: each
/// time cdcflow asks the session how much it holds and goes on from there,
/// so only the chunk that never arrived is sent twice; the table equals the
/// replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_mid_file_resumes_where_the_session_stopped() {
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(40_000, 77);
    ws.publish_all();
    let dataset = dataset(&endpoint, &ws).await;
    let chunks = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let probes = std::sync::Arc::new(AtomicUsize::new(0));
    let (seen, probed) = (chunks.clone(), probes.clone());
    let (proxy, faults) = http_fault_proxy(endpoint, move |request| {
        let head = request.split("\r\n\r\n").next().unwrap_or_default();
        if !head.starts_with("PUT") {
            return None;
        }
        let range = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-range")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        if range.starts_with("bytes */") {
            probed.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        let mut seen = seen.lock().unwrap();
        seen.push(range);
        match seen.len() {
            2 => Some("reset"),
            4 => Some("lost"),
            _ => None,
        }
    })
    .await;
    let keys = format!("{}\nupload_chunk_kib = 256", bigquery(&proxy, &dataset));
    ws.write_pipeline_into(
        "pipeline.toml",
        1000,
        true,
        "max_parallel_tables = 1",
        &keys,
    );
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    assert_warehouse_matches(&ws, &data, true).await;
    let chunks = chunks.lock().unwrap().clone();
    assert_eq!(faults.load(Ordering::SeqCst), 2, "{chunks:?}");
    assert!(probes.load(Ordering::SeqCst) >= 2, "{chunks:?}");
    let mut sent = chunks.clone();
    sent.sort();
    let twice: Vec<&String> = sent
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| &w[0])
        .collect();
    assert_eq!(
        twice,
        vec![&chunks[1]],
        "only the reset chunk is sent again: {chunks:?}"
    );
    assert!(
        chunks.len() >= 5,
        "the batch should span several chunks: {chunks:?}"
    );
}

/// Workload identity federation (an `external_account` credentials file,
/// as for a pod on EKS loading BigQuery): cdcflow reads the subject token
/// from its file, exchanges it at the token URL for an access token with the
/// BigQuery scope, and sends that token with every call. Google's STS cannot
/// run here, so a stand-in on loopback answers the exchange; BigQuery is the
/// emulator behind a proxy that records the calls' tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_federation_exchanges_the_pods_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(endpoint) = peer("CDCFLOW_TEST_BQ_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(300, 79);
    ws.publish_all();
    let dataset = dataset(&endpoint, &ws).await;
    let sts = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sts_url = format!("http://{}/v1/token", sts.local_addr().unwrap());
    let exchanges = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = exchanges.clone();
    tokio::spawn(async move {
        loop {
            let (mut client, _) = sts.accept().await.unwrap();
            let mut request = vec![0u8; 64 * 1024];
            let n = client.read(&mut request).await.unwrap();
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&request[..n]).to_string());
            let body = r#"{"access_token":"federated-token-1","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":3600}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(reply.as_bytes()).await;
        }
    });
    std::fs::write(ws.path("pod-token"), "subject-token-of-the-pod").unwrap();
    let credentials = serde_json::json!({
        "type": "external_account",
        "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/eks/providers/cluster",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": sts_url,
        "credential_source": { "file": ws.path("pod-token").display().to_string() }
    });
    std::fs::write(ws.path("federation.json"), credentials.to_string()).unwrap();
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorded = calls.clone();
    let (proxy, _) = http_fault_proxy(endpoint, move |request| {
        recorded.lock().unwrap().push(
            request
                .split("\r\n\r\n")
                .next()
                .unwrap_or_default()
                .to_string(),
        );
        None
    })
    .await;
    let keys = format!(
        "{}\ncredentials = \"{}\"",
        bigquery(&proxy, &dataset),
        ws.path("federation.json").display()
    );
    ws.write_pipeline_into("pipeline.toml", 100, true, "", &keys);
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    assert_warehouse_matches(&ws, &data, true).await;
    let exchanges = exchanges.lock().unwrap().clone();
    assert!(!exchanges.is_empty(), "the token was never exchanged");
    for exchange in &exchanges {
        assert!(
            exchange.contains("subject_token=subject-token-of-the-pod")
                && exchange.contains("bigquery"),
            "{exchange}"
        );
    }
    let calls = calls.lock().unwrap().clone();
    assert!(calls.len() >= 5, "{calls:?}");
    for call in &calls {
        assert!(
            call.to_ascii_lowercase()
                .contains("authorization: bearer federated-token-1"),
            "a call without the federated token: {call}"
        );
    }
}
