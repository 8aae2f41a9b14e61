//! The state-store contract (ARCHITECTURE §6, `state::{Manifest, RunLog,
//! Leases}`), run against every store: SQLite and PostgreSQL. Each test is
//! called from async code on a runtime, as the pipeline calls the stores,
//! and opens a store twice where two processes would.

use std::sync::Arc;
use std::time::Duration;

use cdcflow::config::StateConfig;
use cdcflow::error::RetryPolicy;
use cdcflow::state::{
    BatchMode, BatchStats, LeaseOutcome, ObjectRef, ObjectStatus, Restored, RunTotals, StateStore,
    TableTotals, TaskAttempt, TaskState, Trigger,
};
use chrono::DateTime;

use crate::support::{TcpProxy, Workspace, pg_database};

/// Where the stores of one test live.
struct Stores {
    config: StateConfig,
    /// A PostgreSQL test database to drop at the end.
    database: Option<(tokio_postgres::Client, String)>,
    _ws: Workspace,
}

impl Stores {
    fn sqlite() -> Stores {
        let ws = Workspace::new();
        Stores {
            config: StateConfig::Sqlite(ws.path("state.db")),
            database: None,
            _ws: ws,
        }
    }

    async fn postgres() -> Option<Stores> {
        let ws = Workspace::new();
        let (admin, name, url) = pg_database("CDCFLOW_TEST_PG_URL", &ws, "state_").await?;
        Some(Stores {
            config: postgres_config(&url),
            database: Some((admin, name)),
            _ws: ws,
        })
    }

    /// The store of `pipeline`: a new handle each call, as a new process opens it.
    fn open(&self, pipeline: &str) -> Arc<dyn StateStore> {
        cdcflow::state::open(&self.config, pipeline).expect("open the store")
    }

    async fn drop(self) {
        if let Some((admin, name)) = self.database {
            crate::support::drop_pg_database(&admin, &name).await;
        }
    }
}

/// A PostgreSQL state of version 1 (one lease per pipeline, no billed
/// bytes) moves to version 3 when opened: its pipeline lease table is
/// dropped (a version-1 process still running then fails rather than
/// running beside this one) and the batches get their bytes columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_postgres_state_moves_to_version_3_without_the_pipeline_leases() {
    let ws = Workspace::new();
    let Some((admin, name, url)) = pg_database("CDCFLOW_TEST_PG_URL", &ws, "v1_").await else {
        return;
    };
    let config = postgres_config(&url);
    drop(cdcflow::state::open(&config, "p").unwrap());
    let db = crate::support::pg_connect(&url).await;
    db.batch_execute(
        "CREATE TABLE cdcflow.leases (pipeline TEXT PRIMARY KEY, owner TEXT NOT NULL,
           acquired_at TIMESTAMPTZ NOT NULL, expires_at TIMESTAMPTZ NOT NULL);
         INSERT INTO cdcflow.leases VALUES ('p', 'old:1:0', now(), now() + interval '1 hour');
         ALTER TABLE cdcflow.batches DROP COLUMN bytes_processed, DROP COLUMN bytes_billed;
         UPDATE cdcflow.schema_version SET version = 1;",
    )
    .await
    .unwrap();
    drop(cdcflow::state::open(&config, "p").unwrap());
    let row = db
        .query_one(
            "SELECT (SELECT version FROM cdcflow.schema_version),
                    to_regclass('cdcflow.leases') IS NULL,
                    to_regclass('cdcflow.table_leases') IS NOT NULL,
                    (SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = 'cdcflow'
                       AND table_name = 'batches' AND column_name LIKE 'bytes_%')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i32>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2),
            row.get::<_, i64>(3)
        ),
        (3, true, true, 2)
    );
    drop(db);
    crate::support::drop_pg_database(&admin, &name).await;
}

fn postgres_config(url: &str) -> StateConfig {
    let (url, tls) = cdcflow::tls::Tls::from_url(url, false).unwrap();
    StateConfig::Postgres {
        url,
        tls,
        password_env: "CDCFLOW_TEST_NO_PASSWORD".into(),
    }
}

/// Each contract test, against SQLite and against PostgreSQL.
macro_rules! in_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let stores = super::Stores::sqlite();
                super::$name(&stores);
                stores.drop().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(stores) = super::Stores::postgres().await else {
                    return;
                };
                super::$name(&stores);
                stores.drop().await;
            }
        }
    )*};
}

