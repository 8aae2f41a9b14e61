//! End to end over a local directory: generated DMS data → Delta tables,
//! checked against an independent replay of the generator's change list.

use std::collections::{HashMap, HashSet};

use cdcflow::decode::Op;
use cdcflow::synth::Value;

use crate::support::{Workspace, assert_warehouse_matches, current_rows, output, replay, rows};

#[test]
fn generated_data_has_the_hard_cases() {
    let ws = Workspace::new();
    let data = ws.synth(3000, 7);
    for table in &data.tables {
        let key = |c: &cdcflow::synth::Change| c.values[..table.key_len].to_vec();
        // a burst of one commit time split across two objects
        let straddles = table.changes.windows(2).any(|w| {
            w[0].file != w[1].file
                && w[0].commit_micros == w[1].commit_micros
                && w[0].commit_micros > 0
        });
        assert!(
            straddles,
            "{}: no transaction straddles a file boundary",
            table.name
        );
        // a key deleted then inserted again
        let mut deleted = HashSet::new();
        let mut reinsert = false;
        for c in &table.changes {
            match c.op {
                Op::Delete => {
                    deleted.insert(key(c));
                }
                Op::Insert => reinsert |= deleted.contains(&key(c)),
                Op::Update | Op::Truncate => {}
            }
        }
        assert!(reinsert, "{}: no delete-then-reinsert", table.name);
        // several changes to one key in one object, and hot keys
        let mut per_file: HashMap<(usize, Vec<Value>), usize> = HashMap::new();
        for c in &table.changes {
            *per_file.entry((c.file, key(c))).or_default() += 1;
        }
        assert!(
            per_file.values().any(|&n| n >= 3),
            "{}: no key changed 3 times in one object",
            table.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_run_matches_an_independent_replay() {
    let ws = Workspace::new();
    let data = ws.synth(3000, 1);
    ws.publish_all();
    ws.write_pipeline(1000, true);
    let report = ws.run_now().await;
    assert!(report.ok(), "{report:?}");
    for (t, table) in report.tables.iter().zip(&data.tables) {
        assert_eq!(t.stats.rows, table.changes.len() as u64);
        let count = |op| table.changes.iter().filter(|c| c.op == op).count() as u64;
        assert_eq!(
            (t.stats.inserts, t.stats.updates, t.stats.deletes),
            (count(Op::Insert), count(Op::Update), count(Op::Delete))
        );
    }
    assert_warehouse_matches(&ws, &data, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_batches_give_the_same_tables() {
    let ws = Workspace::new();
    let data = ws.synth(2000, 2);
    ws.publish_all();
    ws.write_pipeline(2, false);
    let report = ws.run_now().await;
    assert!(report.ok(), "{report:?}");
    assert!(
        report.tables.iter().all(|t| t.batches >= 7),
        "expected several batches: {report:?}"
    );
    assert_warehouse_matches(&ws, &data, false).await;
    // Batches after the first were applied by deletion vectors (one file
    // each), and the table was rewritten without its marked rows whenever
    // they were a quarter of its rows: that gave the tables checked above.
    for table in ["orders", "order_items"] {
        let (vectors, rewrites) = delta_commits(&ws, table);
        assert!(
            vectors >= 2 && rewrites >= 1,
            "{table}: {vectors} deletion-vector commits, {rewrites} rewrites"
        );
    }
    // The replaced files can go; the tables stay as they were.
    let files = |dir: &str| {
        walk(&ws.path(dir))
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "parquet" || e == "bin"))
            .count()
    };
    let before = files("warehouse");
    let vacuum = |extra: &[&str]| {
        let mut args = crate::support::VACUUM_NOW.to_vec();
        args.extend(extra);
        let out = ws.cdcflow(&args, &[]);
        assert!(out.status.success(), "{}", output(&out));
        output(&out)
    };
    let listed = vacuum(&["--dry-run"]);
    assert_eq!(files("warehouse"), before, "a dry run deletes nothing");
    let deleted = vacuum(&[]);
    let gone = before - files("warehouse");
    assert!(gone > 0, "{deleted}");
    assert_eq!(
        listed.matches("  ").count(),
        gone,
        "the dry run listed what was then deleted: {listed}"
    );
    assert_warehouse_matches(&ws, &data, false).await;
    assert!(vacuum(&[]).contains("deleted 0 files"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_deletion_vectors_batches_rewrite_files_and_give_the_same_tables() {
    let ws = Workspace::new();
    let data = ws.synth(2000, 2);
    ws.publish_all();
    let warehouse = format!(
        "kind = \"local\"\npath = \"{}\"\ndeletion_vectors = false",
        ws.path("warehouse").display()
    );
    ws.write_pipeline_into("pipeline.toml", 2, true, "", &warehouse);
    let report = ws.run_now().await;
    assert!(report.ok(), "{report:?}");
    assert_warehouse_matches(&ws, &data, true).await;
    for table in ["orders", "order_items"] {
        let (vectors, rewrites) = delta_commits(&ws, table);
        assert!(
            vectors == 0 && rewrites >= 5,
            "{table}: {vectors} deletion-vector commits, {rewrites} rewrites"
        );
    }
}

/// Every batch's latest changes spilled to disk (`latest_memory_mib = 0`):
/// the first load, later batches (by deletion vectors, and by rewrites
/// without them) and a late object read them back from the spill files and
/// give the tables of an independent replay; no spill file is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_changes_spilled_to_disk_give_the_same_tables() {
    for deletion_vectors in [true, false] {
        let ws = Workspace::new();
        let data = ws.synth(2000, 5);
        let warehouse = format!(
            "kind = \"local\"\npath = \"{}\"\ndeletion_vectors = {deletion_vectors}",
            ws.path("warehouse").display()
        );
        let path = ws.write_pipeline_into("pipeline.toml", 3, true, "", &warehouse);
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace("max_objects = 3", "max_objects = 3\nlatest_memory_mib = 0");
        std::fs::write(&path, text).unwrap();
        // Object 5 of each table comes late.
        for table in ["orders", "order_items"] {
            ws.publish(table, 0..5);
            ws.publish(table, 6..usize::MAX);
        }
        let tmp = ws.path("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let env = [("TMPDIR", tmp.to_str().unwrap())];
        let run = || {
            let out = ws.cdcflow(&["-v", "run", "--now", "-p", "pipeline.toml"], &env);
            assert!(out.status.success(), "{}", output(&out));
            assert!(
                output(&out).contains("outgrew batch.latest_memory_mib"),
                "the latest changes were spilled: {}",
                output(&out)
            );
            assert_eq!(
                walk(&tmp),
                Vec::<std::path::PathBuf>::new(),
                "spill files left"
            );
        };
        run();
        ws.publish("orders", 5..6);
        ws.publish("order_items", 5..6);
        run();
        assert_warehouse_matches(&ws, &data, true).await;
    }
}

/// One object of 100,000 wide rows, each a different key, in one batch: with
/// `latest_memory_mib = 8` the rows' latest changes go to a spill file and
/// the run peaks lower than with them held (the default, 256 MiB) by most of
/// their size; both give every row to the current table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_past_its_latest_memory_is_spilled_and_peaks_lower() {
    use std::io::Write;
    const ROWS: usize = 100_000;
    const TEXT: usize = 1_000;
    let mut peaks = Vec::new();
    for budget in [8, 256] {
        let ws = Workspace::new();
        let dir = ws.source().join("public/big");
        std::fs::create_dir_all(&dir).unwrap();
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(dir.join("LOAD00000001.csv")).unwrap());
        // Letters at random (a linear congruential generator): text that
        // neither a dictionary nor compression makes small in the writers.
        let mut state = 1u64;
        for i in 0..ROWS {
            let text: String = (0..TEXT)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    char::from(b'a' + ((state >> 33) % 26) as u8)
                })
                .collect();
            writeln!(out, "I,2024-05-01 00:00:00.000000,{i},{text}").unwrap();
        }
        out.flush().unwrap();
        drop(out);
        ws.write_big_pipeline(
            "columns = [{ name = \"id\", type = \"bigint\" }, { name = \"v\", type = \"text\" }]",
            &format!("latest_memory_mib = {budget}"),
        );
        let (out, peak) = ws.cdcflow_peak_mib(&["-v", "run", "--now", "-p", "pipeline.toml"], &[]);
        assert!(out.status.success(), "{}", output(&out));
        assert_eq!(
            output(&out).contains("outgrew batch.latest_memory_mib"),
            budget == 8,
            "{}",
            output(&out)
        );
        let loaded = rows(
            &ws.query("SELECT count(*), count(DISTINCT id), sum(length(v)) FROM big")
                .await,
        );
        assert_eq!(
            loaded[0],
            vec![
                Value::Int(ROWS as i64),
                Value::Int(ROWS as i64),
                Value::Int((ROWS * TEXT) as i64)
            ]
        );
        peaks.push(peak);
    }
    // The held rows are 100 MB of text (82 MiB apart in a debug build).
    let (spilled, held) = (peaks[0], peaks[1]);
    assert!(
        spilled + 50 < held,
        "peak resident MiB: spilled {spilled}, held {held}"
    );
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The commits of `table`'s current-state table that wrote deletion vectors,
/// and the ones that rewrote files: a MERGE that removes data files, or an
/// overwrite that removes files with deletion vectors.
fn delta_commits(ws: &Workspace, table: &str) -> (usize, usize) {
    let (mut vectors, mut rewrites) = (0, 0);
    for entry in std::fs::read_dir(ws.path(&format!("warehouse/{table}/_delta_log"))).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let log = std::fs::read_to_string(&path).unwrap();
        let actions: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let operation = |op: &str| actions.iter().any(|a| a["commitInfo"]["operation"] == op);
        let with_vector = actions
            .iter()
            .any(|a| a["add"]["deletionVector"].is_object());
        let removes = actions.iter().any(|a| a["remove"].is_object());
        let removes_vector = actions
            .iter()
            .any(|a| a["remove"]["deletionVector"].is_object());
        vectors += usize::from(operation("MERGE") && with_vector);
        rewrites += usize::from(
            (operation("MERGE") && removes && !with_vector)
                || (operation("WRITE") && removes_vector && !with_vector),
        );
    }
    (vectors, rewrites)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_runs_take_only_new_objects() {
    let ws = Workspace::new();
    let data = ws.synth(2000, 3);
    ws.write_pipeline(1000, false);
    ws.publish("orders", 0..6);
    ws.publish("order_items", 0..6);
    let first = ws.run_now().await;
    assert!(first.tables.iter().all(|t| t.objects == 6), "{first:?}");

    let versions_before = delta_versions(&ws);
    let again = ws.run_now().await;
    assert!(
        again
            .tables
            .iter()
            .all(|t| t.objects == 0 && t.batches == 0),
        "a run with nothing new does nothing: {again:?}"
    );
    assert_eq!(
        delta_versions(&ws),
        versions_before,
        "a run with nothing new commits nothing"
    );

    ws.publish_all();
    let second = ws.run_now().await;
    for (t, table) in second.tables.iter().zip(&data.tables) {
        assert_eq!(t.objects, table.files - 6, "only the new objects are read");
        let new_rows = table.changes.iter().filter(|c| c.file >= 6).count() as u64;
        assert_eq!(t.stats.rows, new_rows);
    }
    assert_warehouse_matches(&ws, &data, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_object_with_an_older_name_is_applied_in_order() {
    let ws = Workspace::new();
    let data = ws.synth(2000, 4);
    ws.write_pipeline(1000, false);
    // Everything but object 5 of each table arrives; object 5 comes late.
    for table in ["orders", "order_items"] {
        ws.publish(table, 0..5);
        ws.publish(table, 6..usize::MAX);
    }
    assert!(ws.run_now().await.ok());
    let without_late = current_rows(&ws, &data.tables[0], false).await;
    assert_ne!(
        without_late,
        replay(&data.tables[0], false),
        "the late object must matter to this test"
    );
    ws.publish("orders", 5..6);
    ws.publish("order_items", 5..6);
    let report = ws.run_now().await;
    assert!(report.tables.iter().all(|t| t.objects == 1), "{report:?}");
    assert_warehouse_matches(&ws, &data, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_view_marks_exactly_the_current_rows() {
    let ws = Workspace::new();
    let data = ws.synth(1500, 5);
    ws.publish_all();
    ws.write_pipeline(1000, false);
    assert!(ws.run_now().await.ok());
    let orders = &data.tables[0];
    let current = rows(
        &ws.query(&format!(
            "SELECT {} FROM orders_versions WHERE is_current ORDER BY id",
            orders.columns.join(", ")
        ))
        .await,
    );
    assert_eq!(current, replay(orders, false));
    // Every version is valid from its commit time until the next change of the same key.
    let mut by_key: std::collections::BTreeMap<Value, Vec<i64>> = Default::default();
    for c in &orders.changes {
        by_key
            .entry(c.values[0].clone())
            .or_default()
            .push(c.commit_micros);
    }
    let expected: Vec<Vec<Value>> = by_key
        .into_iter()
        .flat_map(|(id, times)| {
            (0..times.len())
                .map(|i| {
                    let to = times.get(i + 1).map_or(Value::Null, |t| Value::Micros(*t));
                    vec![id.clone(), Value::Micros(times[i]), to]
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let intervals = rows(
        &ws.query("SELECT id, valid_from, valid_to FROM orders_versions ORDER BY id, change_seq")
            .await,
    );
    assert_eq!(intervals, expected);
}

fn delta_versions(ws: &Workspace) -> Vec<std::path::PathBuf> {
    let mut logs = Vec::new();
    for table in [
        "orders",
        "orders_history",
        "order_items",
        "order_items_history",
    ] {
        for entry in std::fs::read_dir(ws.path(&format!("warehouse/{table}/_delta_log"))).unwrap() {
            logs.push(entry.unwrap().path());
        }
    }
    logs.sort();
    logs
}

/// The files the commit recording batch `batch` of `table` added, read from
/// its Delta log (each commit file holds one action per line).
fn files_added_by_batch(ws: &Workspace, table: &str, batch: i64) -> usize {
    let log = ws.path("warehouse").join(table).join("_delta_log");
    let mut commits: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    commits.sort();
    let actions = |path: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let recording: Vec<_> = commits
        .iter()
        .map(|p| actions(p))
        .filter(|actions| {
            actions
                .iter()
                .any(|a| a["txn"]["version"].as_i64() == Some(batch))
        })
        .collect();
    assert_eq!(
        recording.len(),
        1,
        "one commit records batch {batch} of {table}"
    );
    recording[0]
        .iter()
        .filter(|a| a.get("add").is_some())
        .count()
}

/// `--threads N`: a batch's rows are encoded into Parquet by up to N writers
/// at once (delta-rs drains a write through one), a further writer for each
/// 64k rows, and each batch still lands once, in one commit: the tables equal
/// the replay of the generated changes, orders' first batch (about 100k
/// rows) is one file at 1 thread and several at 4, and a small batch is one
/// file at 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_written_by_a_writer_per_thread_in_one_commit() {
    for (threads, changes, several) in [
        ("1", 200_000, false),
        ("4", 200_000, true),
        ("4", 20_000, false),
    ] {
        let ws = Workspace::new();
        let data = ws.synth(changes, 11);
        ws.publish_all();
        ws.write_pipeline(1000, false);
        let out = ws.cdcflow(
            &["--threads", threads, "run", "--now", "-p", "pipeline.toml"],
            &[],
        );
        assert!(out.status.success(), "{}", output(&out));
        assert_warehouse_matches(&ws, &data, false).await;
        let files = files_added_by_batch(&ws, "orders_history", 1);
        match several {
            true => assert!(files >= 2, "{threads} threads wrote {files} file(s)"),
            false => assert_eq!(files, 1, "{threads} thread(s), {changes} changes: one file"),
        }
    }
    let ws = Workspace::new();
    ws.write_pipeline(1000, false);
    let out = ws.cdcflow(
        &["--threads", "0", "run", "--now", "-p", "pipeline.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", output(&out));
    assert!(output(&out).contains("--threads"), "{}", output(&out));
}
