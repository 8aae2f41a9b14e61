//! Delta tables in object storage (moto's S3) with the state in PostgreSQL:
//! what a pod with no volume runs. The tables are read back by a second
//! Delta reader (delta-rs's Python package, `tests/readers/`).

use std::sync::Arc;

use deltalake::arrow::array::RecordBatch as DeltaBatch;
use deltalake::{DeltaTable, DeltaTableBuilder};
use futures::TryStreamExt;
use object_store::ObjectStore;

use crate::s3::{bucket, store};
use crate::support::{
    Workspace, assert_warehouse_matches, expected_history, output, peer, pg_database, replay, rows,
};
use cdcflow::synth::{Dataset, SynthTable, Value};

/// `[warehouse]` keys: Delta tables under `s3://bucket/warehouse` on the
/// peer at `endpoint`.
pub(crate) fn s3_warehouse(endpoint: &str, bucket: &str, deletion_vectors: bool) -> String {
    format!(
        "kind = \"delta\"\npath = \"s3://{bucket}/warehouse\"\nendpoint = \"{endpoint}\"\n\
         allow_http = true\nregion = \"us-east-1\"\ndeletion_vectors = {deletion_vectors}\n\
         options = {{ aws_access_key_id = \"test\", aws_secret_access_key = \"test\" }}"
    )
}

/// Table `name` under `s3://bucket/warehouse`, read by the second reader:
/// `columns` sorted by `key`, as values.
fn read_back(
    python: &str,
    ws: &Workspace,
    (endpoint, bucket): (&str, &str),
    name: &str,
    columns: &[&str],
    key: &[&str],
) -> Vec<Vec<Value>> {
    let out = ws.path(&format!("read-{name}.parquet"));
    let reader = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/readers/delta_to_parquet.py"
    );
    let ran = std::process::Command::new(python)
        .args([
            reader,
            &format!("s3://{bucket}/warehouse/{name}"),
            out.to_str().unwrap(),
            &columns.join(","),
            &key.join(","),
        ])
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .unwrap();
    assert!(ran.status.success(), "second reader: {}", output(&ran));
    let file = std::fs::File::open(&out).unwrap();
    let batches: Vec<arrow::array::RecordBatch> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 8192)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    rows(&batches)
}

/// Asserts that the second reader finds both tables of `data`, current and
/// history, as the replay says.
fn assert_read_back_matches(python: &str, ws: &Workspace, at: (&str, &str), data: &Dataset) {
    for table in &data.tables {
        let SynthTable { columns, .. } = table;
        let key = &columns[..table.key_len];
        assert_eq!(
            read_back(python, ws, at, table.name, columns, key),
            replay(table, false),
            "{}: current state read back from S3",
            table.name
        );
        let mut with_op = columns.clone();
        with_op.push("op");
        assert_eq!(
            read_back(
                python,
                ws,
                at,
                &format!("{}_history", table.name),
                &with_op,
                &["change_seq"]
            ),
            expected_history(table),
            "{}: history read back from S3",
            table.name
        );
    }
}

/// The number of objects under `prefix` in `s3`.
async fn objects_under(s3: &Arc<dyn ObjectStore>, prefix: &str) -> usize {
    let listed: Vec<_> = s3.list(Some(&prefix.into())).try_collect().await.unwrap();
    listed.len()
}