in_both_stores!(
    a_batch_is_planned_then_committed_once_with_its_objects,
    a_pending_batch_is_replanned_or_removed,
    restore_replaces_a_tables_batches_and_keeps_other_decisions,
    an_object_is_in_one_state_and_processed_is_final,
    one_lease_holder_at_a_time,
    a_taken_over_lease_fences_the_old_holders_writes,
    of_many_takers_at_once_one_gets_the_lease,
    runs_attempts_ticks_and_listings_are_kept,
    each_pipeline_has_its_own_id_and_state,
    of_two_planners_at_once_one_plans,
    totals_sum_what_was_committed_and_tried,
    incidents_open_and_resolve_per_pipeline,
    attempt_logs_are_kept_per_try_for_the_newest_runs,
);

fn obj(key: &str) -> ObjectRef {
    ObjectRef {
        key: key.into(),
        etag: format!("etag-{key}"),
        size: key.len() as u64 * 100,
        last_modified: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
    }
}

fn processed(store: &dyn StateStore, key: &str) -> Option<i64> {
    match store.objects("s.t").unwrap().get(key)?.status {
        ObjectStatus::Processed { batch_no } => Some(batch_no),
        _ => None,
    }
}

fn a_batch_is_planned_then_committed_once_with_its_objects(stores: &Stores) {
    let store = stores.open("p");
    assert_eq!(store.pending_batch("s.t").unwrap(), None);
    assert_eq!(store.last_batch("s.t").unwrap(), None);
    let b1 = store
        .plan_batch("s.t", &[obj("a"), obj("bb")], BatchMode::Append)
        .unwrap();
    assert_eq!(b1.number, 1);
    assert_eq!(b1.id, cdcflow::state::Batch::id_of("p", "s.t", &b1.objects));
    let again = store.plan_batch("s.t", &[obj("c")], BatchMode::Append);
    assert!(again.is_err(), "one planned batch per table");
    // Another table plans on its own.
    assert_eq!(
        store
            .plan_batch("s.u", &[obj("a")], BatchMode::Replace)
            .unwrap()
            .number,
        1
    );
    // The pending batch, as a new process reads it: objects in order, every field.
    let reopened = stores.open("p");
    assert_eq!(reopened.pending_batch("s.t").unwrap(), Some(b1.clone()));
    assert_eq!(
        reopened.pending_batch("s.u").unwrap().unwrap().mode,
        BatchMode::Replace
    );
    assert_eq!(processed(&*reopened, "a"), None, "planned is not processed");

    let at = DateTime::from_timestamp(1_700_000_123, 456_000).unwrap();
    let stats = BatchStats {
        rows: 7,
        inserts: 4,
        updates: 2,
        deletes: 1,
        max_seq: Some("0000000009".into()),
        max_commit_ts: Some(at),
        bytes_processed: Some(10_485_760),
        bytes_billed: Some(11_534_336),
    };
    store.commit_batch("s.t", 1, &stats).unwrap();
    assert!(
        store.commit_batch("s.t", 1, &stats).is_err(),
        "a committed batch is not committed again"
    );
    let reopened = stores.open("p");
    assert_eq!(reopened.pending_batch("s.t").unwrap(), None);
    assert_eq!(processed(&*reopened, "a"), Some(1));
    assert_eq!(processed(&*reopened, "bb"), Some(1));
    let recorded = &reopened.objects("s.t").unwrap()["bb"].object;
    assert_eq!((recorded.etag.as_str(), recorded.size), ("etag-bb", 200));
    let last = reopened.last_batch("s.t").unwrap().unwrap();
    assert_eq!(
        (last.number, last.id.as_str(), last.objects),
        (1, b1.id.as_str(), 2)
    );
    assert_eq!(
        (
            last.stats.rows,
            last.stats.inserts,
            last.stats.updates,
            last.stats.deletes
        ),
        (7, 4, 2, 1)
    );
    assert_eq!(
        (last.stats.bytes_processed, last.stats.bytes_billed),
        (Some(10_485_760), Some(11_534_336))
    );
    assert_eq!(
        reopened.max_seq("s.t").unwrap().as_deref(),
        Some("0000000009")
    );
    assert_eq!(reopened.max_commit_ts("s.t").unwrap(), Some(at));

    // Numbers grow; the watermark never moves back.
    let b2 = store
        .plan_batch("s.t", &[obj("c")], BatchMode::Append)
        .unwrap();
    assert_eq!(b2.number, 2);
    let older = BatchStats {
        max_seq: Some("0000000003".into()),
        ..Default::default()
    };
    store.commit_batch("s.t", 2, &older).unwrap();
    assert_eq!(store.max_seq("s.t").unwrap().as_deref(), Some("0000000009"));
    assert_eq!(store.last_batch("s.t").unwrap().unwrap().number, 2);
    // The recent batches, newest first, each with its times and figures.
    let recent = stores.open("p").recent_batches("s.t", 10).unwrap();
    assert_eq!(
        recent.iter().map(|b| b.number).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(recent[1].stats.max_commit_ts, Some(at));
    assert!(recent.iter().all(|b| b.planned_at <= b.committed_at));
    assert_eq!(store.recent_batches("s.t", 1).unwrap().len(), 1);
}

fn a_pending_batch_is_replanned_or_removed(stores: &Stores) {
    let store = stores.open("p");
    let planned = store
        .plan_batch("s.t", &[obj("a"), obj("b"), obj("c")], BatchMode::Replace)
        .unwrap();
    let shrunk = store
        .replan_batch("s.t", planned.number, &[obj("a"), obj("c")])
        .unwrap()
        .unwrap();
    assert_eq!(shrunk.objects, vec![obj("a"), obj("c")]);
    assert_eq!(shrunk.mode, BatchMode::Replace, "the mode is kept");
    assert_ne!(shrunk.id, planned.id, "the id follows the objects");
    assert_eq!(stores.open("p").pending_batch("s.t").unwrap(), Some(shrunk));
    assert_eq!(
        store.replan_batch("s.t", planned.number, &[]).unwrap(),
        None
    );
    assert_eq!(store.pending_batch("s.t").unwrap(), None);
    assert_eq!(
        store
            .plan_batch("s.t", &[obj("d")], BatchMode::Append)
            .unwrap()
            .number,
        1,
        "a removed batch loaded nothing: its number is free again"
    );
}

fn restore_replaces_a_tables_batches_and_keeps_other_decisions(stores: &Stores) {
    let store = stores.open("p");
    store
        .plan_batch("s.t", &[obj("a")], BatchMode::Append)
        .unwrap();
    store
        .commit_batch("s.t", 1, &BatchStats::default())
        .unwrap();
    store
        .quarantine("s.t", &obj("bad"), "line 3: not a number")
        .unwrap();
    store.skip("s.t", &obj("skipped"), "operator").unwrap();
    store
        .plan_batch("s.t", &[obj("old")], BatchMode::Append)
        .unwrap();

    let pending = cdcflow::state::Batch {
        number: 6,
        id: "pending-id".into(),
        objects: vec![obj("e")],
        mode: BatchMode::Append,
    };
    let restored = Restored {
        number: 5,
        id: "restored-id".into(),
        objects: vec![obj("a"), obj("b"), obj("c")],
        stats: BatchStats {
            rows: 30,
            max_seq: Some("42".into()),
            ..Default::default()
        },
        pending: Some(pending.clone()),
    };
    store.restore("s.t", &restored).unwrap();
    let reopened = stores.open("p");
    for key in ["a", "b", "c"] {
        assert_eq!(processed(&*reopened, key), Some(5), "{key}");
    }
    let objects = reopened.objects("s.t").unwrap();
    assert!(
        matches!(&objects["bad"].status, ObjectStatus::Quarantined { error } if error == "line 3: not a number")
    );
    assert!(
        matches!(&objects["skipped"].status, ObjectStatus::Skipped { reason } if reason == "operator")
    );
    assert!(
        !objects.contains_key("e"),
        "the pending batch's objects are not processed"
    );
    assert_eq!(reopened.pending_batch("s.t").unwrap(), Some(pending));
    let last = reopened.last_batch("s.t").unwrap().unwrap();
    assert_eq!(
        (last.number, last.id.as_str(), last.objects),
        (5, "restored-id", 3)
    );
    assert_eq!(reopened.max_seq("s.t").unwrap().as_deref(), Some("42"));
}

fn an_object_is_in_one_state_and_processed_is_final(stores: &Stores) {
    let store = stores.open("p");
    store.quarantine("s.t", &obj("a"), "bad header").unwrap();
    store.release("s.t", "a").unwrap();
    assert!(!store.objects("s.t").unwrap().contains_key("a"), "released");
    store.quarantine("s.t", &obj("a"), "bad again").unwrap();
    store.skip("s.t", &obj("a"), "known bad").unwrap();
    assert!(matches!(
        &store.objects("s.t").unwrap()["a"].status,
        ObjectStatus::Skipped { reason } if reason == "known bad"
    ));
    store.release("s.t", "a").unwrap();
    assert!(
        store.objects("s.t").unwrap().contains_key("a"),
        "release forgets quarantines only"
    );
    // A quarantined object later loaded by a batch is processed, its error gone.
    store.quarantine("s.t", &obj("b"), "bad").unwrap();
    store
        .plan_batch("s.t", &[obj("b")], BatchMode::Append)
        .unwrap();
    store
        .commit_batch("s.t", 1, &BatchStats::default())
        .unwrap();
    assert_eq!(processed(&*store, "b"), Some(1));
    store.skip("s.t", &obj("b"), "no").unwrap();
    store.quarantine("s.t", &obj("b"), "no").unwrap();
    store.release("s.t", "b").unwrap();
    assert_eq!(
        processed(&*stores.open("p"), "b"),
        Some(1),
        "processed is final"
    );
}

/// The fencing token of an acquired lease; panics when it is held.
fn token(outcome: LeaseOutcome) -> i64 {
    match outcome {
        LeaseOutcome::Acquired { token } => token,
        held => panic!("expected the lease, got {held:?}"),
    }
}

/// One holder per table at a time, each table its own; each take gives a
/// greater token than every take of any table of the pipeline before.
fn one_lease_holder_at_a_time(stores: &Stores) {
    let (a, b) = (stores.open("p"), stores.open("p"));
    let ttl = Duration::from_secs(60);
    let first = token(a.acquire_lease("s.t", "a", ttl, None).unwrap());
    let again = token(a.acquire_lease("s.t", "a", ttl, None).unwrap());
    assert!(again > first, "re-entrant, with a new token");
    assert!(
        matches!(b.acquire_lease("s.t", "b", ttl, None).unwrap(), LeaseOutcome::Held { owner, .. } if owner == "a")
    );
    assert!(matches!(b.lease_holder("s.t").unwrap(), Some((owner, _)) if owner == "a"));
    // Another table of the pipeline is free: two workers share the pipeline.
    assert_eq!(b.lease_holder("s.u").unwrap(), None);
    let other_table = token(b.acquire_lease("s.u", "b", ttl, None).unwrap());
    assert!(
        other_table > again,
        "tokens grow across the pipeline's tables"
    );
    assert_eq!(a.renew_lease("a", ttl).unwrap(), 1);
    assert_eq!(b.renew_lease("b", ttl).unwrap(), 1);
    assert_eq!(a.renew_lease("c", ttl).unwrap(), 0, "c holds nothing");
    let (_, before) = a.lease_holder("s.t").unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(2));
    a.renew_lease("a", ttl).unwrap();
    let (_, renewed) = a.lease_holder("s.t").unwrap().unwrap();
    assert!(
        renewed > before,
        "a renewal moves the end: {before} {renewed}"
    );
    b.release_lease("b").unwrap();
    assert_eq!(a.lease_holder("s.u").unwrap(), None, "released");
    assert_eq!(
        a.renew_lease("a", ttl).unwrap(),
        1,
        "only the holder releases"
    );
    assert_eq!(b.renew_lease("b", ttl).unwrap(), 0, "b gave s.u up");
    a.release_lease("a").unwrap();
    let released = token(b.acquire_lease("s.t", "b", ttl, None).unwrap());
    assert!(released > other_table, "a token is never given twice");
    // A holder known to be dead is taken over at once.
    let dead = token(a.acquire_lease("s.t", "a", ttl, Some("b")).unwrap());
    assert!(dead > released);
    assert_eq!(b.renew_lease("b", ttl).unwrap(), 0, "b lost its lease");
    // An expired lease is taken over.
    a.acquire_lease("s.t", "a", Duration::ZERO, None).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert!(token(b.acquire_lease("s.t", "b", ttl, None).unwrap()) > dead);
    // Another pipeline's lease is its own.
    let other = stores.open("q");
    token(other.acquire_lease("s.t", "a", ttl, None).unwrap());
}

