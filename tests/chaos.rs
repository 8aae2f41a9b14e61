//! Faults at random moments, not only at step boundaries: `cdcflow run` and
//! `cdcflow backfill` are SIGKILLed after a random time, many times over a
//! load of one object per batch; eight runs start at once; and after a final
//! clean run the tables equal the independent replay: no change lost, none
//! doubled.
//!
//! `CDCFLOW_CHAOS_ROUNDS` kills per test (default 4 in `make test`; `make
//! chaos` runs 40) and `CDCFLOW_CHAOS_SEED` the seed of the delays (default:
//! the clock, printed with the figures).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Workspace, assert_warehouse_matches, output};

pub(crate) fn rounds() -> u32 {
    std::env::var("CDCFLOW_CHAOS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
}

/// A small deterministic generator of kill delays.
pub(crate) struct Delays(u64);

impl Delays {
    pub(crate) fn new() -> Self {
        let seed = crate::support::seed_from("CDCFLOW_CHAOS_SEED");
        eprintln!("chaos seed {seed}");
        Delays(seed)
    }

    /// A delay in `[min, max)` milliseconds.
    pub(crate) fn next(&mut self, min: u64, max: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(min + self.0 % (max - min))
    }
}

fn spawn(ws: &Workspace, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .current_dir(ws.dir.path())
        .args(args)
        .env_remove("CDCFLOW_FAILPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cdcflow")
}

/// Starts `args` `rounds` times, each SIGKILLed after a random delay of up
/// to `max_ms` (if still running). Returns (kills, runs that finished first).
pub(crate) fn kill_at_random(
    ws: &Workspace,
    args: &[&str],
    rounds: u32,
    max_ms: u64,
    delays: &mut Delays,
) -> (u32, u32) {
    let (mut killed, mut finished) = (0, 0);
    for _ in 0..rounds {
        let mut child = spawn(ws, args);
        let deadline = Instant::now() + delays.next(20, max_ms);
        loop {
            if child.try_wait().unwrap().is_some() {
                finished += 1;
                break;
            }
            if Instant::now() >= deadline {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                killed += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    (killed, finished)
}

/// Runs `args` until it succeeds (a killed run may leave a lease that a
/// later run takes over: a dead process of this host, at once).
pub(crate) fn run_clean(ws: &Workspace, args: &[&str]) {
    let out = ws.cdcflow(args, &[]);
    assert!(out.status.success(), "clean run: {}", output(&out));
}

/// Kills and their figures.
pub(crate) struct Figures {
    /// Processes SIGKILLed.
    pub(crate) killed: u32,
    /// Processes that ended before their kill.
    pub(crate) finished: u32,
}

/// The fault rounds over `ws` (its dataset staged, `pipeline.toml` written
/// with one object per batch): `rounds` runs, each after publishing the
/// next objects so that every run has work, then `rounds` backfills of
/// everything, each SIGKILLed at a random moment; then a clean run and a
/// clean backfill.
pub(crate) fn kill_runs_and_backfills(ws: &Workspace, rounds: u32, delays: &mut Delays) -> Figures {
    let run = ["run", "--now", "-p", "pipeline.toml"];
    let tables = ["orders", "order_items"];
    let counts: Vec<usize> = tables
        .iter()
        .map(|t| crate::support::staged_objects(&ws.path("staging"), t).len())
        .collect();
    let mut figures = Figures {
        killed: 0,
        finished: 0,
    };
    for round in 0..rounds as usize {
        for (table, count) in tables.iter().zip(&counts) {
            let per_round = count.div_ceil(rounds as usize);
            ws.publish(table, round * per_round..(round + 1) * per_round);
        }
        let (killed, finished) = kill_at_random(ws, &run, 1, 4000, delays);
        figures.killed += killed;
        figures.finished += finished;
    }
    // The objects no round published (copying one again would change its ETag).
    for (table, count) in tables.iter().zip(&counts) {
        ws.publish(
            table,
            count.div_ceil(rounds as usize) * rounds as usize..usize::MAX,
        );
    }
    run_clean(ws, &run);
    let (killed, finished) =
        kill_at_random(ws, &crate::support::BACKFILL_ALL, rounds, 4000, delays);
    figures.killed += killed;
    figures.finished += finished;
    run_clean(ws, &run);
    run_clean(ws, &crate::support::BACKFILL_ALL);
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_and_backfills_killed_at_random_moments_lose_and_double_nothing() {
    let ws = Workspace::new();
    let data = ws.synth(2500, 51);
    ws.write_pipeline(1, true);
    let figures = kill_runs_and_backfills(&ws, rounds(), &mut Delays::new());
    assert_warehouse_matches(&ws, &data, true).await;
    let changes: usize = data.tables.iter().map(|t| t.changes.len()).sum();
    println!(
        "chaos (local warehouse): {} runs and backfills SIGKILLed, {} ended before their kill; \
         {changes} changes compared with the replay: 0 lost, 0 doubled",
        figures.killed, figures.finished
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_runs_at_once_each_table_is_loaded_by_one() {
    let ws = Workspace::new();
    let data = ws.synth(1500, 52);
    ws.publish_all();
    ws.write_pipeline(2, false);
    let children: Vec<Child> = (0..8)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_cdcflow"))
                .current_dir(ws.dir.path())
                .args(["run", "--now", "-p", "pipeline.toml"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
    for out in &outs {
        assert!(
            matches!(out.status.code(), Some(0 | 4)),
            "each run works or is refused (exit 4): {}",
            output(out)
        );
    }
    // The first to take a table's lease loads all of it: a run after it
    // finds nothing new there.
    for (table, loaders) in crate::support::runs_per_table(&ws, |a| a.rows > 0) {
        assert_eq!(loaders, 1, "{table}: loaded by {loaders} runs: {codes:?}");
    }
    assert_warehouse_matches(&ws, &data, false).await;
    println!(
        "chaos: 8 runs at once: {} refused, {} ran: exit codes {codes:?}",
        codes.iter().filter(|c| **c == Some(4)).count(),
        codes.iter().filter(|c| **c == Some(0)).count()
    );
}

/// A tmpfs mounted at a workspace folder, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `300k`) at `dir`; `None` where this
    /// machine does not let the test mount (not root, or no CAP_SYS_ADMIN).
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The local warehouse's disk fills up in the middle of a load: the run
/// fails with an error that says so, nothing half-written is committed, and
/// once there is room the next run completes with the tables the replay
/// expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_warehouse_disk_is_a_clear_error_and_the_next_run_completes() {
    let ws = Workspace::new();
    let data = ws.synth(1500, 53);
    ws.publish_all();
    let path = ws.write_pipeline(2, true);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}\n[retries]\ncount = 1\ndelay = \"100ms\"\n"),
    )
    .unwrap();
    let Some(disk) = Tmpfs::mount(&ws.path("warehouse"), "400k") else {
        eprintln!("SKIPPED: this machine does not let the test mount a tmpfs (needs root)");
        return;
    };
    let full = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    let text = output(&full);
    assert_eq!(full.status.code(), Some(3), "{text}");
    assert!(text.contains("No space left on device"), "{text}");
    disk.resize("64m");
    run_clean(&ws, &["run", "--now", "-p", "pipeline.toml"]);
    assert_warehouse_matches(&ws, &data, true).await;
    drop(disk);
}

/// Streaming `cdcflow capture` started again and again, each time SIGKILLed
/// after a random 0.2 to 1.5 s, until `workload` (a real client's, in the
/// background) ends; returns the kills and the workload's answer.
pub(crate) async fn kill_capture_while<T>(
    ws: &Workspace,
    workload: tokio::task::JoinHandle<T>,
    delays: &mut Delays,
) -> (u32, T) {
    let mut kills = 0;
    while !workload.is_finished() {
        let mut capture = spawn(ws, &["capture", "--config", "capture.toml"]);
        tokio::time::sleep(delays.next(200, 1500)).await;
        capture.kill().expect("SIGKILL");
        capture.wait().expect("reap");
        kills += 1;
    }
    (kills, workload.await.expect("the workload"))
}

/// Seconds of each workload segment of the soak tests: half of
/// `CDCFLOW_CHAOS_ROUNDS`, at least 2 (2 s in `make test`, 20 s in `make chaos`).
pub(crate) fn soak_secs() -> u32 {
    (rounds() / 2).max(2)
}

/// Whether the soak restarts the database server itself (`make chaos`,
/// where the tests run one at a time), not only the connections to it.
pub(crate) fn restart_servers() -> bool {
    std::env::var("CDCFLOW_SOAK_RESTART").is_ok_and(|v| v == "1")
}
