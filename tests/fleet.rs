//! A fleet: several `cdcflow schedule` processes (pods, each with its own
//! host name) over one pipelines folder, one PostgreSQL state database and
//! Delta tables in S3 (moto). They share the pipelines table by table; one
//! is SIGKILLed while it holds tables, and the others take them over once
//! its leases run out (the pipelines' next tick is an hour away, so nothing
//! else would load them). Every table then equals its replay.
//!
//! `CDCFLOW_FLEET_PIPELINES` (default 6; `make chaos` runs 40) pipelines of
//! five tables each; `CDCFLOW_FLEET_WORKERS` the fleet sizes whose rate is
//! measured (default "2"; `make chaos` runs "1,2,4"). The figures are
//! printed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::lakehouse::s3_warehouse;
use crate::s3::bucket;
use crate::support::{
    Workspace, assert_table_matches, drop_pg_database, peer, pg_connect, pg_database,
    staged_objects,
};
use cdcflow::synth::{Dataset, SynthTable};

/// The tables of each pipeline: (source folder and target, generated table).
const TABLES: [(&str, usize); 5] = [
    ("orders", 0),
    ("order_items", 1),
    ("orders_b", 0),
    ("order_items_b", 1),
    ("orders_c", 0),
];

/// A lease's time to live in the fleet's pipelines: how long a dead
/// worker's tables wait.
const LEASE_TTL_SECS: u64 = 10;

fn setting<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Copies the generated objects of each of [`TABLES`] into `source/public/<name>`.
fn publish(ws: &Workspace, data: &Dataset) -> usize {
    let mut objects = 0;
    for (name, generated) in TABLES {
        let from = data.tables[generated].name;
        for rel in staged_objects(&ws.path("staging"), from) {
            let published = rel.to_string_lossy().replacen(
                &format!("public/{from}/"),
                &format!("public/{name}/"),
                1,
            );
            let to = ws.source().join(published);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(ws.path("staging").join(&rel), to).unwrap();
            objects += 1;
        }
    }
    objects
}

/// Writes `pipelines` pipeline files `<round>_p<i>` into folder `round`:
/// hourly, their state in `state`, their tables under `s3://bucket/<name>`.
fn write_pipelines(
    ws: &Workspace,
    round: &str,
    pipelines: usize,
    state: &str,
    (endpoint, bucket): (&str, &str),
) {
    let folder = ws.path(round);
    std::fs::create_dir_all(&folder).unwrap();
    for i in 0..pipelines {
        let name = format!("{round}_p{i}");
        let warehouse =
            s3_warehouse(endpoint, bucket, true).replace("/warehouse\"", &format!("/{name}\""));
        let mut text = format!(
            "name = \"{name}\"\nschedule = \"0 * * * *\"\nlease_ttl = \"{LEASE_TTL_SECS}s\"\n\
             [source]\nurl = \"file://{source}\"\ntimestamp_column = \"dms_timestamp\"\n\
             [state]\nurl = \"{state}\"\n[warehouse]\n{warehouse}\n",
            source = ws.source().display()
        );
        for (table, generated) in TABLES {
            text.push_str(&format!(
                "[[tables]]\nschema = \"public\"\nname = \"{table}\"\nprimary_key = {}\n",
                if generated == 0 {
                    "[\"id\"]\ncolumns = [{ name = \"id\", type = \"bigint\" }, \
                     { name = \"customer\", type = \"text\" }, \
                     { name = \"amount\", type = \"decimal(12,2)\" }, \
                     { name = \"status\", type = \"text\" }, { name = \"note\", type = \"text\" }, \
                     { name = \"created_at\", type = \"timestamptz\" }]"
                } else {
                    "[\"order_id\", \"line_no\"]"
                }
            ));
        }
        std::fs::write(folder.join(format!("{name}.toml")), text).unwrap();
    }
}

/// Worker processes, SIGKILLed when dropped (a failed test leaves none).
struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for worker in &mut self.0 {
            let _ = worker.kill();
            let _ = worker.wait();
        }
    }
}

/// Starts `workers` schedulers over folder `round`, each with its own host
/// name (`worker-<n>`), as pods have.
fn start(ws: &Workspace, round: &str, workers: usize) -> Fleet {
    let workers = (0..workers)
        .map(|n| {
            let log = std::fs::File::create(ws.path(&format!("{round}-worker-{n}.log"))).unwrap();
            Command::new(env!("CARGO_BIN_EXE_cdcflow"))
                .current_dir(ws.dir.path())
                .args(["schedule", "--pipelines", round, "-v"])
                .env("HOSTNAME", format!("worker-{n}"))
                .env_remove("CDCFLOW_FAILPOINT")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap()
        })
        .collect();
    Fleet(workers)
}