/// A store whose table lease was taken over (expired while its process was
/// paused) can no longer plan, re-plan, commit or quarantine in that table:
/// each write fails as a lost lease and changes nothing; the new holder's go
/// through. Writes to a table the store holds no lease on are unfenced.
fn a_taken_over_lease_fences_the_old_holders_writes(stores: &Stores) {
    let (old, new) = (stores.open("p"), stores.open("p"));
    for table in ["s.t", "s.u"] {
        token(
            old.acquire_lease(table, "old", Duration::ZERO, None)
                .unwrap(),
        );
    }
    let planned = old
        .plan_batch("s.t", &[obj("a"), obj("b")], BatchMode::Append)
        .unwrap();
    std::thread::sleep(Duration::from_millis(5));
    for table in ["s.t", "s.u"] {
        token(
            new.acquire_lease(table, "new", Duration::from_secs(60), None)
                .unwrap(),
        );
    }
    let lost = |what: &str, result: cdcflow::error::Result<()>| {
        let err = result.expect_err(what);
        assert!(
            matches!(err, cdcflow::error::Error::LeaseLost { .. }),
            "{what}: {err}"
        );
    };
    lost(
        "commit",
        old.commit_batch("s.t", planned.number, &BatchStats::default()),
    );
    lost(
        "re-plan",
        old.replan_batch("s.t", planned.number, &[obj("a")])
            .map(drop),
    );
    lost(
        "plan",
        old.plan_batch("s.u", &[obj("c")], BatchMode::Append)
            .map(drop),
    );
    lost("quarantine", old.quarantine("s.t", &obj("b"), "bad"));
    lost("skip", old.skip("s.u", &obj("f"), "by hand"));
    let pending = new.pending_batch("s.t").unwrap().unwrap();
    assert_eq!(pending.objects.len(), 2, "the re-plan changed nothing");
    assert!(new.pending_batch("s.u").unwrap().is_none());
    assert_eq!(processed(&*new, "a"), None, "the commit changed nothing");
    new.commit_batch("s.t", planned.number, &BatchStats::default())
        .unwrap();
    assert_eq!(processed(&*new, "a"), Some(1));
    // A table neither store took a lease on: unfenced.
    old.plan_batch("s.v", &[obj("d")], BatchMode::Append)
        .unwrap();
    // The new holder released s.t: the old store's token is still not the
    // table's, so it stays fenced off.
    new.release_lease("new").unwrap();
    lost(
        "plan after the new holder released",
        old.plan_batch("s.t", &[obj("g")], BatchMode::Append)
            .map(drop),
    );
    // Released, the old store writes unfenced again (an operator's skip).
    old.release_lease("old").unwrap();
    old.skip("s.w", &obj("e"), "by hand").unwrap();
    old.skip("s.t", &obj("g"), "by hand").unwrap();
}

