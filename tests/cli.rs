//! The command line as a user meets it.

use std::path::Path;

use crate::support::{Workspace, output, staged_objects};

fn repo(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .display()
        .to_string()
}

#[test]
fn help_teaches_the_commands_and_exit_codes() {
    let ws = Workspace::new();
    let help = output(&ws.cdcflow(&["--help"], &[]));
    for word in [
        "run",
        "validate",
        "status",
        "query",
        "history",
        "skip",
        "Exit codes",
        "Quick start",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
}

#[test]
fn validate_reports_every_problem_with_its_field_path() {
    let ws = Workspace::new();
    std::fs::write(
        ws.path("bad.toml"),
        r#"name = "Bad Name"
schedule = "every hour"
[source]
url = "ftp://x"
[warehouse]
kind = "local"
path = "w"
[[tables]]
schema = "public"
name = "t"
primary_key = []
columns = [{ name = "id", type = "bigint" }, { name = "v", type = "money" }]
"#,
    )
    .unwrap();
    let out = ws.cdcflow(&["validate", "-p", "bad.toml"], &[]);
    assert!(!out.status.success());
    let msg = output(&out);
    for field in [
        "`name`",
        "`schedule`",
        "`source.url`",
        "`tables[0].primary_key`",
        "`tables[0].columns[1].type`",
    ] {
        assert!(msg.contains(field), "missing {field}:\n{msg}");
    }
    let ok = ws.cdcflow(&["validate", "-p", &repo("pipelines/example.toml")], &[]);
    assert!(ok.status.success(), "{}", output(&ok));
}

#[test]
fn testdata_is_what_the_generator_writes() {
    let ws = Workspace::new();
    let out = ws.cdcflow(
        &[
            "synth",
            "--out",
            "fresh",
            "--changes",
            "2000",
            "--seed",
            "42",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", output(&out));
    for table in ["orders", "order_items"] {
        let fresh = staged_objects(&ws.path("fresh"), table);
        let committed = staged_objects(Path::new(&repo("testdata/dms")), table);
        assert_eq!(fresh, committed, "regenerate testdata with `make testdata`");
        for rel in fresh {
            assert_eq!(
                std::fs::read(ws.path("fresh").join(&rel)).unwrap(),
                std::fs::read(Path::new(&repo("testdata/dms")).join(&rel)).unwrap(),
                "{} differs; regenerate testdata with `make testdata`",
                rel.display()
            );
        }
    }
}

/// What `make run` does: the example pipeline over testdata/.
#[test]
fn the_example_pipeline_runs_and_answers_queries() {
    let ws = Workspace::new();
    let copy = std::process::Command::new("cp")
        .args([
            "-r",
            &repo("testdata"),
            &ws.path("testdata").display().to_string(),
        ])
        .status()
        .unwrap();
    assert!(copy.success());
    let example = repo("pipelines/example.toml");
    let run = ws.cdcflow(&["run", "-p", &example], &[]);
    assert!(run.status.success(), "{}", output(&run));
    assert!(
        output(&run).contains("public.order_items") && output(&run).contains("4000 changes"),
        "{}",
        output(&run)
    );

    let csv = ws.cdcflow(
        &[
            "query",
            "-p",
            &example,
            "-f",
            "csv",
            "SELECT id, amount FROM orders ORDER BY id LIMIT 2",
        ],
        &[],
    );
    let csv = String::from_utf8_lossy(&csv.stdout).to_string();
    assert!(csv.starts_with("id,amount\n1,"), "{csv}");
    let json = ws.cdcflow(
        &[
            "query",
            "-p",
            &example,
            "-f",
            "json",
            "SELECT count(*) AS n FROM order_items WHERE deleted",
        ],
        &[],
    );
    let json = String::from_utf8_lossy(&json.stdout).to_string();
    assert!(
        json.starts_with("{\"n\":") && json.lines().count() == 1,
        "{json}"
    );

    let life = ws.cdcflow(
        &[
            "history",
            "-p",
            &example,
            "-t",
            "order_items",
            "-k",
            "1,2",
            "-f",
            "csv",
        ],
        &[],
    );
    let life = String::from_utf8_lossy(&life.stdout).to_string();
    let lines: Vec<&str> = life.lines().collect();
    assert!(
        lines[0].contains("valid_from") && lines[0].contains("is_current"),
        "{life}"
    );
    assert!(
        lines[1..].iter().all(|l| l.starts_with("1,2,")),
        "only key (1,2): {life}"
    );
    assert_eq!(
        lines[1..].iter().filter(|l| l.ends_with(",true")).count(),
        1,
        "{life}"
    );

    let arity = ws.cdcflow(
        &["history", "-p", &example, "-t", "order_items", "-k", "1"],
        &[],
    );
    assert!(
        !arity.status.success() && output(&arity).contains("primary key (order_id, line_no)"),
        "{}",
        output(&arity)
    );

    let status = ws.cdcflow(&["status", "-p", &example], &[]);
    assert!(
        output(&status).contains("up to date"),
        "{}",
        output(&status)
    );
}

#[test]
fn a_missing_source_folder_says_what_to_check() {
    let ws = Workspace::new();
    ws.write_pipeline(10, false);
    std::fs::remove_dir(ws.source()).unwrap();
    let out = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        output(&out).contains("does not exist; check `source.url`"),
        "{}",
        output(&out)
    );
}

/// `schedule` takes the web server's options only with `--listen`: alone
/// they would be ignored, so they are refused with what to add.
#[test]
fn schedule_refuses_the_servers_options_without_listen() {
    let ws = Workspace::new();
    ws.write_pipeline(10, false);
    ws.pipelines_folder();
    for option in [["--captures", "captures"], ["--token-env", "TOKEN"]] {
        let mut args = vec!["schedule", "--pipelines", "pipelines"];
        args.extend(option);
        let out = ws.cdcflow(&args, &[]);
        assert!(!out.status.success(), "{}", output(&out));
        assert!(
            output(&out).contains("add --listen ADDR"),
            "{}",
            output(&out)
        );
    }
}

#[test]
fn a_state_store_of_a_newer_cdcflow_is_refused() {
    let ws = Workspace::new();
    ws.synth(200, 5);
    ws.publish_all();
    ws.write_pipeline(10, false);
    assert!(
        ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[])
            .status
            .success()
    );
    // A later cdcflow raised the schema version of the store.
    let store = ws.path("state/pipeline.toml.db");
    let conn = rusqlite::Connection::open(&store).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert!(version >= 1, "the store records its schema version");
    conn.pragma_update(None, "user_version", version + 1)
        .unwrap();
    drop(conn);
    let out = ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", output(&out));
    assert!(
        output(&out).contains("written by a newer cdcflow"),
        "{}",
        output(&out)
    );
}

/// `status` after a scheduled run, with objects newer than its tick: it
/// says when they will be loaded and how to load them now, and its table
/// fits a 120-column terminal (`--wide` shows every column).
#[test]
fn status_says_when_waiting_objects_load_and_fits_120_columns() {
    let ws = Workspace::new();
    ws.synth(600, 8);
    ws.publish("orders", 0..2);
    ws.publish("order_items", 0..2);
    // Once a year: the first run takes the latest tick, then nothing is due for months.
    ws.write_pipeline_with(100, false, "schedule = \"0 0 1 1 *\"");
    let ran = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert!(ran.status.success(), "{}", output(&ran));
    ws.publish_all();

    let status = ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]);
    let text = output(&status);
    assert!(status.status.success(), "{text}");
    for line in text.lines() {
        assert!(
            line.chars().count() <= 120,
            "{} columns: {line}\n{text}",
            line.chars().count()
        );
    }
    let next = chrono::DateTime::parse_from_rfc3339(&format!(
        "{}-01-01T00:00:00Z",
        chrono::Datelike::year(&chrono::Utc::now()) + 1
    ))
    .unwrap();
    assert!(
        text.contains(&format!(
            "the next scheduled run, at {}",
            next.format("%Y-%m-%d %H:%M UTC")
        )) && text.contains("cdcflow run --now -p pipeline.toml"),
        "{text}"
    );
    // `run` without --now indeed loads nothing now.
    let idle = ws.cdcflow(&["run", "-p", "pipeline.toml"], &[]);
    assert!(output(&idle).contains("nothing due"), "{}", output(&idle));

    let wide = output(&ws.cdcflow(&["status", "--wide", "-p", "pipeline.toml"], &[]));
    assert!(
        wide.contains("newest object") && !text.contains("newest object"),
        "{wide}"
    );

    // Without a schedule, `run` loads them now and `status` says so.
    ws.write_pipeline(100, false);
    let text = output(&ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]));
    assert!(
        text.contains("`cdcflow run -p pipeline.toml` loads them"),
        "{text}"
    );
}

