//! Exactly once when something outside the happy path happens: a decoder
//! that panics, a state store that was lost or restored from an old backup,
//! a backfill over objects an operator skipped, a vacuum beside a run, and
//! DMS tasks that differ in `includeOpForFullLoad`. Each test was seen to
//! fail before its fix (see the issue notes).

use cdcflow::synth::{Dataset, SynthTable};

use crate::support::{Workspace, assert_warehouse_matches, output, rows, staged_objects};

const EXIT_TABLES_FAILED: i32 = 3;
const EXIT_LEASE_HELD: i32 = 4;

fn run(ws: &Workspace) -> std::process::Output {
    ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[])
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(out.status.success(), "{what}:\n{}", output(out));
}

async fn count(ws: &Workspace, sql: &str) -> i64 {
    match rows(&ws.query(sql).await)[0][0] {
        cdcflow::synth::Value::Int(n) => n,
        ref other => panic!("{sql}: {other:?}"),
    }
}

/// A Parquet object (a real mutation of `testdata`'s) that makes arrow
/// panic while decoding: the panic must become an error naming the object,
/// the object waits for the operator, and nothing of its batch is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoder_panic_stops_the_table_at_its_object_and_loses_nothing() {
    let ws = Workspace::new();
    // testdata/dms is this dataset (`make testdata`); the fixture is one of its objects, mutated.
    let data = ws.synth(2000, 42);
    ws.publish_all();
    ws.write_pipeline(100, false);
    let key = "public/order_items/2024/05/01/20240501-213122486.parquet";
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/decoder-panic/20240501-213122486.parquet");
    std::fs::copy(&fixture, ws.source().join(key)).unwrap();

    let first = run(&ws);
    let text = output(&first);
    assert_eq!(first.status.code(), Some(EXIT_TABLES_FAILED), "{text}");
    assert!(text.contains(key), "the error names the object: {text}");
    assert!(text.contains("panic"), "says the decoder panicked: {text}");
    // Only objects before the bad one are in history; none of it or after it.
    let items = &data.tables[1];
    let bad = staged_objects(&ws.path("staging"), "order_items")
        .iter()
        .position(|p| p.to_string_lossy() == key)
        .unwrap();
    let before = items.changes.iter().filter(|c| c.file < bad).count() as i64;
    assert_eq!(
        count(&ws, "SELECT count(*) FROM order_items_history").await,
        before
    );

    // The original object put back: the table goes on and ends complete, once.
    std::fs::copy(ws.path("staging").join(key), ws.source().join(key)).unwrap();
    assert_ok(&run(&ws), "after the object was replaced");
    assert_warehouse_matches(&ws, &data, false).await;
}

/// Publishes the first `n` objects of orders (all of order_items).
fn publish_orders_up_to(ws: &Workspace, n: usize) {
    ws.publish("orders", 0..n);
    ws.publish("order_items", 0..usize::MAX);
}

fn orders_count(ws: &Workspace) -> usize {
    staged_objects(&ws.path("staging"), "orders").len()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The run after a lost state store must not take the warehouse's batches
/// for its own: it is refused with what to do, `repair --from-warehouse`
/// rebuilds the state, and the next run loads exactly what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_store_is_refused_then_repaired_from_the_warehouse() {
    let ws = Workspace::new();
    let data = ws.synth(1500, 31);
    let n = orders_count(&ws);
    publish_orders_up_to(&ws, n - 3);
    ws.write_pipeline(4, false);
    assert_ok(&run(&ws), "first run");
    let loaded = count(&ws, "SELECT count(*) FROM orders_history").await;

    std::fs::remove_dir_all(ws.path("state")).unwrap();
    ws.publish("orders", n - 3..usize::MAX);
    let refused = run(&ws);
    let text = output(&refused);
    assert!(
        !refused.status.success(),
        "a lost state store is refused: {text}"
    );
    assert!(
        text.contains("repair --from-warehouse"),
        "says what to do: {text}"
    );
    assert_eq!(
        count(&ws, "SELECT count(*) FROM orders_history").await,
        loaded,
        "nothing loaded while refused"
    );

    let repaired = ws.cdcflow(&["repair", "--from-warehouse", "-p", "pipeline.toml"], &[]);
    assert_ok(&repaired, "repair");
    assert_ok(&run(&ws), "the run after the repair");
    assert_warehouse_matches(&ws, &data, false).await;
    // The repaired state says the same as the warehouse: a further run has nothing to do.
    let again = run(&ws);
    assert_ok(&again, "a run with nothing new");
    assert_warehouse_matches(&ws, &data, false).await;
}