fn of_many_takers_at_once_one_gets_the_lease(stores: &Stores) {
    for round in 0..5 {
        let handles: Vec<_> = (0..8).map(|_| stores.open("race")).collect();
        let barrier = std::sync::Barrier::new(handles.len());
        let winners: Vec<String> = std::thread::scope(|s| {
            let barrier = &barrier;
            let takers: Vec<_> = handles
                .iter()
                .enumerate()
                .map(|(i, store)| {
                    s.spawn(move || {
                        let owner = format!("w{round}-{i}");
                        barrier.wait();
                        let outcome = store
                            .acquire_lease("s.t", &owner, Duration::from_secs(60), None)
                            .unwrap();
                        matches!(outcome, LeaseOutcome::Acquired { .. }).then_some(owner)
                    })
                })
                .collect();
            takers
                .into_iter()
                .filter_map(|t| t.join().unwrap())
                .collect()
        });
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        handles[0].release_lease(&winners[0]).unwrap();
    }
}

fn of_two_planners_at_once_one_plans(stores: &Stores) {
    for round in 0..5 {
        let table = format!("s.t{round}");
        let (a, b) = (stores.open("p"), stores.open("p"));
        let barrier = std::sync::Barrier::new(2);
        let planned: usize = std::thread::scope(|s| {
            let tries: Vec<_> = [(a, "a"), (b, "b")]
                .into_iter()
                .map(|(store, key)| {
                    let (barrier, table) = (&barrier, &table);
                    s.spawn(move || {
                        barrier.wait();
                        store
                            .plan_batch(table, &[obj(key)], BatchMode::Append)
                            .is_ok()
                    })
                })
                .collect();
            tries.into_iter().map(|t| t.join().unwrap() as usize).sum()
        });
        assert_eq!(planned, 1, "round {round}");
        assert_eq!(
            stores
                .open("p")
                .pending_batch(&table)
                .unwrap()
                .unwrap()
                .number,
            1
        );
    }
}