/// Output read by something that stops early (`cdcflow status | head -1`):
/// cdcflow ends quietly, as Unix tools do, without a panic and its trace.
#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    let ws = Workspace::new();
    ws.synth(300, 4);
    ws.publish_all();
    ws.write_pipeline(100, false);
    for args in [
        &["status", "--wide", "-p", "pipeline.toml"][..],
        &["runs", "-p", "pipeline.toml"],
    ] {
        let mut child = ws
            .command(args, &[])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before cdcflow has opened its state.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
    }
}

/// `--log-format json` (or `CDCFLOW_LOG_FORMAT=json`): every log line is a
/// JSON object, and the lines about a table's work carry its pipeline, run
/// id, table and try; a password in the state URL appears nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_pipeline_run_table_and_try_and_no_secret() {
    let ws = Workspace::new();
    ws.synth(400, 6);
    ws.publish_all();
    ws.write_pipeline(100, false);
    // With the PostgreSQL peer, the state URL holds a password (trust auth ignores it).
    let database = match crate::support::peer("CDCFLOW_TEST_PG_URL") {
        Some(_) => {
            let (admin, name, url) =
                crate::support::pg_database("CDCFLOW_TEST_PG_URL", &ws, "logs_")
                    .await
                    .unwrap();
            let url = url.replacen("postgres@", "postgres:hunter2-secret@", 1);
            ws.set_state_url("pipeline.toml", &url);
            Some((admin, name))
        }
        None => None,
    };
    let run = ws.cdcflow(
        &["run", "--now", "-vv", "-p", "pipeline.toml"],
        &[("CDCFLOW_LOG_FORMAT", "json")],
    );
    assert!(run.status.success(), "{}", output(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    let mut committed = std::collections::BTreeMap::new();
    for line in stderr.lines() {
        let log: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(
            log["timestamp"].is_string() && log["level"].is_string(),
            "{line}"
        );
        if log["message"] == "batch committed" {
            let spans = log["spans"].as_array().expect("spans");
            let run = spans.iter().find(|s| s["name"] == "run").expect("run span");
            let task = spans
                .iter()
                .find(|s| s["name"] == "task")
                .expect("task span");
            assert_eq!(
                (&run["pipeline"], &run["run_id"]),
                (&"test".into(), &1.into()),
                "{line}"
            );
            assert_eq!(task["table"], log["table"], "{line}");
            assert_eq!(task["try_number"], 1, "{line}");
            *committed
                .entry(log["table"].as_str().unwrap().to_string())
                .or_insert(0) += log["rows"].as_u64().unwrap();
        }
    }
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        ["public.order_items", "public.orders"],
        "{stderr}"
    );
    assert_eq!(committed.values().sum::<u64>(), 800, "every change, once");
    if let Some((admin, name)) = database {
        assert!(!stderr.contains("hunter2"), "{stderr}");
        crate::support::drop_pg_database(&admin, &name).await;
    }
}