/// A state store restored from a backup older than the warehouse is behind
/// it: refused, repaired, and then nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_store_restored_from_an_older_backup_is_refused_then_repaired() {
    let ws = Workspace::new();
    let data = ws.synth(1500, 32);
    let n = orders_count(&ws);
    publish_orders_up_to(&ws, n / 3);
    ws.write_pipeline(2, false);
    assert_ok(&run(&ws), "first run");
    copy_dir(&ws.path("state"), &ws.path("backup"));
    ws.publish("orders", n / 3..2 * n / 3);
    assert_ok(&run(&ws), "second run");

    std::fs::remove_dir_all(ws.path("state")).unwrap();
    copy_dir(&ws.path("backup"), &ws.path("state"));
    ws.publish("orders", 2 * n / 3..usize::MAX);
    let refused = run(&ws);
    let text = output(&refused);
    assert!(
        !refused.status.success(),
        "a state store behind the warehouse is refused: {text}"
    );
    assert!(text.contains("behind the warehouse"), "{text}");
    assert!(text.contains("repair --from-warehouse"), "{text}");

    assert_ok(
        &ws.cdcflow(&["repair", "--from-warehouse", "-p", "pipeline.toml"], &[]),
        "repair",
    );
    assert_ok(&run(&ws), "the run after the repair");
    assert_warehouse_matches(&ws, &data, false).await;
}

/// The index of the first CDC object (after the full-load files) of `objects`.
fn first_cdc(objects: &[std::path::PathBuf]) -> usize {
    objects
        .iter()
        .position(|p| !p.to_string_lossy().contains("LOAD"))
        .unwrap()
}

/// `data` without the changes of orders' object `skipped`.
fn without_object(data: &Dataset, skipped: usize) -> Dataset {
    let mut tables = data.tables.clone();
    let orders: &mut SynthTable = &mut tables[0];
    orders.changes.retain(|c| c.file != skipped);
    Dataset { tables }
}

/// A backfill reprocesses what was loaded, not what an operator skipped:
/// the skip stands unless `--include-skipped` asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_keeps_what_the_operator_skipped_unless_asked() {
    let ws = Workspace::new();
    let data = ws.synth(1200, 33);
    ws.publish_all();
    ws.write_pipeline(100, false);
    let objects = staged_objects(&ws.path("staging"), "orders");
    let skipped = first_cdc(&objects) + 1;
    let key = objects[skipped].to_string_lossy().to_string();
    assert_ok(
        &ws.cdcflow(
            &[
                "skip",
                "-p",
                "pipeline.toml",
                "-t",
                "orders",
                "-o",
                &key,
                "-r",
                "test",
            ],
            &[],
        ),
        "skip",
    );
    assert_ok(&run(&ws), "run");
    let expected = without_object(&data, skipped);
    assert_warehouse_matches(&ws, &expected, false).await;

    let backfill = |extra: &[&str]| {
        let mut args = crate::support::BACKFILL_ALL.to_vec();
        args.extend_from_slice(extra);
        ws.cdcflow(&args, &[])
    };
    assert_ok(&backfill(&[]), "backfill");
    assert_warehouse_matches(&ws, &expected, false).await;
    let status = output(&ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]));
    assert!(
        status.contains(&key),
        "status still lists the skip: {status}"
    );

    assert_ok(
        &backfill(&["--include-skipped"]),
        "backfill --include-skipped",
    );
    assert_warehouse_matches(&ws, &data, false).await;
}