fn runs_attempts_ticks_and_listings_are_kept(stores: &Stores) {
    let store = stores.open("p");
    let (t1, t2) = (
        DateTime::from_timestamp(1_000, 0).unwrap(),
        DateTime::from_timestamp(2_000, 0).unwrap(),
    );
    let first = store.begin_run(Trigger::Schedule, Some((t1, t2))).unwrap();
    let attempt = |try_number, state, error: Option<&str>| TaskAttempt {
        table: "s.t".into(),
        try_number,
        state,
        rows: 12,
        error: error.map(str::to_string),
    };
    store
        .record_attempt(first, &attempt(1, TaskState::Running, None))
        .unwrap();
    store
        .record_attempt(first, &attempt(1, TaskState::UpForRetry, Some("reset")))
        .unwrap();
    store
        .record_attempt(first, &attempt(2, TaskState::Success, None))
        .unwrap();
    store.finish_run(first, true, "{}").unwrap();
    let second = store.begin_run(Trigger::Manual, None).unwrap();
    assert!(second > first, "run ids grow");
    stores.open("q").begin_run(Trigger::Backfill, None).unwrap();

    let runs = stores.open("p").recent_runs(10).unwrap();
    assert_eq!(runs.len(), 2, "another pipeline's runs are its own");
    assert_eq!((runs[0].id, runs[0].status.as_str()), (second, "running"));
    assert_eq!(
        (runs[1].trigger.as_str(), runs[1].status.as_str()),
        ("schedule", "success")
    );
    let (start, end) = runs[1].interval.clone().unwrap();
    assert_eq!(
        (start.as_str(), end.as_str()),
        ("1970-01-01T00:16:40.000000Z", "1970-01-01T00:33:20.000000Z")
    );
    assert_eq!(
        runs[1].attempts,
        vec![
            attempt(1, TaskState::UpForRetry, Some("reset")),
            attempt(2, TaskState::Success, None)
        ]
    );
    assert_eq!(store.recent_runs(1).unwrap().len(), 1);

    assert_eq!(store.last_tick().unwrap(), None);
    store.set_last_tick(t2).unwrap();
    store.set_last_tick(t1).unwrap();
    assert_eq!(
        stores.open("p").last_tick().unwrap(),
        Some(t2),
        "never back"
    );
    assert_eq!(stores.open("q").last_tick().unwrap(), None);

    assert_eq!(store.last_full_listing("s.t").unwrap(), None);
    store.set_last_full_listing("s.t", t2).unwrap();
    store.set_last_full_listing("s.t", t1).unwrap();
    assert_eq!(stores.open("p").last_full_listing("s.t").unwrap(), Some(t1));
}