/// A table another worker is loading (its lease unexpired) is named in
/// `status` with the worker and until when; a lease that ran out, or was
/// given back, is not.
#[test]
fn status_names_the_worker_loading_a_table() {
    let ws = Workspace::new();
    ws.synth(300, 9);
    ws.publish_all();
    ws.write_pipeline(100, false);
    let runner = ws.runner();
    let store = runner.state();
    let taken = store
        .acquire_lease(
            "public.orders",
            "worker-7:4242:1",
            std::time::Duration::from_secs(600),
            None,
        )
        .unwrap();
    assert!(
        matches!(taken, cdcflow::state::LeaseOutcome::Acquired { .. }),
        "{taken:?}"
    );
    let text = output(&ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]));
    assert!(
        text.contains("public.orders: being loaded by worker-7:4242:1 (its lease runs to "),
        "{text}"
    );
    assert!(!text.contains("public.order_items: being loaded"), "{text}");
    store
        .acquire_lease(
            "public.order_items",
            "worker-8:1:1",
            std::time::Duration::ZERO,
            None,
        )
        .unwrap();
    let text = output(&ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]));
    assert!(!text.contains("worker-8"), "an expired lease: {text}");
    store.release_lease("worker-7:4242:1").unwrap();
    let text = output(&ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]));
    assert!(!text.contains("being loaded"), "{text}");
}