/// `vacuum` deletes files no committed version reads, so it must not run
/// beside a run whose files are not committed yet: it takes the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_waits_for_the_lease_and_keeps_a_minimum_retention() {
    let (ws, _data) = Workspace::published(600, 34, 100, "");
    assert_ok(&run(&ws), "run");
    let pipeline = cdcflow::config::load(&ws.path("pipeline.toml")).unwrap();
    let runner = ws.runner();
    let state = cdcflow::state::open(&pipeline.state, &pipeline.name).unwrap();
    drop(runner);
    let lease = cdcflow::pipeline::Lease::acquire(state, &pipeline).unwrap();
    let busy = ws.cdcflow(&["vacuum", "-p", "pipeline.toml"], &[]);
    assert_eq!(
        busy.status.code(),
        Some(EXIT_LEASE_HELD),
        "{}",
        output(&busy)
    );
    lease.release();

    let short = ws.cdcflow(
        &["vacuum", "-p", "pipeline.toml", "--retain-hours", "0"],
        &[],
    );
    assert!(!short.status.success(), "{}", output(&short));
    assert!(output(&short).contains("--force"), "{}", output(&short));
    assert_ok(
        &ws.cdcflow(&crate::support::VACUUM_NOW, &[]),
        "vacuum --force",
    );
}

/// `csv` with `prefix` before each record (not before the lines a quoted
/// field continues on).
fn prefix_records(csv: &str, prefix: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for line in csv.split_inclusive('\n') {
        if !quoted {
            out.push_str(prefix);
        }
        out.push_str(line);
        quoted ^= line.matches('"').count() % 2 == 1;
    }
    out
}

/// A published dataset whose orders full-load file has `prefix` before each record.
fn with_load_records_prefixed(changes: usize, seed: u64, prefix: &str) -> (Workspace, Dataset) {
    let ws = Workspace::new();
    let data = ws.synth(changes, seed);
    ws.publish_all();
    ws.write_pipeline(100, false);
    let load = staged_objects(&ws.path("staging"), "orders")
        .into_iter()
        .find(|p| p.to_string_lossy().contains("LOAD"))
        .unwrap();
    let path = ws.source().join(&load);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, prefix_records(&text, prefix)).unwrap();
    (ws, data)
}

/// DMS sets includeOpForFullLoad per task: one bucket may hold full-load
/// files with an `Op` column and files without. A headerless full-load
/// file with one more field than declared whose first field is `I` holds
/// `Op`, whatever the pipeline says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_load_files_with_and_without_op_load_side_by_side() {
    let (ws, data) = with_load_records_prefixed(800, 35, "I,");
    assert_ok(&run(&ws), "run");
    assert_warehouse_matches(&ws, &data, false).await;
}

/// A full-load file whose field count fits neither form names the setting.
#[test]
fn a_full_load_file_that_fits_no_form_names_the_setting() {
    let (ws, _) = with_load_records_prefixed(300, 36, "I,x,");
    let out = run(&ws);
    assert_eq!(
        out.status.code(),
        Some(EXIT_TABLES_FAILED),
        "{}",
        output(&out)
    );
    assert!(
        output(&out).contains("include_op_for_full_load"),
        "{}",
        output(&out)
    );
}

/// A column name the warehouse cannot hold is refused before anything of
/// its table is loaded, naming the column; other tables go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_name_the_warehouse_cannot_hold_is_refused_by_name() {
    let (ws, data) = Workspace::published(600, 37, 100, "");
    let path = ws.path("pipeline.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("name = \"note\"", "name = \"note.text\""),
    )
    .unwrap();
    let out = run(&ws);
    let text = output(&out);
    assert_eq!(out.status.code(), Some(EXIT_TABLES_FAILED), "{text}");
    assert!(
        text.contains("\"note.text\"") && text.contains("cannot be loaded"),
        "{text}"
    );
    assert!(
        !ws.path("warehouse/orders_history/_delta_log").exists(),
        "nothing of orders was loaded"
    );
    let items = crate::support::history_rows(&ws, &data.tables[1]).await;
    assert_eq!(
        items.len(),
        data.tables[1].changes.len(),
        "order_items went on"
    );
}

