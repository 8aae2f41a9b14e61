//! Shared helpers: a scratch workspace with a generated dataset and a
//! pipeline file, the binary, and an independent model of the expected tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Decimal128Type, Int16Type, Int32Type, Int64Type, TimestampMicrosecondType,
};
use cdcflow::decode::Op;
use cdcflow::pipeline::Runner;
use cdcflow::synth::{Dataset, Options, SynthTable, Value};

/// A temporary directory holding `source/`, `warehouse/`, `state/` and `pipeline.toml`.
pub(crate) struct Workspace {
    pub(crate) dir: tempfile::TempDir,
}

impl Workspace {
    pub(crate) fn new() -> Self {
        Workspace {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A name unique to this workspace: `prefix` + its directory name in
    /// lowercase, with any other character than a-z and 0-9 as `sep`.
    pub(crate) fn unique_name(&self, prefix: &str, sep: char) -> String {
        let dir = self.dir.path().file_name().unwrap().to_string_lossy();
        let tail: String = dir
            .to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { sep })
            .collect();
        format!("{prefix}{tail}")
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub(crate) fn source(&self) -> PathBuf {
        self.path("source")
    }

    /// A workspace whose source holds a whole generated dataset, with a pipeline
    /// (batches of `max_objects`, extra top-level keys `top`).
    pub(crate) fn published(
        changes: usize,
        seed: u64,
        max_objects: usize,
        top: &str,
    ) -> (Self, Dataset) {
        let ws = Workspace::new();
        let data = ws.synth(changes, seed);
        ws.publish_all();
        ws.write_pipeline_with(max_objects, false, top);
        (ws, data)
    }

    /// Generates a dataset into `staging/` (all of it) and returns it.
    pub(crate) fn synth(&self, changes: usize, seed: u64) -> Dataset {
        let options = Options {
            changes,
            seed,
            formats: Default::default(),
        };
        cdcflow::synth::write_dataset(&self.path("staging"), &options).expect("synth")
    }

    /// Copies the staged objects of `table` whose index is in `range` (change order) into `source/`.
    pub(crate) fn publish(&self, table: &str, range: std::ops::Range<usize>) {
        for (i, rel) in staged_objects(&self.path("staging"), table)
            .into_iter()
            .enumerate()
        {
            if range.contains(&i) {
                let to = self.source().join(&rel);
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(self.path("staging").join(&rel), to).unwrap();
            }
        }
    }

    /// Overwrites the published object `index` of `table` with a line no
    /// decoder takes; returns its key under the source.
    pub(crate) fn break_object(&self, table: &str, index: usize) -> PathBuf {
        let key = staged_objects(&self.path("staging"), table).swap_remove(index);
        std::fs::write(self.source().join(&key), "I,not a time,x,y\n").unwrap();
        key
    }

    /// A folder `pipelines/` holding `pipeline.toml` (for `serve` and `schedule`).
    pub(crate) fn pipelines_folder(&self) {
        std::fs::create_dir_all(self.path("pipelines")).unwrap();
        std::fs::copy(self.path("pipeline.toml"), self.path("pipelines/test.toml")).unwrap();
    }

    /// Publishes every staged object of both tables.
    pub(crate) fn publish_all(&self) {
        self.publish("orders", 0..usize::MAX);
        self.publish("order_items", 0..usize::MAX);
    }

    /// Writes `pipeline.toml` over the generated tables.
    pub(crate) fn write_pipeline(&self, max_objects: usize, items_soft_delete: bool) -> PathBuf {
        self.write_pipeline_with(max_objects, items_soft_delete, "")
    }

    /// Like [`Self::write_pipeline`], with extra top-level keys (schedule, retries…).
    pub(crate) fn write_pipeline_with(
        &self,
        max_objects: usize,
        items_soft_delete: bool,
        top: &str,
    ) -> PathBuf {
        let local = format!(
            "kind = \"local\"\npath = \"{}/warehouse\"",
            self.dir.path().display()
        );
        self.write_pipeline_into("pipeline.toml", max_objects, items_soft_delete, top, &local)
    }

    /// Writes the pipeline file `file` with the `[warehouse]` keys `warehouse`.
    pub(crate) fn write_pipeline_into(
        &self,
        file: &str,
        max_objects: usize,
        items_soft_delete: bool,
        top: &str,
        warehouse: &str,
    ) -> PathBuf {
        let text = format!(
            r#"
name = "test"
{top}
[source]
url = "file://{source}"
timestamp_column = "dms_timestamp"
[state]
url = "sqlite://{dir}/state/{file}.db"
[warehouse]
{warehouse}
[batch]
max_objects = {max_objects}
[[tables]]
schema = "public"
name = "orders"
primary_key = ["id"]
columns = [
  {{ name = "id", type = "bigint" }},
  {{ name = "customer", type = "text" }},
  {{ name = "amount", type = "decimal(12,2)" }},
  {{ name = "status", type = "text" }},
  {{ name = "note", type = "text" }},
  {{ name = "created_at", type = "timestamptz" }},
]
[[tables]]
schema = "public"
name = "order_items"
primary_key = ["order_id", "line_no"]
soft_delete = {items_soft_delete}
"#,
            source = self.source().display(),
            dir = self.dir.path().display(),
        );
        let path = self.path(file);
        std::fs::create_dir_all(self.source()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `pipeline.toml` over table `public.big` (key `id`, `columns` as given)
    /// with a local warehouse and the `[batch]` keys `batch`.
    pub(crate) fn write_big_pipeline(&self, columns: &str, batch: &str) {
        std::fs::write(
            self.path("pipeline.toml"),
            format!(
                "name = \"big\"\n[source]\nurl = \"file://{}\"\ntimestamp_column = \"ts\"\n[state]\nurl = \"sqlite://{}/s.db\"\n\
                 [warehouse]\nkind = \"local\"\npath = \"{}/wh\"\n[batch]\n{batch}\n[[tables]]\nschema = \"public\"\nname = \"big\"\nprimary_key = [\"id\"]\n{columns}\n",
                self.source().display(),
                self.dir.path().display(),
                self.dir.path().display()
            ),
        )
        .unwrap();
    }

    /// Points the pipeline file `file` at the state store `url`.
    pub(crate) fn set_state_url(&self, file: &str, url: &str) {
        let path = self.path(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let (head, tail) = text.split_once("[state]\nurl = ").expect("a [state] url");
        let rest = tail.split_once('\n').map_or("", |(_, rest)| rest);
        std::fs::write(&path, format!("{head}[state]\nurl = \"{url}\"\n{rest}")).unwrap();
    }

    pub(crate) fn runner(&self) -> Runner {
        self.runner_for("pipeline.toml")
    }

    /// A runner of the pipeline file `file`.
    pub(crate) fn runner_for(&self, file: &str) -> Runner {
        Runner::open(cdcflow::config::load(&self.path(file)).expect("valid pipeline"))
            .expect("runner")
    }

    /// A manual run over everything new, through the library.
    pub(crate) async fn run_now(&self) -> cdcflow::pipeline::RunReport {
        self.runner()
            .run(
                cdcflow::state::Trigger::Manual,
                None,
                &cdcflow::shutdown::Shutdown::default(),
            )
            .await
            .expect("run")
    }

    /// The binary, to run in the workspace.
    pub(crate) fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdcflow"));
        cmd.current_dir(self.dir.path())
            .args(args)
            .env_remove("CDCFLOW_FAILPOINT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the binary in the workspace.
    pub(crate) fn cdcflow(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.spawned(args, env).finish()
    }

    /// Starts the binary with its output piped.
    fn spawned(&self, args: &[&str], env: &[(&str, &str)]) -> Running {
        let child = self
            .command(args, env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run cdcflow");
        Running {
            child,
            args: args.join(" "),
        }
    }

    /// Runs the binary like [`Workspace::cdcflow`] and watches its peak
    /// resident memory (the kernel's `VmHWM`, read every 10 ms until it
    /// exits): its output and that peak in MiB.
    pub(crate) fn cdcflow_peak_mib(&self, args: &[&str], env: &[(&str, &str)]) -> (Output, u64) {
        let running = self.spawned(args, env);
        let status = format!("/proc/{}/status", running.child.id());
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut peak_kib = 0u64;
                while !done.load(Ordering::SeqCst) {
                    if let Ok(text) = std::fs::read_to_string(&status)
                        && let Some(line) = text.lines().find(|l| l.starts_with("VmHWM:"))
                    {
                        let kib = line.split_whitespace().nth(1).and_then(|v| v.parse().ok());
                        peak_kib = peak_kib.max(kib.unwrap_or(0));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                peak_kib
            })
        };
        let out = running.finish();
        done.store(true, Ordering::SeqCst);
        (out, watcher.join().unwrap() / 1024)
    }

    /// Runs SQL over the warehouse of `pipeline.toml` with the library.
    pub(crate) async fn query(&self, sql: &str) -> Vec<RecordBatch> {
        self.runner().query(sql).await.expect("query")
    }
}

/// The seed in environment variable `var`, else one from the clock (never 0).
pub(crate) fn seed_from(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

/// `cdcflow backfill` of every date, with `pipeline.toml`.
pub(crate) const BACKFILL_ALL: [&str; 7] = [
    "backfill",
    "-p",
    "pipeline.toml",
    "--from",
    "2000-01-01",
    "--to",
    "2100-01-01",
];

/// For each table of `pipeline.toml`, the number of its recent runs that
/// hold an attempt of that table for which `counts` is true.
pub(crate) fn runs_per_table(
    ws: &Workspace,
    counts: impl Fn(&cdcflow::state::TaskAttempt) -> bool,
) -> Vec<(String, usize)> {
    let pipeline = cdcflow::config::load(&ws.path("pipeline.toml")).unwrap();
    let state = cdcflow::state::open(&pipeline.state, &pipeline.name).unwrap();
    let runs = state.recent_runs(50).unwrap();
    pipeline
        .tables
        .iter()
        .map(|table| {
            let key = table.qualified();
            let n = runs
                .iter()
                .filter(|r| r.attempts.iter().any(|a| a.table == key && counts(a)))
                .count();
            (key, n)
        })
        .collect()
}

/// `cdcflow vacuum` of every file no version reads, now, with `pipeline.toml`.
pub(crate) const VACUUM_NOW: [&str; 6] = [
    "vacuum",
    "-p",
    "pipeline.toml",
    "--retain-hours",
    "0",
    "--force",
];

/// Everything a finished process printed, stdout then stderr.
pub(crate) fn output(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Object paths of a table under `root`, in DMS change order (LOAD files, then CDC by name).
pub(crate) fn staged_objects(root: &Path, table: &str) -> Vec<PathBuf> {
    let base = root.join("public").join(table);
    let mut found = Vec::new();
    let mut stack = vec![base.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let rank = |p: &PathBuf| {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        (!name.starts_with("LOAD"), name)
    };
    found.sort_by_key(rank);
    found
}

/// Converts query results to rows of generator values, independently of cdcflow's code.
pub(crate) fn rows(batches: &[RecordBatch]) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            out.push(
                batch
                    .columns()
                    .iter()
                    .map(|col| value(col.as_ref(), row))
                    .collect(),
            );
        }
    }
    out
}

fn value(col: &dyn Array, row: usize) -> Value {
    if col.is_null(row) {
        return Value::Null;
    }
    match col.data_type() {
        DataType::Int16 => Value::Int(col.as_primitive::<Int16Type>().value(row).into()),
        DataType::Int32 => Value::Int(col.as_primitive::<Int32Type>().value(row).into()),
        DataType::Int64 => Value::Int(col.as_primitive::<Int64Type>().value(row)),
        DataType::Date32 => Value::Int(
            col.as_primitive::<arrow::datatypes::Date32Type>()
                .value(row)
                .into(),
        ),
        DataType::Boolean => Value::Int(col.as_boolean().value(row).into()),
        // BigQuery answers NUMERIC as decimal(38,9); generated decimals have
        // scale 2, so such values are compared at scale 2, exactly.
        DataType::Decimal128(38, 9) => {
            let value = col.as_primitive::<Decimal128Type>().value(row);
            assert_eq!(
                value % 10_000_000,
                0,
                "NUMERIC {value} is not exact at scale 2"
            );
            Value::Decimal(value / 10_000_000)
        }
        DataType::Decimal128(..) => Value::Decimal(col.as_primitive::<Decimal128Type>().value(row)),
        DataType::Utf8 => Value::Text(col.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Value::Text(col.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Value::Text(col.as_string_view().value(row).to_string()),
        DataType::Timestamp(..) => {
            Value::Micros(col.as_primitive::<TimestampMicrosecondType>().value(row))
        }
        other => panic!("unexpected type {other}"),
    }
}

/// The expected current state: replay every change in order over a map.
/// With `soft_delete`, deleted keys stay with a trailing flag 1 (else 0).
pub(crate) fn replay(table: &SynthTable, soft_delete: bool) -> Vec<Vec<Value>> {
    let mut state: BTreeMap<Vec<Value>, Vec<Value>> = BTreeMap::new();
    for change in &table.changes {
        let key = change.values[..table.key_len].to_vec();
        let mut row = change.values.clone();
        match (change.op, soft_delete) {
            (Op::Delete, false) => {
                state.remove(&key);
            }
            (op, true) => {
                row.push(Value::Int((op == Op::Delete).into()));
                state.insert(key, row);
            }
            (_, false) => {
                state.insert(key, row);
            }
        }
    }
    state.into_values().collect()
}

/// The expected history: every change with its op, in order.
pub(crate) fn expected_history(table: &SynthTable) -> Vec<Vec<Value>> {
    table
        .changes
        .iter()
        .map(|c| {
            let mut row = c.values.clone();
            row.push(Value::Text(c.op.as_str().to_string()));
            row
        })
        .collect()
}

/// `SELECT <columns> FROM <t>` in key order, as values.
pub(crate) async fn current_rows(
    ws: &Workspace,
    table: &SynthTable,
    soft_delete: bool,
) -> Vec<Vec<Value>> {
    current_rows_of(&ws.runner(), table, table.name, soft_delete).await
}

/// `SELECT <columns> FROM <target>` in key order, as values, in the
/// warehouse of `runner`; `target` holds the changes of `table`.
async fn current_rows_of(
    runner: &Runner,
    table: &SynthTable,
    target: &str,
    soft_delete: bool,
) -> Vec<Vec<Value>> {
    let mut cols: Vec<String> = table.columns.iter().map(|c| c.to_string()).collect();
    if soft_delete {
        cols.push("deleted".into());
    }
    let key = table.columns[..table.key_len].join(", ");
    let sql = format!("SELECT {} FROM {target} ORDER BY {key}", cols.join(", "));
    rows(&runner.query(&sql).await.expect("query"))
}

/// `SELECT <columns>, op FROM <t>_history ORDER BY change_seq`, as values.
pub(crate) async fn history_rows(ws: &Workspace, table: &SynthTable) -> Vec<Vec<Value>> {
    history_rows_of(&ws.runner(), table, table.name).await
}

/// [`history_rows`] of `<target>_history` in the warehouse of `runner`.
async fn history_rows_of(runner: &Runner, table: &SynthTable, target: &str) -> Vec<Vec<Value>> {
    let sql = format!(
        "SELECT {}, op FROM {target}_history ORDER BY change_seq",
        table.columns.join(", "),
    );
    rows(&runner.query(&sql).await.expect("query"))
}

/// Asserts that both tables of `data` are exactly as the replay says.
pub(crate) async fn assert_warehouse_matches(
    ws: &Workspace,
    data: &Dataset,
    items_soft_delete: bool,
) {
    let runner = ws.runner();
    for table in &data.tables {
        let soft = items_soft_delete && table.name == "order_items";
        assert_table_matches(&runner, table, table.name, soft).await;
    }
}

/// Asserts that `target`, loaded from the changes of `table`, is exactly as
/// the replay says in the warehouse of `runner`: current state and history.
pub(crate) async fn assert_table_matches(
    runner: &Runner,
    table: &SynthTable,
    target: &str,
    soft_delete: bool,
) {
    let expected = replay(table, soft_delete);
    let actual = current_rows_of(runner, table, target, soft_delete).await;
    assert_eq!(actual.len(), expected.len(), "{target}: current row count");
    assert_eq!(
        actual, expected,
        "{target}: current state differs from the replay"
    );
    let history = history_rows_of(runner, table, target).await;
    assert_eq!(
        history.len(),
        table.changes.len(),
        "{target}: history row count (no loss, no duplicate)"
    );
    assert_eq!(
        history,
        expected_history(table),
        "{target}: history order differs"
    );
}

/// The URL in `var` (set by `eval "$(scripts/peers.sh all env)"`). Locally a
/// missing peer skips its test loudly; in CI (`CI` set) it fails.
pub(crate) fn peer(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) => Some(url),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!(
                "{var} is not set: CI must run this test (scripts/peers.sh all start; eval \"$(scripts/peers.sh all env)\")"
            )
        }
        Err(_) => {
            eprintln!(
                "SKIPPED: {var} is not set; start the peers with `scripts/peers.sh all start` and `eval \"$(scripts/peers.sh all env)\"`"
            );
            None
        }
    }
}

/// A client of the PostgreSQL server at `url` (no TLS), its connection driven in the background.
pub(crate) async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A fresh database, named `prefix` + the workspace's name, on the
/// PostgreSQL server whose URL is in `var`: (an admin client, its name, its URL).
pub(crate) async fn pg_database(
    var: &str,
    ws: &Workspace,
    prefix: &str,
) -> Option<(tokio_postgres::Client, String, String)> {
    let base = peer(var)?;
    let admin = pg_connect(&base).await;
    let name = ws.unique_name(prefix, '_');
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    Some((admin, name, url))
}

/// Drops a database made by [`pg_database`], with its sessions.
pub(crate) async fn drop_pg_database(admin: &tokio_postgres::Client, name: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
}

/// An answer of [`faulty_proxy`]: the server is down for a moment.
pub(crate) const SERVICE_UNAVAILABLE: &str = "503 Service Unavailable";
/// An answer of [`faulty_proxy`]: slow down.
pub(crate) const TOO_MANY_REQUESTS: &str = "429 Too Many Requests";

/// A TCP proxy to `upstream` that answers its first connections with the
/// statuses of `answers` (one each, then closes) and forwards the rest.
/// Returns its URL and the number of connections it has seen.
pub(crate) async fn faulty_proxy(
    upstream: String,
    answers: &[&'static str],
) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let answers = answers.to_vec();
    tokio::spawn(async move {
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            if let Some(status) = answers.get(count.fetch_add(1, Ordering::SeqCst)).copied() {
                tokio::spawn(async move {
                    let mut head = vec![0u8; 16 * 1024];
                    let _ = client.read(&mut head).await;
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = client.write_all(reply.as_bytes()).await;
                });
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut server =
                    tokio::net::TcpStream::connect(upstream.trim_start_matches("http://"))
                        .await
                        .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (format!("http://{addr}"), served)
}

/// Each boundary of capture's write protocol, at the first and the second chunk of a run.
pub(crate) fn capture_failpoints() -> impl Iterator<Item = String> {
    cdcflow::failpoint::CAPTURE_NAMES
        .iter()
        .flat_map(|name| [format!("{name}@1"), format!("{name}@2")])
}

impl Workspace {
    /// `capture --once` crashing at `failpoint` (`name@n`), which it must reach.
    pub(crate) fn capture_crashing_at(&self, failpoint: &str) {
        let crashed = self.cdcflow(
            &["capture", "--config", "capture.toml", "--once"],
            &[("CDCFLOW_FAILPOINT", failpoint)],
        );
        assert!(
            !crashed.status.success() && output(&crashed).contains("failpoint"),
            "{failpoint} was not reached:\n{}",
            output(&crashed)
        );
    }

    /// `cdcflow capture --config capture.toml --once`, which must succeed; its output.
    pub(crate) fn capture_once(&self, env: &[(&str, &str)]) -> String {
        let out = self.cdcflow(&["capture", "--config", "capture.toml", "--once"], env);
        let text = output(&out);
        assert!(out.status.success(), "capture failed:\n{text}");
        text
    }

    /// The warehouse's rows of `sql` with every column cast to text (NULL as
    /// None), sorted: compared with a source database's rows cast the same way.
    pub(crate) async fn text_rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let mut out = Vec::new();
        for batch in self.query(sql).await {
            let columns: Vec<_> = batch
                .columns()
                .iter()
                .map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8).unwrap())
                .collect();
            out.extend(text_of(&columns, batch.num_rows()));
        }
        out.sort();
        out
    }
}

/// The `rows` of text `columns`, row by row (NULL as None).
fn text_of(columns: &[arrow::array::ArrayRef], rows: usize) -> Vec<Vec<Option<String>>> {
    use arrow::array::{Array, AsArray};
    (0..rows)
        .map(|row| {
            columns
                .iter()
                .map(|c| {
                    let c = c.as_string::<i32>();
                    (!c.is_null(row)).then(|| c.value(row).to_string())
                })
                .collect()
        })
        .collect()
}

/// Faults [`every_nth`] injects, in turn.
pub(crate) const FAULTS: [&str; 6] = ["503", "slowdown", "429", "reset", "truncated", "stall"];

/// A fault picker for [`http_fault_proxy`]: every `every`th request gets the
/// next fault of [`FAULTS`].
pub(crate) fn every_nth(every: usize) -> impl Fn(&str) -> Option<&'static str> + Send + Sync {
    let requests = AtomicUsize::new(0);
    move |_| {
        let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
        n.is_multiple_of(every)
            .then(|| FAULTS[(n / every) % FAULTS.len()])
    }
}

/// An HTTP proxy to `upstream` that serves one request per connection and
/// answers those `pick` names (by the whole request) with a fault: `503`,
/// `slowdown` (S3's 503 SlowDown), `429`, `reset` (the connection reset),
/// `truncated` (the real answer with its body cut in half), `stall` (the real
/// answer after 1.5 s), `lost` (the request reaches the server, its answer
/// never comes back) or `duplicate` (BigQuery's 409 for a job id inserted
/// before). Returns its URL and the number of faults injected.
pub(crate) async fn http_fault_proxy(
    upstream: String,
    pick: impl Fn(&str) -> Option<&'static str> + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let injected = Arc::new(AtomicUsize::new(0));
    let counted = injected.clone();
    let pick = Arc::new(pick);
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let (upstream, counted, pick) = (upstream.clone(), counted.clone(), pick.clone());
            tokio::spawn(async move {
                if serve_with_fault(client, &upstream, pick.as_ref()).await == Some(true) {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (format!("http://{addr}"), injected)
}

/// Serves one request of `client`; `Some(true)` when a fault was injected.
async fn serve_with_fault(
    mut client: tokio::net::TcpStream,
    upstream: &str,
    pick: &(dyn Fn(&str) -> Option<&'static str> + Send + Sync),
) -> Option<bool> {
    let mut request = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let head_end = loop {
        let n = client.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while request.len() < head_end + length {
        let n = client.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let fault = pick(&String::from_utf8_lossy(&request));
    let status = |line: &str, body: &str| {
        format!(
            "HTTP/1.1 {line}\r\nContent-Length: {}\r\nContent-Type: application/xml\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    match fault {
        Some("503") => {
            let _ = client
                .write_all(status("503 Service Unavailable", "").as_bytes())
                .await;
            return Some(true);
        }
        Some("slowdown") => {
            let body = "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            let _ = client
                .write_all(status("503 Slow Down", body).as_bytes())
                .await;
            return Some(true);
        }
        Some("429") => {
            let _ = client
                .write_all(status(TOO_MANY_REQUESTS, "").as_bytes())
                .await;
            return Some(true);
        }
        Some("reset") => {
            // A zero linger makes the close a reset (RST); nothing blocks on it.
            #[allow(deprecated)]
            let _ = client.set_linger(Some(std::time::Duration::ZERO));
            drop(client);
            return Some(true);
        }
        Some("duplicate") => {
            let body = r#"{"error":{"code":409,"message":"Already Exists: Job","errors":[{"reason":"duplicate","message":"Already Exists: Job"}],"status":"ALREADY_EXISTS"}}"#;
            let reply = format!(
                "HTTP/1.1 409 Conflict\r\nContent-Length: {}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(reply.as_bytes()).await;
            return Some(true);
        }
        Some("stall") => tokio::time::sleep(std::time::Duration::from_millis(1500)).await,
        _ => {}
    }
    // One request per upstream connection: the answer ends at EOF.
    let forwarded = head.replacen("\r\n\r\n", "", 1);
    let forwarded: String = forwarded
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let mut server = tokio::net::TcpStream::connect(upstream.trim_start_matches("http://"))
        .await
        .ok()?;
    server
        .write_all(format!("{forwarded}Connection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    server.write_all(&request[head_end..]).await.ok()?;
    let mut response = Vec::new();
    server.read_to_end(&mut response).await.ok()?;
    if fault == Some("lost") {
        drop(client); // the server did it; the client never hears
        return Some(true);
    }
    let body_at = response.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if fault == Some("truncated") && response.len() - body_at >= 64 {
        let cut = body_at + (response.len() - body_at) / 2;
        let _ = client.write_all(&response[..cut]).await;
        let _ = client.shutdown().await;
        return Some(true);
    }
    let _ = client.write_all(&response).await;
    let _ = client.shutdown().await;
    Some(fault == Some("stall"))
}

/// The test CAs' certificate files (`scripts/peers.sh`): the one that signs
/// the servers' certificate (which names only `localhost`), and another
/// that signs nothing of ours.
pub(crate) fn tls_cas() -> Option<(String, String)> {
    let dir = PathBuf::from(peer("CDCFLOW_TEST_TLS_DIR")?);
    let file = |name: &str| dir.join(name).display().to_string();
    Some((file("ca.pem"), file("other-ca.pem")))
}

/// `db_url` with `user` at `host` and the query `params`.
pub(crate) fn tls_url(db_url: &str, user: &str, host: &str, params: &str) -> String {
    let mut url = url::Url::parse(db_url).unwrap();
    url.set_username(user).unwrap();
    url.set_host(Some(host)).unwrap();
    url.set_query(Some(params));
    url.to_string()
}

impl Workspace {
    /// `capture --once` of a full load over each `(url, Ok(()) or
    /// Err(text the failure must show))`, with a fresh target each time.
    pub(crate) fn capture_tls_cases(&self, cases: &[(String, std::result::Result<(), &str>)]) {
        for (i, (url, expected)) in cases.iter().enumerate() {
            let objects = self.path(&format!("tls-objects-{i}"));
            std::fs::write(
                self.path("capture.toml"),
                format!(
                    "name = \"tls\"\n[source]\nurl = \"{url}\"\nmode = \"full-load\"\n\
                     [target]\nurl = \"file://{}\"\n",
                    objects.display()
                ),
            )
            .unwrap();
            let out = self.cdcflow(&["capture", "--config", "capture.toml", "--once"], &[]);
            let text = output(&out);
            match expected {
                Ok(()) => {
                    assert!(out.status.success(), "{url}: should connect:\n{text}");
                    let written = walk(&objects).len();
                    assert!(written > 0, "{url}: no object written:\n{text}");
                }
                Err(shown) => {
                    assert!(!out.status.success(), "{url}: should be refused:\n{text}");
                    assert!(
                        text.contains(shown),
                        "{url}: expected {shown:?} in:\n{text}"
                    );
                }
            }
        }
    }
}

/// The longest one cdcflow process of a test may run: a hung process fails
/// its own test (with its output) instead of holding the whole suite.
const PROCESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A cdcflow process a test started ([`Workspace::cdcflow`]).
struct Running {
    child: std::process::Child,
    args: String,
}

impl Running {
    /// Its output once it exits; killed (and the test failed) past
    /// [`PROCESS_TIMEOUT`].
    fn finish(self) -> Output {
        let pid = self.child.id().to_string();
        let done = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let done = done.clone();
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + PROCESS_TIMEOUT;
                while !done.load(Ordering::SeqCst) {
                    if std::time::Instant::now() > deadline {
                        // The child is not reaped before `done` is set: its pid is still its own.
                        let _ = Command::new("kill").args(["-9", &pid]).status();
                        return true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                false
            })
        };
        let out = self.child.wait_with_output().expect("run cdcflow");
        done.store(true, Ordering::SeqCst);
        let killed = watchdog.join().unwrap();
        assert!(
            !killed,
            "cdcflow {} ran past {PROCESS_TIMEOUT:?} and was killed:\n{}",
            self.args,
            output(&out)
        );
        out
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A TCP proxy to `upstream` on loopback whose [`TcpProxy::outage`] cuts
/// every open connection and refuses new ones for a while: what a client
/// sees when its database restarts or fails over.
pub(crate) struct TcpProxy {
    /// `host:port` to connect to.
    pub(crate) addr: String,
    down: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::broadcast::Sender<()>,
}

impl TcpProxy {
    /// A proxy to the host and port of `url`.
    pub(crate) async fn start(url: &str) -> TcpProxy {
        let parsed = url::Url::parse(url).unwrap();
        let upstream = format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, _) = tokio::sync::broadcast::channel(4);
        let (is_down, cuts) = (down.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if is_down.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection reset
                }
                let (upstream, mut cut) = (upstream.clone(), cuts.subscribe());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.recv() => {}
                    }
                });
            }
        });
        TcpProxy { addr, down, cut }
    }

    /// `url` with the proxy's host and port.
    pub(crate) fn url(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).unwrap();
        let (host, port) = self.addr.rsplit_once(':').unwrap();
        parsed.set_host(Some(host)).unwrap();
        parsed.set_port(Some(port.parse().unwrap())).unwrap();
        parsed.to_string()
    }

    /// 120 updates of table `t (id, v)` (ids 1 to 50) through `db`, in three
    /// rounds with a 2 s outage before the second and the third; returns the
    /// rows they changed.
    pub(crate) async fn updates_around_outages(&self, db: &mut impl Exec) -> u64 {
        let mut updates = 0;
        for round in 0..3 {
            if round > 0 {
                self.outage(std::time::Duration::from_secs(2)).await;
            }
            for i in 0..40 {
                let id = i % 50 + 1;
                updates += db
                    .exec(&format!("UPDATE t SET v = v + {round} + 1 WHERE id = {id}"))
                    .await;
            }
        }
        updates
    }

    /// Cuts every connection, refuses new ones for `length`, then serves again.
    pub(crate) async fn outage(&self, length: std::time::Duration) {
        self.down.store(true, Ordering::SeqCst);
        let _ = self.cut.send(());
        tokio::time::sleep(length).await;
        self.down.store(false, Ordering::SeqCst);
    }
}

/// `cdcflow capture --config capture.toml` streaming in the background, its
/// output in `capture.log`.
pub(crate) struct StreamingCapture {
    child: std::process::Child,
    log: PathBuf,
}

impl StreamingCapture {
    pub(crate) fn start(ws: &Workspace) -> StreamingCapture {
        let log = ws.path("capture.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
            .current_dir(ws.dir.path())
            .args(["capture", "--config", "capture.toml"])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        StreamingCapture { child, log }
    }

    /// Waits (20 s at most) until a full-load object (`LOAD…`) is under `dir`.
    pub(crate) async fn wait_for_full_load(&mut self, dir: &Path) {
        for _ in 0..200 {
            let loaded = walk(dir).iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("LOAD"))
            });
            if loaded {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("no full load under {}:\n{}", dir.display(), self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the pipeline until the warehouse's `sql` rows (as text) are
    /// `expected`, the capture running all along (30 s at most); then stops
    /// the capture with SIGTERM, which must end it cleanly, and checks from its
    /// log that it did start again after losing the database.
    pub(crate) async fn until_loaded(
        &mut self,
        ws: &Workspace,
        sql: &str,
        expected: &[Vec<Option<String>>],
    ) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("capture ended ({status}):\n{}", self.log());
            }
            let run = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
            assert!(run.status.success(), "{}", output(&run));
            // The table exists once a run loaded its full load.
            if ws.runner().query(sql).await.is_ok() && ws.text_rows(sql).await == expected {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the capture did not catch up:\n{}",
                self.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        let status = self.child.wait().unwrap();
        let log = self.log();
        assert!(status.success(), "SIGTERM: {status}\n{log}");
        assert!(
            log.contains("starting again from the checkpoint"),
            "the capture never lost the database:\n{log}"
        );
    }
}

/// A test database that runs SQL, returning the rows changed.
pub(crate) trait Exec {
    async fn exec(&mut self, sql: &str) -> u64;
}

/// After a column `tier` was added to `t (id, v)` with the default
/// `it's std`: the pipeline's current `t` is `source` (the source's rows as
/// text), and history holds `old` changes without the column and `new` ones
/// with it, each once; the capture's second schema version of `t` carries
/// the default and NOT NULL.
pub(crate) async fn assert_added_column_matches(
    ws: &Workspace,
    source: &[Vec<Option<String>>],
    old: u64,
    new: u64,
) {
    let run = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    let current = ws
        .text_rows("SELECT CAST(id AS VARCHAR), CAST(v AS VARCHAR), tier FROM t")
        .await;
    assert_eq!(current, source);
    let history = ws
        .text_rows(
            "SELECT CAST(tier IS NULL AS VARCHAR), CAST(count(*) AS VARCHAR) FROM t_history GROUP BY 1",
        )
        .await;
    let count = |n: u64, without: bool| vec![Some(without.to_string()), Some(n.to_string())];
    assert_eq!(history, vec![count(new, false), count(old, true)]);
    let schema = walk(&ws.path("objects"))
        .into_iter()
        .find(|p| p.ends_with("t/cdcflow-schema-v0002.json"))
        .expect("a second schema version of t");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(schema).unwrap()).unwrap();
    let tier = schema["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tier")
        .expect("tier in the second version");
    assert_eq!(
        (&tier["existing"], &tier["not_null"]),
        (&"it's std".into(), &true.into())
    );
}

/// Restarts the test peer `name` (`scripts/peers.sh`); only where no other
/// test uses it (`make chaos` runs one test at a time).
pub(crate) fn restart_peer(name: &str) {
    for action in ["stop", "start"] {
        let status = Command::new("scripts/peers.sh")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([name, action])
            .status()
            .expect("scripts/peers.sh");
        assert!(status.success(), "peers.sh {name} {action}");
    }
}

/// Waits (60 s at most) until a process held at a pause point
/// (`CDCFLOW_PAUSE=<point>:<file>`) has created `file`.
pub(crate) async fn until_paused(file: &Path, point: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the process never reached {point}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The Parquet CDC objects under `dir` (full-load `LOAD*` files left out).
pub(crate) fn cdc_objects(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".parquet") && !name.starts_with("LOAD")
        })
        .collect()
}

/// Per table folder (`schema/table`), how many times each change sequence
/// (`seq_column`) appears across the Parquet CDC objects under `dir`: read
/// from the objects themselves, so a doubled change shows even where the
/// pipeline's redelivery sieve would keep it once.
pub(crate) fn object_seq_counts(
    dir: &Path,
    seq_column: &str,
) -> std::collections::BTreeMap<(String, String), usize> {
    use arrow::array::AsArray;
    let mut counts = std::collections::BTreeMap::new();
    for path in cdc_objects(dir) {
        let rel = path.strip_prefix(dir).unwrap();
        let table: Vec<_> = rel.iter().take(2).map(|p| p.to_string_lossy()).collect();
        let file = std::fs::File::open(&path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let seqs = batch.column_by_name(seq_column).expect("sequence column");
            let seqs = arrow::compute::cast(seqs, &arrow::datatypes::DataType::Utf8).unwrap();
            for seq in seqs.as_string::<i32>().iter().flatten() {
                *counts
                    .entry((table.join("/"), seq.to_string()))
                    .or_default() += 1;
            }
        }
    }
    counts
}

/// The Parquet CDC objects under `dir` hold `changes` distinct changes
/// (`cdc_seq`), none of them twice; and the capture's checkpoint (the one
/// `_cdcflow/capture-*.json` under `dir`) counts exactly those changes and
/// objects.
pub(crate) fn assert_each_change_once(dir: &Path, changes: usize) {
    let counts = object_seq_counts(dir, "cdc_seq");
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(doubled.is_empty(), "changes written twice: {doubled:?}");
    assert_eq!(counts.len(), changes, "every change written once");
    let objects = cdc_objects(dir).len();
    let checkpoints: Vec<_> = walk(&dir.join("_cdcflow"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("capture-")
        })
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    let checkpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&checkpoints[0]).unwrap()).unwrap();
    let sum = |field: &str| -> u64 {
        checkpoint["tables"]
            .as_object()
            .unwrap()
            .values()
            .map(|t| t[field].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        sum("changes"),
        changes as u64,
        "changes the checkpoint counts"
    );
    assert_eq!(
        sum("objects"),
        objects as u64,
        "objects the checkpoint counts"
    );
}

/// The rows of every Parquet object of `table` under `dir` whose name
/// `keep` takes, each column
/// cast to text (the `Op`, timestamp and sequence columns left out), sorted;
/// and the columns' names and Arrow types.
pub(crate) fn object_rows(
    dir: &std::path::Path,
    table: &str,
    keep: impl Fn(&str) -> bool,
) -> (Vec<String>, Vec<Vec<Option<String>>>) {
    use arrow::array::AsArray;
    let mut fields = vec![];
    let mut rows = vec![];
    let mut files: Vec<_> = walk(dir)
        .into_iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "parquet")
                && p.to_string_lossy().contains(table)
                && p.file_name().is_some_and(|n| keep(&n.to_string_lossy()))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no objects of {table} under {}",
        dir.display()
    );
    for file in files {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&file).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let schema = batch.schema();
            let kept: Vec<usize> = (0..batch.num_columns())
                .filter(|i| {
                    !["Op", "dms_timestamp", "cdc_seq"].contains(&schema.field(*i).name().as_str())
                })
                .collect();
            fields = kept
                .iter()
                .map(|i| {
                    format!(
                        "{} {}",
                        schema.field(*i).name(),
                        schema.field(*i).data_type()
                    )
                })
                .collect();
            let columns: Vec<_> =
                kept.iter()
                    .map(|i| {
                        let column = batch.column(*i);
                        match column.as_binary_opt::<i32>() {
                            // Bytes as hex: not every value is UTF-8.
                            Some(bytes) => std::sync::Arc::new(
                                bytes
                                    .iter()
                                    .map(|b| b.map(hex::encode))
                                    .collect::<arrow::array::StringArray>(),
                            ),
                            None => arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8)
                                .unwrap(),
                        }
                    })
                    .collect();
            rows.extend(text_of(&columns, batch.num_rows()));
        }
    }
    rows.sort();
    (fields, rows)
}

/// Two sets of objects' rows (from [`object_rows`]) are the same: the same
/// columns and types, and the same values, row by row (the differences shown
/// by row key and column).
pub(crate) fn assert_same_objects(
    (a_fields, a_rows): (&[String], &[Vec<Option<String>>]),
    (b_fields, b_rows): (&[String], &[Vec<Option<String>>]),
) {
    assert_eq!(a_fields, b_fields);
    assert_eq!(a_rows.len(), b_rows.len());
    let short = |v: &Option<String>| v.as_ref().map(|v| v.chars().take(60).collect::<String>());
    let differences: Vec<_> = a_rows
        .iter()
        .zip(b_rows)
        .flat_map(|(a, b)| {
            (0..a.len())
                .filter(|i| a[*i] != b[*i])
                .map(|i| (a[0].clone(), &a_fields[i], short(&a[i]), short(&b[i])))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        differences.is_empty(),
        "(key, column, first, second): {:?}",
        &differences[..differences.len().min(20)]
    );
}
