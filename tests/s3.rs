//! The pipeline over a real S3 API (moto, started by `scripts/peers.sh moto start`).
//! Locally a missing peer skips loudly; in CI (`CI` set) it fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    SERVICE_UNAVAILABLE, Workspace, assert_warehouse_matches, faulty_proxy, output, peer,
    staged_objects,
};

/// A fresh bucket on the peer (moto accepts an unsigned create).
pub(crate) async fn bucket(endpoint: &str, ws: &Workspace) -> String {
    let name = ws.unique_name("cdcflow", '-');
    let addr = endpoint.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!(
            "PUT /{name} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "creating bucket {name}: {reply}"
    );
    name
}

pub(crate) fn store(endpoint: &str, bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap(),
    )
}

/// Uploads files below `root` to `prefix/` (relative paths kept), 32 at a time.
async fn upload(
    store: &Arc<dyn ObjectStore>,
    root: &std::path::Path,
    files: Vec<std::path::PathBuf>,
    prefix: &str,
) {
    futures::stream::iter(files)
        .map(|rel| {
            let store = store.clone();
            let bytes = std::fs::read(root.join(&rel)).unwrap();
            let key = StorePath::from(format!("{prefix}/{}", rel.display()));
            async move { store.put(&key, PutPayload::from(bytes)).await.unwrap() }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

/// A bucket holding a generated dataset (both tables) under `dms/`.
async fn staged_bucket(
    endpoint: &str,
    ws: &Workspace,
    changes: usize,
    seed: u64,
) -> (cdcflow::synth::Dataset, String) {
    let data = ws.synth(changes, seed);
    let bucket = bucket(endpoint, ws).await;
    let s3 = store(endpoint, &bucket);
    for table in ["orders", "order_items"] {
        upload(
            &s3,
            &ws.path("staging"),
            staged_objects(&ws.path("staging"), table),
            "dms",
        )
        .await;
    }
    (data, bucket)
}

/// Points `pipeline.toml` at `s3://bucket/dms` through `endpoint`.
fn s3_pipeline(ws: &Workspace, endpoint: &str, bucket: &str, extra_source: &str, key: &str) {
    let local = std::fs::read_to_string(ws.write_pipeline(1000, false)).unwrap();
    let source_line = local
        .lines()
        .find(|l| l.starts_with("url = \"file://"))
        .unwrap()
        .to_string();
    let s3 = format!(
        "url = \"s3://{bucket}/dms\"\nendpoint = \"{endpoint}\"\nallow_http = true\nregion = \"us-east-1\"\n{extra_source}\n\
         options = {{ aws_access_key_id = \"{key}\", aws_secret_access_key = \"s3cr3t-value\" }}"
    );
    std::fs::write(
        ws.path("pipeline.toml"),
        local.replacen(&source_line, &s3, 1),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_over_s3_gives_the_same_tables() {
    let Some(endpoint) = peer("CDCFLOW_TEST_S3_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let (data, bucket) = staged_bucket(&endpoint, &ws, 2000, 41).await;
    s3_pipeline(&ws, &endpoint, &bucket, "", "test");
    let report = ws.run_now().await;
    assert!(report.ok(), "{report:?}");
    assert_warehouse_matches(&ws, &data, false).await;
    // the secret appears nowhere a user sees it
    let status = ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]);
    assert!(
        status.status.success() && !output(&status).contains("s3cr3t-value"),
        "{}",
        output(&status)
    );
    let invalid = std::fs::read_to_string(ws.path("pipeline.toml"))
        .unwrap()
        .replace("aws_secret_access_key", "aws_secret_acces_key");
    std::fs::write(ws.path("bad.toml"), invalid).unwrap();
    let validate = ws.cdcflow(&["validate", "-p", "bad.toml"], &[]);
    assert!(
        output(&validate).contains("`source.options.aws_secret_acces_key`")
            && !output(&validate).contains("s3cr3t-value"),
        "{}",
        output(&validate)
    );
}

/// Writes `n` one-row CDC objects of table `public.events`, one minute apart from `start`
/// (DMS writes a CDC file about once a minute by default).
fn events(
    dir: &std::path::Path,
    from: usize,
    n: usize,
    start: chrono::DateTime<chrono::Utc>,
) -> Vec<std::path::PathBuf> {
    (from..from + n)
        .map(|i| {
            let t = start + chrono::Duration::minutes(i as i64);
            let rel = std::path::PathBuf::from(format!(
                "public/events/{}/{}.csv",
                t.format("%Y/%m/%d"),
                t.format("%Y%m%d-%H%M%S%3f")
            ));
            std::fs::create_dir_all(dir.join(&rel).parent().unwrap()).unwrap();
            std::fs::write(
                dir.join(&rel),
                format!("I,{},{i},event {i}\n", t.format("%Y-%m-%d %H:%M:%S%.6f")),
            )
            .unwrap();
            rel
        })
        .collect()
}

fn events_pipeline(ws: &Workspace, endpoint: &str, bucket: &str, full: &str) {
    let text = format!(
        r#"name = "events"
[source]
url = "s3://{bucket}/dms"
endpoint = "{endpoint}"
allow_http = true
region = "us-east-1"
timestamp_column = "ts"
lateness = "1h"
full_listing_every = "{full}"
[source.options]
aws_access_key_id = "test"
aws_secret_access_key = "test"
[state]
url = "sqlite://{dir}/state.db"
[warehouse]
kind = "local"
path = "{dir}/warehouse"
[[tables]]
schema = "public"
name = "events"
primary_key = ["id"]
columns = [{{ name = "id", type = "bigint" }}, {{ name = "v", type = "text" }}]
"#,
        dir = ws.dir.path().display()
    );
    std::fs::write(ws.path("pipeline.toml"), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_objects_then_incremental_runs() {
    let Some(endpoint) = peer("CDCFLOW_TEST_S3_ENDPOINT") else {
        return;
    };
    const N: usize = 20_000;
    let ws = Workspace::new();
    let bucket = bucket(&endpoint, &ws).await;
    let s3 = store(&endpoint, &bucket);
    let start = chrono::DateTime::parse_from_rfc3339("2024-05-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let files = events(&ws.path("events"), 0, N, start);
    let uploaded = Instant::now();
    upload(&s3, &ws.path("events"), files, "dms").await;
    eprintln!(
        "uploaded {N} objects in {:.1} s",
        uploaded.elapsed().as_secs_f64()
    );
    events_pipeline(&ws, &endpoint, &bucket, "1h");

    let runner = ws.runner();
    let listed = Instant::now();
    let listing = runner
        .source()
        .list_table("public", "events", None)
        .await
        .unwrap();
    let seconds = listed.elapsed().as_secs_f64();
    assert_eq!(listing.objects.len(), N);
    assert_eq!(
        listing.requests,
        N.div_ceil(1000) as u64,
        "a full listing is one request per 1000 keys"
    );
    eprintln!(
        "full listing: {N} objects, {} requests, {seconds:.2} s, {:.0} objects/s",
        listing.requests,
        N as f64 / seconds
    );

    let first = ws.run_now().await;
    assert!(first.ok(), "{first:?}");
    assert_eq!(first.tables[0].objects, N);

    // New objects, one late with an older name (inside the lateness window), and one changed after loading.
    let mut new = events(&ws.path("events"), N, 3, start);
    let late_time = start + chrono::Duration::minutes(N as i64 - 30);
    let late = std::path::PathBuf::from(format!(
        "public/events/{}/{}.csv",
        late_time.format("%Y/%m/%d"),
        (late_time + chrono::Duration::milliseconds(500)).format("%Y%m%d-%H%M%S%3f")
    ));
    std::fs::write(
        ws.path("events").join(&late),
        format!(
            "U,{},5,late update\n",
            late_time.format("%Y-%m-%d %H:%M:%S%.6f")
        ),
    )
    .unwrap();
    new.push(late);
    let changed = events(&ws.path("events"), N - 10, 1, start);
    std::fs::write(
        ws.path("events").join(&changed[0]),
        "I,2024-05-14 21:10:00.000000,19990,rewritten\n",
    )
    .unwrap();
    new.extend(changed.clone());
    upload(&s3, &ws.path("events"), new, "dms").await;

    let second = ws.run_now().await;
    let t = &second.tables[0];
    assert_eq!(t.objects, 4, "only the new objects: {second:?}");
    assert_eq!(
        t.list_requests, 1,
        "an incremental listing is one request: {second:?}"
    );
    assert!(
        t.listed < 100,
        "listed {} objects, not the whole prefix",
        t.listed
    );
    assert_eq!(t.changed, vec![changed[0].display().to_string()]);
    eprintln!(
        "incremental run: {} objects listed with {} request(s)",
        t.listed, t.list_requests
    );

    let third = ws.run_now().await;
    assert_eq!(
        (third.tables[0].objects, third.tables[0].list_requests),
        (0, 1),
        "{third:?}"
    );
    let counts = ws
        .query("SELECT count(*), count(DISTINCT source_file) FROM events_history")
        .await;
    assert_eq!(
        crate::support::rows(&counts)[0],
        vec![
            cdcflow::synth::Value::Int(N as i64 + 4),
            cdcflow::synth::Value::Int(N as i64 + 4)
        ]
    );
    let id5 = ws.query("SELECT v FROM events WHERE id = 5").await;
    assert_eq!(
        crate::support::rows(&id5),
        vec![vec![cdcflow::synth::Value::Text("late update".into())]]
    );

    // An object later than the lateness window is not seen by incremental listings,
    // but the next full listing takes it, once.
    let very_late = std::path::PathBuf::from("public/events/2024/05/02/20240502-000000500.csv");
    std::fs::create_dir_all(ws.path("events/public/events/2024/05/02")).unwrap();
    std::fs::write(
        ws.path("events").join(&very_late),
        "U,2024-05-02 00:00:00.000000,7,very late\n",
    )
    .unwrap();
    upload(&s3, &ws.path("events"), vec![very_late], "dms").await;
    assert_eq!(
        ws.run_now().await.tables[0].objects,
        0,
        "outside the window, before the next full listing"
    );
    events_pipeline(&ws, &endpoint, &bucket, "1s");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let full = ws.run_now().await;
    assert_eq!(
        (full.tables[0].objects, full.tables[0].list_requests),
        (1, 21),
        "{full:?}"
    );
    assert_eq!(ws.run_now().await.tables[0].objects, 0, "taken once");
    let id7 = ws.query("SELECT v FROM events WHERE id = 7").await;
    assert_eq!(
        crate::support::rows(&id7),
        vec![vec![cdcflow::synth::Value::Text("very late".into())]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried() {
    let Some(endpoint) = peer("CDCFLOW_TEST_S3_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let (data, bucket) = staged_bucket(&endpoint, &ws, 800, 42).await;
    let (proxy, served) = faulty_proxy(endpoint.clone(), &[SERVICE_UNAVAILABLE; 3]).await;
    s3_pipeline(&ws, &proxy, &bucket, "", "test");
    let report = ws.run_now().await;
    assert!(report.ok(), "{report:?}");
    assert!(
        served.load(Ordering::SeqCst) > 3,
        "the proxy failed 3 connections and then served"
    );
    assert_warehouse_matches(&ws, &data, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_missing_buckets_say_what_to_fix() {
    let (Some(endpoint), Some(auth)) = (
        peer("CDCFLOW_TEST_S3_ENDPOINT"),
        peer("CDCFLOW_TEST_S3_AUTH_ENDPOINT"),
    ) else {
        return;
    };
    let ws = Workspace::new();
    s3_pipeline(&ws, &auth, "any-bucket", "", "AKIAWRONGKEY");
    let out = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", output(&out));
    assert!(
        output(&out).contains("access denied: check the credentials")
            && output(&out).contains("after 1 tries"),
        "not retried:\n{}",
        output(&out)
    );
    assert!(!output(&out).contains("s3cr3t-value"), "{}", output(&out));

    s3_pipeline(&ws, &endpoint, "no-such-bucket-cdcflow", "", "test");
    let out = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", output(&out));
    assert!(
        output(&out).contains("not found: check the bucket"),
        "{}",
        output(&out)
    );
}

/// Every third S3 request fails in one of six ways (503, SlowDown, 429, a
/// reset connection, a body cut in half, a stalled answer): transient faults
/// are retried, and a body cut short is never taken for a whole object or a
/// whole listing; the tables equal the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_faults_of_every_kind_are_retried_and_a_short_body_is_never_taken_whole() {
    let Some(endpoint) = peer("CDCFLOW_TEST_S3_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let (data, bucket) = staged_bucket(&endpoint, &ws, 800, 43).await;
    let (proxy, injected) =
        crate::support::http_fault_proxy(endpoint.clone(), crate::support::every_nth(3)).await;
    s3_pipeline(&ws, &proxy, &bucket, "", "test");
    // Table-level retries come after object_store's own: make them quick.
    let path = ws.path("pipeline.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}\n[retries]\ncount = 10\ndelay = \"100ms\"\nmax_delay = \"1s\"\n"),
    )
    .unwrap();
    let out = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(out.status.success(), "{}", output(&out));
    let faults = injected.load(Ordering::SeqCst);
    assert!(
        faults >= crate::support::FAULTS.len(),
        "every kind injected: {faults}"
    );
    assert_warehouse_matches(&ws, &data, false).await;
    println!("chaos (S3): {faults} faults injected, every kind; 0 lost, 0 doubled");
}