/// A second state store pointed at a warehouse another store loads is
/// refused even when its batch numbers line up with the warehouse's: the
/// batch ids (which objects) differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_state_store_at_the_same_batch_number_is_refused() {
    let ws = Workspace::new();
    ws.synth(900, 38);
    let n = orders_count(&ws);
    assert!(n >= 10, "{n} objects");
    publish_orders_up_to(&ws, n);
    // Pipeline A: three batches, into warehouse/.
    let per_batch = n.div_ceil(3);
    ws.write_pipeline(per_batch, false);
    assert_ok(&run(&ws), "pipeline A");
    let a = count(&ws, "SELECT count(*) FROM orders_history").await;
    // Pipeline B: the same name, its own state store, batches of 3 objects
    // over the first 9 objects, into its own warehouse: as many batches.
    let b_source = ws.path("b-source");
    for table in ["orders", "order_items"] {
        for rel in staged_objects(&ws.path("staging"), table)
            .into_iter()
            .take(9)
        {
            let to = b_source.join(&rel);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(ws.path("staging").join(&rel), to).unwrap();
        }
    }
    let b = std::fs::read_to_string(ws.path("pipeline.toml"))
        .unwrap()
        .replace(&format!("max_objects = {per_batch}"), "max_objects = 3")
        .replace(
            &format!("{}\"", ws.source().display()),
            &format!("{}\"", b_source.display()),
        )
        .replace("pipeline.toml.db", "b.db")
        .replace("/warehouse\"", "/b-warehouse\"");
    std::fs::write(ws.path("b.toml"), &b).unwrap();
    assert_ok(
        &ws.cdcflow(&["run", "--now", "-p", "b.toml"], &[]),
        "pipeline B",
    );
    // B is pointed at A's warehouse by mistake.
    std::fs::write(
        ws.path("b.toml"),
        b.replace("/b-warehouse\"", "/warehouse\""),
    )
    .unwrap();
    let refused = ws.cdcflow(&["run", "--now", "-p", "b.toml"], &[]);
    let text = output(&refused);
    assert!(!refused.status.success(), "{text}");
    assert!(text.contains("holds other objects"), "{text}");
    assert_eq!(
        count(&ws, "SELECT count(*) FROM orders_history").await,
        a,
        "A's tables untouched"
    );
}

/// The name of `rel` with its CDC time's millisecond digits followed by `extra`.
fn renamed(rel: &std::path::Path, stem: &str, extra: &str) -> std::path::PathBuf {
    let name = rel.file_name().unwrap().to_string_lossy().to_string();
    let ext = &name[name.find('.').unwrap()..];
    rel.with_file_name(format!("{stem}{extra}{ext}"))
}

/// DMS names CDC files `yyyyMMdd-HHmmssSSSS`: two objects of one
/// millisecond are ordered by the fourth digit, one batch each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_one_millisecond_are_ordered_by_their_fourth_fraction_digit() {
    let ws = Workspace::new();
    let data = ws.synth(1500, 39);
    ws.publish_all();
    ws.write_pipeline(1, false);
    let objects = staged_objects(&ws.path("staging"), "orders");
    let first = first_cdc(&objects) + 2;
    let (a, b) = (&objects[first], &objects[first + 1]);
    let name = a.file_name().unwrap().to_string_lossy().to_string();
    let stem = &name[..name.find('.').unwrap()];
    for (rel, digit) in [(a, "0"), (b, "1")] {
        std::fs::rename(
            ws.source().join(rel),
            ws.source().join(renamed(rel, stem, digit)),
        )
        .unwrap();
    }
    assert_ok(&run(&ws), "run");
    assert_warehouse_matches(&ws, &data, false).await;
}