/// The whole product with its tables on `s3://` and its state in
/// PostgreSQL: small batches (deletion vectors, then a compaction once a
/// table has many files), `query`, `history`, a backfill and a vacuum; after
/// each, both cdcflow and a second reader find exactly the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_tables_in_s3_with_the_state_in_postgres_equal_the_replay() {
    let (Some(endpoint), Some(python)) = (
        peer("CDCFLOW_TEST_S3_ENDPOINT"),
        peer("CDCFLOW_TEST_PYTHON"),
    ) else {
        return;
    };
    let ws = Workspace::new();
    let Some((admin, database, state)) = pg_database("CDCFLOW_TEST_PG_URL", &ws, "lake_").await
    else {
        return;
    };
    let bucket = bucket(&endpoint, &ws).await;
    let data = ws.synth(2500, 51);
    ws.publish_all();
    ws.write_pipeline_into(
        "pipeline.toml",
        4,
        false,
        "",
        &s3_warehouse(&endpoint, &bucket, true),
    );
    ws.set_state_url("pipeline.toml", &state);
    let at = (endpoint.as_str(), bucket.as_str());

    let run = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    assert!(
        !ws.path("warehouse").exists(),
        "nothing is written to a local directory"
    );
    assert_warehouse_matches(&ws, &data, false).await;
    assert_read_back_matches(&python, &ws, at, &data);

    // `history` of one key: one line per change of that key.
    let orders = &data.tables[0];
    let id = &orders.changes[orders.changes.len() / 2].values[0];
    let Value::Int(id) = id else {
        panic!("orders.id is an integer: {id:?}")
    };
    let changes = orders
        .changes
        .iter()
        .filter(|c| c.values[0] == Value::Int(*id))
        .count();
    let life = ws.cdcflow(
        &[
            "history",
            "-p",
            "pipeline.toml",
            "-t",
            "orders",
            "-k",
            &id.to_string(),
            "-f",
            "csv",
        ],
        &[],
    );
    assert!(life.status.success(), "{}", output(&life));
    assert_eq!(
        String::from_utf8_lossy(&life.stdout).lines().count(),
        changes + 1,
        "a header and one line per change of order {id}:\n{}",
        output(&life)
    );

    let backfill = ws.cdcflow(&crate::support::BACKFILL_ALL, &[]);
    assert!(backfill.status.success(), "{}", output(&backfill));
    assert_warehouse_matches(&ws, &data, false).await;

    let s3 = store(&endpoint, &bucket);
    let before = objects_under(&s3, "warehouse").await;
    let vacuum = ws.cdcflow(&crate::support::VACUUM_NOW, &[]);
    assert!(vacuum.status.success(), "{}", output(&vacuum));
    let after = objects_under(&s3, "warehouse").await;
    assert!(
        after < before,
        "vacuum deletes the files no version reads: {before} objects before, {after} after\n{}",
        output(&vacuum)
    );
    assert_read_back_matches(&python, &ws, at, &data);
    assert_warehouse_matches(&ws, &data, false).await;
    crate::support::drop_pg_database(&admin, &database).await;
}

/// A Delta commit in S3 is the creation of the next `_delta_log` entry by
/// a conditional put: writers racing for the same version all commit, each
/// at its own version, and no commit overwrites another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_of_a_delta_table_in_s3_all_commit() {
    let Some(endpoint) = peer("CDCFLOW_TEST_S3_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let bucket = bucket(&endpoint, &ws).await;
    ws.write_pipeline_into(
        "pipeline.toml",
        10,
        false,
        "",
        &s3_warehouse(&endpoint, &bucket, true),
    );
    // Opening the pipeline's warehouse makes s3:// commits conditional puts.
    drop(ws.runner());
    let s3 = store(&endpoint, &bucket);
    let url = url::Url::parse(&format!("s3://{bucket}/race/")).unwrap();
    let open = || {
        let (s3, url) = (s3.clone(), url.clone());
        async move {
            let mut table = DeltaTableBuilder::from_url(url.clone())
                .unwrap()
                .with_storage_backend(s3, url)
                .build()
                .unwrap();
            match table.load().await {
                Ok(()) | Err(deltalake::DeltaTableError::NotATable(_)) => table,
                Err(e) => panic!("loading the table: {e}"),
            }
        }
    };
    let row = |n: i64| {
        DeltaBatch::try_from_iter([(
            "n",
            Arc::new(deltalake::arrow::array::Int64Array::from(vec![n]))
                as deltalake::arrow::array::ArrayRef,
        )])
        .unwrap()
    };
    open().await.write(vec![row(0)]).await.unwrap();
    const WRITERS: i64 = 6;
    let mut tables: Vec<DeltaTable> = Vec::new();
    for _ in 0..WRITERS {
        tables.push(open().await);
    }
    assert!(tables.iter().all(|t| t.version() == Some(0)));
    let writes = tables.into_iter().zip(1..).map(|(table, n)| {
        tokio::spawn(async move { table.write(vec![row(n)]).await.map(|t| t.version()) })
    });
    let mut versions = Vec::new();
    for write in futures::future::join_all(writes).await {
        versions.push(write.unwrap().expect("a racing writer commits"));
    }
    versions.sort();
    let expected: Vec<Option<u64>> = (1..=WRITERS as u64).map(Some).collect();
    assert_eq!(versions, expected, "each writer at its own version");
    let last = open().await;
    let rows: i64 = last
        .snapshot()
        .unwrap()
        .log_data()
        .iter()
        .map(|f| f.num_records().unwrap_or(0) as i64)
        .sum();
    assert_eq!(rows, WRITERS + 1, "every writer's row is in the table");
}
