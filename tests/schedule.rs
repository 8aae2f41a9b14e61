//! Airflow semantics: cron ticks with data intervals, catchup, backfill,
//! retries, run history, one run at a time, and a daemon that stops cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use cdcflow::synth::Value;

use crate::support::{Workspace, assert_warehouse_matches, output, rows, staged_objects};

/// Objects of a table whose CDC name time is before `end` (LOAD files always count).
fn objects_before(ws: &Workspace, table: &str, end: &str) -> usize {
    let end = chrono::DateTime::parse_from_rfc3339(end)
        .unwrap()
        .with_timezone(&chrono::Utc);
    staged_objects(&ws.path("staging"), table)
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            match cdcflow::source::ObjectName::parse(&name)
                .unwrap()
                .order
                .cdc_time()
            {
                None => true,
                Some(t) => t < end,
            }
        })
        .count()
}

fn loaded_objects(ws: &Workspace) -> i64 {
    match &rows(&futures::executor::block_on(
        ws.query("SELECT count(DISTINCT source_file) FROM orders_history"),
    ))[0][0]
    {
        Value::Int(n) => *n,
        other => panic!("{other:?}"),
    }
}

fn scheduled(catchup: bool) -> (Workspace, cdcflow::synth::Dataset) {
    let (ws, data) = Workspace::published(
        3000,
        31,
        1000,
        &format!("schedule = \"0 * * * *\"\ncatchup = {catchup}"),
    );
    (ws, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_runs_every_missed_tick_in_order() {
    let (ws, data) = scheduled(true);
    let first = ws.cdcflow(
        &["run", "-p", "pipeline.toml", "--at", "2024-05-01T03:30:00Z"],
        &[],
    );
    assert!(first.status.success(), "{}", output(&first));
    assert_eq!(
        loaded_objects(&ws) as usize,
        objects_before(&ws, "orders", "2024-05-01T03:00:00Z")
    );

    let again = ws.cdcflow(
        &["run", "-p", "pipeline.toml", "--at", "2024-05-01T03:59:00Z"],
        &[],
    );
    assert!(
        output(&again).contains("nothing due") && output(&again).contains("2024-05-01T04:00:00"),
        "{}",
        output(&again)
    );

    let caught_up = ws.cdcflow(
        &["run", "-p", "pipeline.toml", "--at", "2024-05-01T06:30:00Z"],
        &[],
    );
    assert!(caught_up.status.success());
    assert_eq!(
        output(&caught_up).matches("(schedule)").count(),
        3,
        "one run per missed tick:\n{}",
        output(&caught_up)
    );
    assert_eq!(
        loaded_objects(&ws) as usize,
        objects_before(&ws, "orders", "2024-05-01T06:00:00Z")
    );

    let runs = ws.cdcflow(&["runs", "-p", "pipeline.toml"], &[]);
    let grid = output(&runs);
    for tick in [
        "2024-05-01T03:00",
        "2024-05-01T04:00",
        "2024-05-01T05:00",
        "2024-05-01T06:00",
    ] {
        assert!(grid.contains(tick), "runs grid lacks {tick}:\n{grid}");
    }
    assert!(
        ws.cdcflow(
            &["run", "-p", "pipeline.toml", "--at", "2024-05-05T00:00:00Z"],
            &[]
        )
        .status
        .success()
    );
    assert_warehouse_matches(&ws, &data, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_catchup_missed_ticks_coalesce() {
    let (ws, data) = scheduled(false);
    assert!(
        ws.cdcflow(
            &["run", "-p", "pipeline.toml", "--at", "2024-05-01T03:30:00Z"],
            &[]
        )
        .status
        .success()
    );
    let caught_up = ws.cdcflow(
        &["run", "-p", "pipeline.toml", "--at", "2024-05-01T06:30:00Z"],
        &[],
    );
    assert_eq!(
        output(&caught_up).matches("(schedule)").count(),
        1,
        "{}",
        output(&caught_up)
    );
    assert_eq!(
        loaded_objects(&ws) as usize,
        objects_before(&ws, "orders", "2024-05-01T06:00:00Z")
    );
    let manual = ws.cdcflow(&["run", "-p", "pipeline.toml", "--now"], &[]);
    assert!(output(&manual).contains("(manual)"), "{}", output(&manual));
    assert_warehouse_matches(&ws, &data, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_twice_equals_one_clean_run() {
    let ws = Workspace::new();
    let data = ws.synth(3000, 32);
    ws.publish_all();
    ws.write_pipeline(4, true);
    assert!(
        ws.cdcflow(&["run", "-p", "pipeline.toml"], &[])
            .status
            .success()
    );

    let dry = ws.cdcflow(
        &[
            "backfill",
            "-p",
            "pipeline.toml",
            "--from",
            "2024-05-02",
            "--to",
            "2024-05-02",
            "--dry-run",
        ],
        &[],
    );
    let listed: Vec<String> = String::from_utf8_lossy(&dry.stdout)
        .lines()
        .filter(|l| l.contains('\t'))
        .map(str::to_string)
        .collect();
    assert!(
        !listed.is_empty() && listed.iter().all(|l| l.contains("/2024/05/02/")),
        "{}",
        output(&dry)
    );
    let outside = "SELECT change_seq, ingested_at FROM orders_history WHERE source_file NOT LIKE '%/2024/05/02/%' ORDER BY change_seq";
    let outside_before = rows(&ws.query(outside).await);
    let loaded_before = rows(
        &ws.query("SELECT max(ingested_at) FROM orders_history")
            .await,
    )[0][0]
        .clone();
    assert!(output(&dry).contains("dry run: nothing was changed"));

    for _ in 0..2 {
        let out = ws.cdcflow(
            &[
                "backfill",
                "-p",
                "pipeline.toml",
                "--from",
                "2024-05-02",
                "--to",
                "2024-05-02",
            ],
            &[],
        );
        assert!(
            out.status.success() && output(&out).contains("(backfill)"),
            "{}",
            output(&out)
        );
        assert_warehouse_matches(&ws, &data, true).await;
    }
    // The day's rows were rewritten by the backfill; the others were not touched.
    let Value::Micros(loaded_before) = loaded_before else {
        panic!()
    };
    let stale = rows(&ws.query(&format!(
        "SELECT count(*) FROM orders_history WHERE source_file LIKE '%/2024/05/02/%' AND CAST(ingested_at AS BIGINT) <= {loaded_before}"
    )).await);
    assert_eq!(stale, vec![vec![Value::Int(0)]]);
    assert_eq!(rows(&ws.query(outside).await), outside_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_crashed_midway_is_finished_by_the_next_run() {
    let (ws, data) = Workspace::published(2000, 33, 3, "");
    assert!(
        ws.cdcflow(&["run", "-p", "pipeline.toml"], &[])
            .status
            .success()
    );
    let crashed = ws.cdcflow(
        &[
            "backfill",
            "-p",
            "pipeline.toml",
            "--from",
            "2024-05-01",
            "--to",
            "2024-05-03",
        ],
        &[("CDCFLOW_FAILPOINT", "load.between_history_and_current@2")],
    );
    assert!(!crashed.status.success());
    assert!(
        ws.cdcflow(&["run", "-p", "pipeline.toml", "--now"], &[])
            .status
            .success()
    );
    assert_warehouse_matches(&ws, &data, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_permanent_ones_are_not() {
    let (ws, data) = Workspace::published(
        1000,
        34,
        1000,
        "[retries]\ncount = 2\ndelay = \"20ms\"\nmax_delay = \"50ms\"",
    );
    let transient = ws.cdcflow(
        &["run", "-p", "pipeline.toml"],
        &[("CDCFLOW_FAULT", "load:transient:1")],
    );
    assert!(transient.status.success(), "{}", output(&transient));
    assert_warehouse_matches(&ws, &data, false).await;
    let grid = output(&ws.cdcflow(&["runs", "-p", "pipeline.toml"], &[]));
    assert!(
        grid.contains("(2 tries)") && grid.contains("injected transient fault at load"),
        "{grid}"
    );

    let (ws, _data) =
        Workspace::published(1000, 34, 1000, "[retries]\ncount = 2\ndelay = \"20ms\"");
    let permanent = ws.cdcflow(
        &["run", "-p", "pipeline.toml"],
        &[("CDCFLOW_FAULT", "load:permanent")],
    );
    assert_eq!(permanent.status.code(), Some(3), "{}", output(&permanent));
    let grid = output(&ws.cdcflow(&["runs", "-p", "pipeline.toml"], &[]));
    assert!(
        grid.contains("✘") && !grid.contains("tries)"),
        "not retried:\n{grid}"
    );

    let (exhausted, _data) =
        Workspace::published(500, 35, 1000, "[retries]\ncount = 2\ndelay = \"10ms\"");
    let out = exhausted.cdcflow(
        &["run", "-p", "pipeline.toml"],
        &[("CDCFLOW_FAULT", "load:transient")],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(
        output(&exhausted.cdcflow(&["runs", "-p", "pipeline.toml"], &[])).contains("(3 tries)")
    );
}

/// Two `run`s started together share the pipeline's tables: each table is
/// loaded by one of them (its tries are in one run only); a process that
/// found every table taken does nothing and says who is loading them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_started_together_never_both_load_a_table() {
    // A transient fault and a 2 s retry delay keep each winner holding its leases.
    let (ws, data) = Workspace::published(1500, 36, 1000, "[retries]\ncount = 1\ndelay = \"2s\"");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_cdcflow"))
            .current_dir(ws.dir.path())
            .args(["run", "-p", "pipeline.toml"])
            .env("CDCFLOW_FAULT", "load:transient:1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let mut outcomes: Vec<(Option<i32>, String)> = [a, b]
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            (out.status.code(), output(&out))
        })
        .collect();
    outcomes.sort();
    assert_eq!(outcomes[0].0, Some(0), "{outcomes:?}");
    match outcomes[1].0 {
        Some(0) => {}
        Some(4) => assert!(
            outcomes[1].1.contains("is being loaded by"),
            "{}",
            outcomes[1].1
        ),
        other => panic!("exit {other:?}: {outcomes:?}"),
    }
    for (table, loaders) in crate::support::runs_per_table(&ws, |_| true) {
        assert_eq!(loaders, 1, "{table}: tried in {loaders} runs");
    }
    assert_warehouse_matches(&ws, &data, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_stops_cleanly_on_sigterm_and_a_restart_finishes() {
    let ws = Workspace::new();
    let data = ws.synth(2000, 37);
    ws.publish_all();
    std::fs::create_dir_all(ws.path("pipelines")).unwrap();
    ws.write_pipeline_with(1, false, "schedule = \"* * * * * *\"");
    std::fs::copy(ws.path("pipeline.toml"), ws.path("pipelines/test.toml")).unwrap();

    let mut daemon = Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .current_dir(ws.dir.path())
        .args(["-v", "schedule", "--pipelines", "pipelines"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(daemon.stderr.take().unwrap()).lines();
    let mut committed = 0;
    while committed < 3 {
        let line = lines.next().expect("daemon output").unwrap();
        committed += usize::from(line.contains("batch committed"));
    }
    assert!(
        Command::new("kill")
            .args(["-TERM", &daemon.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = daemon.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("stop requested")),
        "{rest:?}"
    );
    let loaded = loaded_objects(&ws) as usize;
    assert!(
        loaded < staged_objects(&ws.path("staging"), "orders").len(),
        "the daemon stopped before the end"
    );

    assert!(
        ws.cdcflow(&["run", "-p", "pipelines/test.toml", "--now"], &[])
            .status
            .success()
    );
    assert_warehouse_matches(&ws, &data, false).await;
}
