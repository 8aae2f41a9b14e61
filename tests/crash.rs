//! Crash safety: the process aborts (like kill -9) at every step boundary of
//! the run protocol; the next run must leave the warehouse exactly as a
//! clean run would: no change lost, none doubled.

use cdcflow::failpoint::NAMES;

use crate::support::{Workspace, assert_warehouse_matches, pg_database};

/// Where a crash test keeps its state (and its tables).
#[derive(Clone, Copy)]
enum Store {
    Sqlite,
    Postgres,
    /// State in PostgreSQL, Delta tables in S3 (current state by MERGE).
    Lakehouse,
}

async fn crash_then_recover(failpoint: &str) {
    crash_then_recover_in(failpoint, Store::Sqlite).await;
}

async fn crash_then_recover_in(failpoint: &str, store: Store) {
    let ws = Workspace::new();
    let data = ws.synth(1500, 11);
    ws.publish_all();
    ws.write_pipeline(3, true);
    if let Store::Lakehouse = store {
        let Some(endpoint) = crate::support::peer("CDCFLOW_TEST_S3_ENDPOINT") else {
            return;
        };
        let bucket = crate::s3::bucket(&endpoint, &ws).await;
        let warehouse = crate::lakehouse::s3_warehouse(&endpoint, &bucket, false);
        ws.write_pipeline_into("pipeline.toml", 3, true, "", &warehouse);
    }
    let database = match store {
        Store::Sqlite => None,
        Store::Postgres | Store::Lakehouse => {
            let Some((admin, name, url)) = pg_database("CDCFLOW_TEST_PG_URL", &ws, "crash_").await
            else {
                return;
            };
            ws.set_state_url("pipeline.toml", &url);
            Some((admin, name))
        }
    };

    let crashed = ws.cdcflow(
        &["run", "--pipeline", "pipeline.toml"],
        &[("CDCFLOW_FAILPOINT", failpoint)],
    );
    assert!(
        !crashed.status.success(),
        "{failpoint}: the run should have aborted"
    );
    assert!(
        String::from_utf8_lossy(&crashed.stderr).contains("failpoint"),
        "{failpoint}: aborted for another reason: {}",
        String::from_utf8_lossy(&crashed.stderr)
    );

    let status = ws.cdcflow(&["status", "--pipeline", "pipeline.toml"], &[]);
    assert!(status.status.success());
    if failpoint.starts_with("plan") || failpoint.starts_with("load") {
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            text.contains("a batch is pending"),
            "{failpoint}: status should show the pending batch:\n{text}"
        );
    }

    let recovered = ws.cdcflow(&["run", "--pipeline", "pipeline.toml"], &[]);
    assert!(
        recovered.status.success(),
        "{failpoint}: {}",
        String::from_utf8_lossy(&recovered.stderr)
    );
    assert_warehouse_matches(&ws, &data, true).await;
    if let Some((admin, name)) = database {
        crate::support::drop_pg_database(&admin, &name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_boundary_of_the_first_batch() {
    for name in NAMES {
        crash_then_recover(name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_boundary_of_a_later_batch() {
    for name in NAMES {
        crash_then_recover(&format!("{name}@3")).await;
    }
}

/// The same protocol with the state in PostgreSQL (`[state] url =
/// "postgres://…"`): the batch a crash left planned is found there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_boundary_with_the_state_in_postgres() {
    for name in NAMES {
        crash_then_recover_in(&format!("{name}@2"), Store::Postgres).await;
    }
}

/// The same with the tables in S3 (what a pod with no volume runs): the
/// Delta commits a crash cut short are found, or redone, in S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_boundary_with_the_tables_in_s3() {
    for name in NAMES {
        crash_then_recover_in(&format!("{name}@2"), Store::Lakehouse).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_replaced_before_its_batch_loaded_is_taken_as_it_is_now() {
    let ws = Workspace::new();
    let data = ws.synth(1200, 12);
    ws.publish_all();
    ws.write_pipeline(100, false);
    let crashed = ws.cdcflow(
        &["run", "--pipeline", "pipeline.toml"],
        &[("CDCFLOW_FAILPOINT", "plan.after_record")],
    );
    assert!(!crashed.status.success());
    // Same bytes written again: a new ETag (modification time) for an object of the recorded batch.
    let first = ws
        .source()
        .join(&crate::support::staged_objects(&ws.path("staging"), "orders")[0]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&first, std::fs::read(&first).unwrap()).unwrap();
    let rerun = ws.cdcflow(&["run", "--pipeline", "pipeline.toml"], &[]);
    assert!(rerun.status.success(), "{}", crate::support::output(&rerun));
    assert_warehouse_matches(&ws, &data, false).await;
}

/// The crash tests need the crash switches compiled in.
#[test]
fn failpoints_are_compiled_in() {
    if !cdcflow::failpoint::ENABLED {
        panic!(
            "the crash tests need the crash switches: run `make test`, or `cargo test --features failpoints`"
        );
    }
}