/// Two objects whose names give the same place in the change order cannot
/// be ordered: the table waits at them with both named; once the operator
/// skips the copy, the table goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_objects_with_the_same_name_time_stop_their_table() {
    let ws = Workspace::new();
    let data = ws.synth(900, 40);
    ws.publish_all();
    ws.write_pipeline(100, false);
    let cdc = staged_objects(&ws.path("staging"), "orders")
        .into_iter()
        .find(|p| !p.to_string_lossy().contains("LOAD"))
        .unwrap();
    let copy = std::path::Path::new("public/orders/redelivered").join(cdc.file_name().unwrap());
    std::fs::create_dir_all(ws.source().join(copy.parent().unwrap())).unwrap();
    std::fs::copy(ws.source().join(&cdc), ws.source().join(&copy)).unwrap();
    let (original, copy_key) = (
        cdc.to_string_lossy().to_string(),
        copy.to_string_lossy().to_string(),
    );
    assert!(
        original < copy_key,
        "the copy sorts second: it is the one that waits"
    );
    let out = run(&ws);
    let text = output(&out);
    assert_eq!(out.status.code(), Some(EXIT_TABLES_FAILED), "{text}");
    assert!(
        text.contains(&copy_key) && text.contains(&original),
        "{text}"
    );
    assert!(text.contains("cannot be ordered"), "{text}");
    assert_ok(
        &ws.cdcflow(
            &[
                "skip",
                "-p",
                "pipeline.toml",
                "-t",
                "orders",
                "-o",
                &copy_key,
                "-r",
                "a copy",
            ],
            &[],
        ),
        "skip",
    );
    assert_ok(&run(&ws), "after the skip");
    assert_warehouse_matches(&ws, &data, false).await;
}

/// A worker paused past its lease (SIGSTOP between its listing and its
/// plan, outside a state write, then SIGCONT after another worker took the lease over and loaded
/// everything) is refused by its fencing token: it plans and loads nothing,
/// fails as having lost its lease, and the tables hold every change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_its_lease_is_fenced_off() {
    let ws = Workspace::new();
    let data = ws.synth(1200, 71);
    ws.write_pipeline_with(3, false, "lease_ttl = \"2s\"");
    ws.publish_all();
    let paused = ws.path("paused");
    let stale = ws
        .command(
            &["run", "--now", "-p", "pipeline.toml"],
            &[(
                "CDCFLOW_PAUSE",
                &format!("plan.before_record:{}", paused.display()),
            )],
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::support::until_paused(&paused, "plan.before_record").await;
    let signal = |sig: &str| {
        let sent = std::process::Command::new("kill")
            .args([sig, &stale.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {sig}");
    };
    // Stopped outside a write of its own: a process stopped inside one
    // holds the SQLite file's write lock, and every other writer waits for
    // it (the state of a fleet is PostgreSQL). Its heartbeat writes every
    // ttl/3, so try again until the lock is free.
    let state = rusqlite::Connection::open(ws.path("state/pipeline.toml.db")).unwrap();
    state
        .busy_timeout(std::time::Duration::from_millis(200))
        .unwrap();
    loop {
        signal("-STOP");
        if state.execute_batch("BEGIN IMMEDIATE; ROLLBACK;").is_ok() {
            break;
        }
        signal("-CONT");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_ok(&run(&ws), "the run that takes the lease over");
    assert_warehouse_matches(&ws, &data, false).await;

    std::fs::remove_file(&paused).unwrap();
    signal("-CONT");
    let out = stale.wait_with_output().unwrap();
    let text = output(&out);
    assert!(!out.status.success(), "the stale worker must fail: {text}");
    assert!(text.contains("lease"), "{text}");
    assert_warehouse_matches(&ws, &data, false).await;
    let status = output(&ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]));
    assert!(!status.contains("pending"), "{status}");
    assert_ok(&run(&ws), "a run after it");
    assert_warehouse_matches(&ws, &data, false).await;
}