/// The figures `/metrics` exports: sums over committed batches only (a
/// planned batch adds nothing), processed objects and their bytes, one
/// duration per committed batch and finished run, attempts by final state,
/// each pipeline its own.
fn totals_sum_what_was_committed_and_tried(stores: &Stores) {
    let store = stores.open("p");
    assert_eq!(store.totals("s.t").unwrap(), TableTotals::default());
    let stats = |rows, inserts, updates, deletes| BatchStats {
        rows,
        inserts,
        updates,
        deletes,
        max_seq: None,
        max_commit_ts: None,
        bytes_processed: None,
        bytes_billed: Some(rows * 1000),
    };
    store
        .plan_batch("s.t", &[obj("a"), obj("bb")], BatchMode::Append)
        .unwrap();
    store.commit_batch("s.t", 1, &stats(7, 4, 2, 1)).unwrap();
    store
        .plan_batch("s.t", &[obj("ccc")], BatchMode::Append)
        .unwrap();
    store.commit_batch("s.t", 2, &stats(5, 0, 3, 2)).unwrap();
    store
        .plan_batch("s.t", &[obj("dddd")], BatchMode::Append)
        .unwrap();
    let totals = stores.open("p").totals("s.t").unwrap();
    assert_eq!(
        (
            totals.batches,
            totals.rows,
            totals.inserts,
            totals.updates,
            totals.deletes
        ),
        (2, 12, 4, 5, 3)
    );
    assert_eq!(totals.bytes_billed, 12_000);
    // obj(k) is 100 bytes per letter of its key: a, bb and ccc.
    assert_eq!((totals.objects, totals.bytes), (3, 600));
    assert_eq!(totals.batch_seconds.len(), 2);
    assert!(totals.batch_seconds.iter().all(|s| (0.0..60.0).contains(s)));
    assert_eq!(
        stores.open("q").totals("s.t").unwrap(),
        TableTotals::default()
    );

    let run = store.begin_run(Trigger::Manual, None).unwrap();
    let attempt = |table: &str, try_number, state| TaskAttempt {
        table: table.into(),
        try_number,
        state,
        rows: 0,
        error: None,
    };
    store
        .record_attempt(run, &attempt("s.t", 1, TaskState::UpForRetry))
        .unwrap();
    store
        .record_attempt(run, &attempt("s.t", 2, TaskState::Running))
        .unwrap();
    store
        .record_attempt(run, &attempt("s.t", 2, TaskState::Success))
        .unwrap();
    store
        .record_attempt(run, &attempt("s.u", 1, TaskState::Success))
        .unwrap();
    store.finish_run(run, true, "{}").unwrap();
    store.begin_run(Trigger::Manual, None).unwrap();
    let runs = stores.open("p").run_totals().unwrap();
    assert_eq!(
        runs.attempts,
        vec![
            ("s.t".to_string(), TaskState::Success, 1),
            ("s.t".to_string(), TaskState::UpForRetry, 1),
            ("s.u".to_string(), TaskState::Success, 1),
        ]
    );
    assert_eq!(
        runs.run_seconds.len(),
        1,
        "the running run has no duration yet"
    );
    assert_eq!(stores.open("q").run_totals().unwrap(), RunTotals::default());
}