/// Stops the workers (SIGTERM: the batches in flight finish).
fn stop(mut fleet: Fleet) {
    for worker in &mut fleet.0 {
        let _ = Command::new("kill")
            .args(["-TERM", &worker.id().to_string()])
            .status();
        let _ = worker.wait();
    }
}

/// The objects of pipelines `<round>_…` recorded as loaded.
async fn loaded(pg: &tokio_postgres::Client, round: &str) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM cdcflow.objects WHERE pipeline LIKE $1 AND status = 'processed'",
        &[&format!("{round}\\_%")],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(0)
}

/// The table leases worker 0 holds.
async fn held_by_worker_0(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM cdcflow.table_leases WHERE owner LIKE 'worker-0:%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Waits until `expected` objects of round `round` are loaded, at most
/// `limit`; the time it took.
async fn until_loaded(
    pg: &tokio_postgres::Client,
    round: &str,
    expected: i64,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    while loaded(pg, round).await < expected {
        assert!(
            started.elapsed() < limit,
            "round {round}: {} of {expected} objects loaded after {limit:?}",
            loaded(pg, round).await,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// Asserts that every table of every pipeline of round `round` equals the replay.
async fn assert_round_matches(ws: &Workspace, round: &str, pipelines: usize, data: &Dataset) {
    for i in 0..pipelines {
        let file = ws.path(&format!("{round}/{round}_p{i}.toml"));
        let runner =
            cdcflow::pipeline::Runner::open(cdcflow::config::load(&file).unwrap()).unwrap();
        for (target, generated) in TABLES {
            let table: &SynthTable = &data.tables[generated];
            assert_table_matches(&runner, table, target, false).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_shares_the_pipelines_and_takes_over_a_killed_workers_tables() {
    let Some(endpoint) = peer("CDCFLOW_TEST_S3_ENDPOINT") else {
        return;
    };
    let ws = Workspace::new();
    let Some((admin, database, state)) = pg_database("CDCFLOW_TEST_PG_URL", &ws, "fleet_").await
    else {
        return;
    };
    let bucket = bucket(&endpoint, &ws).await;
    let data = ws.synth(600, 61);
    let per_pipeline = publish(&ws, &data) as i64;
    let pipelines: usize = setting("CDCFLOW_FLEET_PIPELINES", 6);
    let sizes: Vec<usize> = std::env::var("CDCFLOW_FLEET_WORKERS")
        .unwrap_or_else(|_| "2".into())
        .split(',')
        .map(|n| n.trim().parse().expect("CDCFLOW_FLEET_WORKERS: numbers"))
        .collect();
    let expected = per_pipeline * pipelines as i64;
    let pg = pg_connect(&state).await;
    let at = (endpoint.as_str(), bucket.as_str());
    let tables = pipelines * TABLES.len();

    for &workers in &sizes {
        let round = format!("w{workers}");
        write_pipelines(&ws, &round, pipelines, &state, at);
        let fleet = start(&ws, &round, workers);
        let took = until_loaded(&pg, &round, expected, Duration::from_secs(900)).await;
        stop(fleet);
        eprintln!(
            "fleet: {workers} worker(s), {pipelines} pipelines x {} tables ({expected} objects): \
             {:.1} s, {:.2} tables/s",
            TABLES.len(),
            took.as_secs_f64(),
            tables as f64 / took.as_secs_f64()
        );
        // Every object is loaded (above); the tables' contents are checked
        // in the round with the kill, the one that could lose or double.
    }

    // A worker SIGKILLed while it holds tables: the others take them over
    // once its leases run out.
    let workers = sizes.iter().copied().max().unwrap_or(2).max(2);
    let round = "kill";
    write_pipelines(&ws, round, pipelines, &state, at);
    let mut fleet = start(&ws, round, workers);
    let started = Instant::now();
    loop {
        if held_by_worker_0(&pg).await > 0 && loaded(&pg, round).await > 0 {
            break;
        }
        assert!(
            loaded(&pg, round).await < expected && started.elapsed() < Duration::from_secs(300),
            "worker 0 never held a table while work was left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut victim = fleet.0.remove(0);
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let killed = Instant::now();
    let orphaned = held_by_worker_0(&pg).await;
    let before = loaded(&pg, round).await;
    // The next tick is an hour away: only the take-over loads the rest in time.
    let limit = Duration::from_secs(LEASE_TTL_SECS * 12 + pipelines as u64 * 5);
    let took = until_loaded(&pg, round, expected, limit).await;
    stop(fleet);
    eprintln!(
        "fleet: worker 0 of {workers} SIGKILLed holding {orphaned} table lease(s) with \
         {before}/{expected} objects loaded; every table loaded {:.1} s later (lease_ttl {LEASE_TTL_SECS} s)",
        took.as_secs_f64()
    );
    assert!(killed.elapsed() >= took);
    assert_round_matches(&ws, round, pipelines, &data).await;
    drop(pg);
    drop_pg_database(&admin, &database).await;
}