/// Alert incidents: open with what the alert said (opening again keeps
/// one, with the newer detail), resolved by `None`; each pipeline its own.
fn incidents_open_and_resolve_per_pipeline(stores: &Stores) {
    let store = stores.open("p");
    assert!(store.open_incidents().unwrap().is_empty());
    store.set_incident("lag:s.t", Some("60s behind")).unwrap();
    store
        .set_incident("quarantined:s.t", Some("a: bad"))
        .unwrap();
    store.set_incident("lag:s.t", Some("90s behind")).unwrap();
    stores
        .open("q")
        .set_incident("lag:s.t", Some("other"))
        .unwrap();
    let open = stores.open("p").open_incidents().unwrap();
    assert_eq!(
        open.into_iter().collect::<Vec<_>>(),
        vec![
            ("lag:s.t".to_string(), "90s behind".to_string()),
            ("quarantined:s.t".to_string(), "a: bad".to_string()),
        ]
    );
    store.set_incident("lag:s.t", None).unwrap();
    store.set_incident("never:opened", None).unwrap();
    assert_eq!(
        stores.open("p").open_incidents().unwrap().len(),
        1,
        "resolved is gone"
    );
    assert_eq!(stores.open("q").open_incidents().unwrap().len(), 1);
}

/// What each try logged comes back with its attempt (a try without a log
/// has none); another pipeline's run shows nothing; the logs of all but the
/// newest `KEPT_LOGS` runs of a pipeline are forgotten, the attempts stay.
fn attempt_logs_are_kept_per_try_for_the_newest_runs(stores: &Stores) {
    let (p, q) = (stores.open("p"), stores.open("q"));
    let tried = |run: i64, n: u32, state: TaskState| {
        p.record_attempt(
            run,
            &TaskAttempt {
                table: "s.t".into(),
                try_number: n,
                state,
                rows: u64::from(n),
                error: None,
            },
        )
        .unwrap();
    };
    let first = p.begin_run(Trigger::Manual, None).unwrap();
    tried(first, 1, TaskState::UpForRetry);
    p.record_attempt_log(first, "s.t", 1, "try one\nsecond line")
        .unwrap();
    tried(first, 2, TaskState::Success);
    let attempts = p.attempts(first, "s.t").unwrap();
    let got: Vec<_> = attempts
        .iter()
        .map(|(a, log)| (a.try_number, a.state, a.rows, log.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, TaskState::UpForRetry, 1, Some("try one\nsecond line")),
            (2, TaskState::Success, 2, None),
        ]
    );
    assert!(p.attempts(first, "s.other").unwrap().is_empty());
    assert!(
        q.attempts(first, "s.t").unwrap().is_empty(),
        "run {first} is p's"
    );
    let mut later = Vec::new();
    for _ in 0..cdcflow::state::KEPT_LOGS {
        let run = p.begin_run(Trigger::Manual, None).unwrap();
        tried(run, 1, TaskState::Success);
        p.record_attempt_log(run, "s.t", 1, "later").unwrap();
        later.push(run);
    }
    assert_eq!(
        p.attempts(first, "s.t").unwrap()[0].1,
        None,
        "the oldest run's log is forgotten"
    );
    assert_eq!(p.attempts(first, "s.t").unwrap().len(), 2);
    assert_eq!(
        p.attempts(later[0], "s.t").unwrap()[0].1.as_deref(),
        Some("later"),
        "the newest runs keep theirs"
    );
}

fn each_pipeline_has_its_own_id_and_state(stores: &Stores) {
    let (p, q) = (stores.open("p"), stores.open("q"));
    assert_eq!(p.store_id().len(), 32);
    assert_ne!(p.store_id(), q.store_id());
    assert_eq!(
        stores.open("p").store_id(),
        p.store_id(),
        "kept across opens"
    );
    p.plan_batch("s.t", &[obj("a")], BatchMode::Append).unwrap();
    p.commit_batch("s.t", 1, &BatchStats::default()).unwrap();
    assert!(q.objects("s.t").unwrap().is_empty());
    assert_eq!(q.last_batch("s.t").unwrap(), None);
    assert_eq!(
        q.plan_batch("s.t", &[obj("a")], BatchMode::Append)
            .unwrap()
            .number,
        1
    );
}

/// A store database written by a newer cdcflow is refused with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_store_of_a_newer_schema_is_refused() {
    let Some(stores) = Stores::postgres().await else {
        return;
    };
    drop(stores.open("p"));
    let url = match &stores.config {
        StateConfig::Postgres { url, .. } => url.clone(),
        StateConfig::Sqlite(_) => unreachable!(),
    };
    let client = crate::support::pg_connect(&url).await;
    client
        .batch_execute("UPDATE cdcflow.schema_version SET version = version + 1")
        .await
        .unwrap();
    let error = cdcflow::state::open(&stores.config, "p")
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("newer cdcflow"), "{error}");
    drop(client);
    stores.drop().await;
}

/// The connection to the state database drops (a failover, a reset): the
/// call in flight fails as retryable, and the next one after the outage
/// reconnects and finds everything committed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_postgres_connection_is_retryable_and_the_next_call_reconnects() {
    let Some(stores) = Stores::postgres().await else {
        return;
    };
    let StateConfig::Postgres { url, .. } = &stores.config else {
        unreachable!()
    };
    let proxy = TcpProxy::start(url).await;
    let proxied = Stores {
        config: postgres_config(&proxy.url(url)),
        database: None,
        _ws: Workspace::new(),
    };
    let store = proxied.open("p");
    store
        .plan_batch("s.t", &[obj("a")], BatchMode::Append)
        .unwrap();
    let outage = tokio::spawn(async move {
        proxy.outage(Duration::from_secs(2)).await;
        proxy
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let error =
        tokio::task::block_in_place(|| store.commit_batch("s.t", 1, &BatchStats::default()))
            .unwrap_err();
    assert_eq!(error.retry_policy(), RetryPolicy::Retry, "{error}");
    assert!(error.to_string().contains("committing a batch"), "{error}");
    let _proxy = outage.await.unwrap();
    // Nothing of the failed commit happened; the retry commits.
    assert!(store.pending_batch("s.t").unwrap().is_some());
    store
        .commit_batch("s.t", 1, &BatchStats::default())
        .unwrap();
    assert_eq!(processed(&*store, "a"), Some(1));
    drop(store);
    stores.drop().await;
}

/// A state call does not wait for ever on a lock another session holds (a
/// stuck worker, an operator's `LOCK TABLE`): it fails after the session's
/// `lock_timeout` (30 s by default; here the URL's `options` set 1 s) as
/// retryable, and succeeds once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_call_gives_up_on_a_held_lock_and_is_retried() {
    let Some(stores) = Stores::postgres().await else {
        return;
    };
    let StateConfig::Postgres { url, .. } = &stores.config else {
        unreachable!()
    };
    let store = stores.open("p");
    store
        .plan_batch("s.t", &[obj("a")], BatchMode::Append)
        .unwrap();
    let short = Stores {
        config: postgres_config(&format!("{url}?options=-c%20lock_timeout%3D1s")),
        database: None,
        _ws: Workspace::new(),
    };
    let waiting = short.open("p");
    let holder = crate::support::pg_connect(url).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE cdcflow.batches IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error =
        tokio::task::block_in_place(|| waiting.commit_batch("s.t", 1, &BatchStats::default()))
            .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        started.elapsed()
    );
    assert!(error.to_string().contains("lock timeout"), "{error}");
    assert_eq!(error.retry_policy(), RetryPolicy::Retry, "{error}");
    holder.batch_execute("ROLLBACK").await.unwrap();
    waiting
        .commit_batch("s.t", 1, &BatchStats::default())
        .unwrap();
    assert_eq!(processed(&*store, "a"), Some(1));
    drop((store, waiting, holder));
    stores.drop().await;
}

/// Many processes opening a new SQLite state file at once (eight `run`s
/// started together, a fleet's first minute) all open it: none fails with
/// "database is locked" while another creates the schema. (The failure was
/// seen once in CI, in `chaos::eight_runs_at_once…`; 24 processes × 30 rounds
/// here did not reproduce it, so this guards rather than proves.)
#[test]
fn many_processes_opening_a_new_sqlite_store_at_once_all_open_it() {
    for round in 0..10 {
        let ws = Workspace::new();
        ws.write_pipeline(2, false);
        let children: Vec<_> = (0..12)
            .map(|_| {
                ws.command(&["status", "-p", "pipeline.toml"], &[])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                crate::support::output(&out)
            );
        }
    }
}
