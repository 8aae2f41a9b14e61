//! PostgreSQL and MariaDB as warehouses (scripts/peers.sh pg, mariadb), in
//! history and replica mode: the tables equal an independent replay of the
//! generated changes, across a crash at every step boundary of a load.

use cdcflow::failpoint::{DATABASE_NAMES, NAMES};
use mysql_async::prelude::Queryable;

use crate::support::{Workspace, expected_history, output, peer, pg_connect, replay, rows};

/// A database warehouse for one test: a PostgreSQL schema or a MariaDB
/// database of its own, dropped at the end.
pub(crate) enum Target {
    Pg {
        admin: tokio_postgres::Client,
        schema: String,
        url: String,
    },
    My {
        admin: mysql_async::Conn,
        database: String,
        url: String,
    },
}

impl Target {
    pub(crate) async fn postgres(ws: &Workspace) -> Option<Target> {
        let url = peer("CDCFLOW_TEST_PG_URL")?;
        let admin = pg_connect(&url).await;
        let schema = ws.unique_name("wh_", '_');
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        Some(Target::Pg { admin, schema, url })
    }

    pub(crate) async fn mysql(ws: &Workspace) -> Option<Target> {
        let base = peer("CDCFLOW_TEST_MYSQL_URL")?;
        let mut admin = mysql_async::Conn::new(mysql_async::Opts::from_url(&base).unwrap())
            .await
            .unwrap();
        let database = ws.unique_name("wh_", '_');
        admin
            .query_drop(format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        let url = format!("{base}/{database}");
        Some(Target::My {
            admin,
            database,
            url,
        })
    }

    /// The `[warehouse]` keys, with `mode`.
    pub(crate) fn warehouse(&self, mode: &str) -> String {
        match self {
            Target::Pg { schema, url, .. } => format!(
                "kind = \"postgres\"\nurl = \"{url}\"\nschema = \"{schema}\"\nmode = \"{mode}\""
            ),
            Target::My { url, .. } => {
                format!("kind = \"mysql\"\nurl = \"{url}\"\nmode = \"{mode}\"")
            }
        }
    }

    pub(crate) async fn drop(self) {
        match self {
            Target::Pg { admin, schema, .. } => {
                admin
                    .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                    .await
                    .unwrap();
            }
            Target::My {
                mut admin,
                database,
                ..
            } => {
                admin
                    .query_drop(format!("DROP DATABASE {database}"))
                    .await
                    .unwrap();
            }
        }
    }
}

/// Loads the generated changes in batches of 3 objects into `target` in
/// `mode`, crashing first at `failpoint` if given; asserts the tables equal
/// the replay (history mode: history too, every change once). A replica
/// load without a crash spills every batch's latest changes
/// (`latest_memory_mib = 0`) and stages them from the spill files.
async fn load_and_check(target: Target, ws: &Workspace, mode: &str, failpoint: Option<&str>) {
    let data = ws.synth(1200, 7);
    ws.publish_all();
    let history = mode == "history";
    let path = ws.write_pipeline_into("pipeline.toml", 3, history, "", &target.warehouse(mode));
    let spill = !history && failpoint.is_none();
    if spill {
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace("max_objects = 3", "max_objects = 3\nlatest_memory_mib = 0");
        std::fs::write(&path, text).unwrap();
    }
    if let Some(failpoint) = failpoint {
        let crashed = ws.cdcflow(
            &["run", "--pipeline", "pipeline.toml"],
            &[("CDCFLOW_FAILPOINT", failpoint)],
        );
        assert!(
            !crashed.status.success() && output(&crashed).contains("failpoint"),
            "{failpoint}: the run should have aborted: {}",
            output(&crashed)
        );
    }
    let run = ws.cdcflow(&["-v", "run", "--pipeline", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    assert_eq!(
        output(&run).contains("outgrew batch.latest_memory_mib"),
        spill,
        "spilled: {}",
        output(&run)
    );
    let runner = ws.runner();
    for table in &data.tables {
        let soft = history && table.name == "order_items";
        let mut columns: Vec<String> = table.columns.iter().map(|c| c.to_string()).collect();
        if soft {
            columns.push("deleted".into());
        }
        let key = table.columns[..table.key_len].join(", ");
        let current = runner
            .query(&format!(
                "SELECT {} FROM {} ORDER BY {key}",
                columns.join(", "),
                table.name
            ))
            .await
            .unwrap();
        assert_eq!(
            rows(&current),
            replay(table, soft),
            "{}: current rows differ from the replay ({failpoint:?})",
            table.name
        );
        if history {
            let found = runner
                .query(&format!(
                    "SELECT {}, op FROM {}_history ORDER BY change_seq",
                    table.columns.join(", "),
                    table.name
                ))
                .await
                .unwrap();
            assert_eq!(
                rows(&found),
                expected_history(table),
                "{}: history differs: a change lost or doubled ({failpoint:?})",
                table.name
            );
            // The versions view answers `cdcflow history` (one row per change of the key).
            let first = &table.changes[0].values[..table.key_len];
            let key: Vec<String> = first
                .iter()
                .map(|v| match v {
                    cdcflow::synth::Value::Int(i) => i.to_string(),
                    other => panic!("unexpected key value {other:?}"),
                })
                .collect();
            let changes = table
                .changes
                .iter()
                .filter(|c| &c.values[..table.key_len] == first)
                .count();
            let pipeline = cdcflow::config::load(&ws.path("pipeline.toml")).unwrap();
            let t = pipeline
                .tables
                .iter()
                .find(|t| t.name == table.name)
                .unwrap();
            let versions = runner.key_history(t, &key.join(",")).await.unwrap();
            assert_eq!(
                versions.iter().map(|b| b.num_rows()).sum::<usize>(),
                changes,
                "{}: versions of key {key:?}",
                table.name
            );
        }
    }
    target.drop().await;
}

macro_rules! in_each_target {
    ($($name:ident: $target:ident, $mode:literal;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let ws = Workspace::new();
                let Some(target) = Target::$target(&ws).await else {
                    return;
                };
                load_and_check(target, &ws, $mode, None).await;
            }
        )*
    };
}

in_each_target! {
    postgres_history_equals_the_replay: postgres, "history";
    postgres_replica_equals_the_replay: postgres, "replica";
    mysql_history_equals_the_replay: mysql, "history";
    mysql_replica_equals_the_replay: mysql, "replica";
}

/// A crash at every step boundary of a load, then a clean run: nothing lost
/// or doubled, in both servers and both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_step_loses_and_doubles_nothing() {
    for failpoint in NAMES.iter().chain(DATABASE_NAMES) {
        for mode in ["history", "replica"] {
            for engine in ["postgres", "mysql"] {
                let ws = Workspace::new();
                let target = match engine {
                    "postgres" => Target::postgres(&ws).await,
                    _ => Target::mysql(&ws).await,
                };
                let Some(target) = target else { return };
                load_and_check(target, &ws, mode, Some(&format!("{failpoint}@2"))).await;
            }
        }
    }
}

/// The `[warehouse]` keys of a new target of `engine` in `mode`, and the target.
async fn target_of(ws: &Workspace, engine: &str) -> Option<Target> {
    match engine {
        "postgres" => Target::postgres(ws).await,
        _ => Target::mysql(ws).await,
    }
}

/// A late object lands in its place in history mode (its keys recomputed
/// from history, an older change never over a newer one); a replica, which
/// keeps no history, refuses it and applies nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_object_lands_in_its_place_or_is_refused_by_a_replica() {
    for engine in ["postgres", "mysql"] {
        for mode in ["history", "replica"] {
            let ws = Workspace::new();
            let Some(target) = target_of(&ws, engine).await else {
                return;
            };
            let data = ws.synth(2000, 4);
            let history = mode == "history";
            ws.write_pipeline_into("pipeline.toml", 1000, false, "", &target.warehouse(mode));
            for table in ["orders", "order_items"] {
                ws.publish(table, 0..5);
                ws.publish(table, 6..usize::MAX);
            }
            let first = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
            assert!(first.status.success(), "{}", output(&first));
            let before = rows(&ws.query("SELECT * FROM orders ORDER BY id").await);
            ws.publish("orders", 5..6);
            ws.publish("order_items", 5..6);
            let late = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
            if history {
                assert!(late.status.success(), "{}", output(&late));
                for table in &data.tables {
                    let key = table.columns[..table.key_len].join(", ");
                    let current = ws
                        .query(&format!(
                            "SELECT {} FROM {} ORDER BY {key}",
                            table.columns.join(", "),
                            table.name
                        ))
                        .await;
                    assert_eq!(
                        rows(&current),
                        replay(table, false),
                        "{engine}: {}",
                        table.name
                    );
                }
            } else {
                assert!(
                    !late.status.success(),
                    "{engine}: a replica took a late object"
                );
                assert!(
                    output(&late).contains("keeps no history"),
                    "{engine}: {}",
                    output(&late)
                );
                let after = rows(&ws.query("SELECT * FROM orders ORDER BY id").await);
                assert_eq!(
                    after, before,
                    "{engine}: the refused batch changed the replica"
                );
            }
            target.drop().await;
        }
    }
}

/// The scenarios every warehouse passes, in each server's history mode
/// (the truncate in replica mode too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncates_and_late_changes_after_a_delete() {
    for engine in ["postgres", "mysql"] {
        for (mode, late) in [("history", true), ("replica", false)] {
            let ws = Workspace::new();
            let Some(target) = target_of(&ws, engine).await else {
                return;
            };
            crate::bigquery::a_truncate_removes_every_older_row_in(
                &ws,
                &target.warehouse(mode),
                mode == "history",
            )
            .await;
            if late {
                let ws = Workspace::new();
                crate::bigquery::a_late_change_older_than_a_delete_leaves_the_key_deleted(
                    &ws,
                    &target.warehouse(mode),
                )
                .await;
            }
            target.drop().await;
        }
    }
}

/// A backfill in history mode replaces its objects' history rows and
/// rebuilds current state, twice and after a crash inside it, equal to the
/// replay each time and with no change doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_replaces_history_and_survives_a_crash() {
    for engine in ["postgres", "mysql"] {
        let ws = Workspace::new();
        let Some(target) = target_of(&ws, engine).await else {
            return;
        };
        let data = ws.synth(1500, 61);
        ws.publish_all();
        ws.write_pipeline_into("pipeline.toml", 4, true, "", &target.warehouse("history"));
        let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
        assert!(run.status.success(), "{}", output(&run));
        let backfill = [
            "backfill",
            "-p",
            "pipeline.toml",
            "--from",
            "2024-05-02",
            "--to",
            "2024-05-02",
        ];
        let first = ws.cdcflow(&backfill, &[]);
        assert!(first.status.success(), "{}", output(&first));
        let crashed = ws.cdcflow(
            &backfill,
            &[("CDCFLOW_FAILPOINT", "load.before_database_commit")],
        );
        assert!(!crashed.status.success(), "{engine}: {}", output(&crashed));
        let rerun = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
        assert!(rerun.status.success(), "{engine}: {}", output(&rerun));
        let runner = ws.runner();
        for table in &data.tables {
            crate::support::assert_table_matches(
                &runner,
                table,
                table.name,
                table.name == "order_items",
            )
            .await;
        }
        target.drop().await;
    }
}

/// Values of every type keep their value through a database target, in
/// both modes: JSON, µs timestamps, bytes, uuid, a wide decimal, NULLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_keeps_its_value() {
    for engine in ["postgres", "mysql"] {
        for mode in ["history", "replica"] {
            let ws = Workspace::new();
            let Some(target) = target_of(&ws, engine).await else {
                return;
            };
            let dir = ws.source().join("public/ev");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("20240101-000000000.csv"),
                "I,1,\"{\"\"a\"\": [1, \"\"x\"\"]}\",2024-01-01 10:20:30.123456,2024-02-29 23:59:59.999999+00,\\x01ff,\
                 3e4d1e2a-0000-0000-0000-0000000000aa,12345678901234567890.123456789,t,-1.5,\"it's \"\"q\"\"\\\\ \t\"\n\
                 I,2,,,,,,,,,\n",
            )
            .unwrap();
            let pipeline = format!(
                "name = \"test\"\n[source]\nurl = \"file://{}\"\n[state]\nurl = \"sqlite://{}/state.db\"\n\
                 [warehouse]\n{}\n[[tables]]\nschema = \"public\"\nname = \"ev\"\nprimary_key = [\"id\"]\n\
                 columns = [{{ name = \"id\", type = \"bigint\" }}, {{ name = \"doc\", type = \"jsonb\" }}, \
                 {{ name = \"at\", type = \"timestamp\" }}, {{ name = \"atz\", type = \"timestamptz\" }}, \
                 {{ name = \"raw\", type = \"bytea\" }}, {{ name = \"u\", type = \"uuid\" }}, \
                 {{ name = \"big\", type = \"decimal(30,9)\" }}, {{ name = \"ok\", type = \"boolean\" }}, \
                 {{ name = \"f\", type = \"double\" }}, {{ name = \"t\", type = \"text\" }}]\n",
                ws.source().display(),
                ws.dir.path().display(),
                target.warehouse(mode)
            );
            std::fs::write(ws.path("pipeline.toml"), pipeline).unwrap();
            let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
            assert!(run.status.success(), "{}", output(&run));
            let select = match engine {
                "postgres" => {
                    "SELECT doc::jsonb::text, at::text, atz::text, encode(raw, 'hex'), u::text, \
                               big::text, ok::text, f::text, t FROM ev ORDER BY id"
                }
                _ => {
                    "SELECT CAST(doc AS CHAR), CAST(at AS CHAR), CAST(atz AS CHAR), LOWER(HEX(raw)), u, \
                      CAST(big AS CHAR), CAST(ok AS CHAR), CAST(f AS CHAR), t FROM ev ORDER BY id"
                }
            };
            let text = |v: &str| Some(v.to_string());
            let (doc, atz, ok) = match engine {
                "postgres" => (
                    r#"{"a": [1, "x"]}"#,
                    "2024-02-29 23:59:59.999999+00",
                    "true",
                ),
                _ => (r#"{"a": [1, "x"]}"#, "2024-02-29 23:59:59.999999", "1"),
            };
            let got = ws.text_rows(select).await;
            assert_eq!(
                got,
                vec![
                    vec![None, None, None, None, None, None, None, None, None],
                    vec![
                        text(doc),
                        text("2024-01-01 10:20:30.123456"),
                        text(atz),
                        text("01ff"),
                        text("3e4d1e2a-0000-0000-0000-0000000000aa"),
                        text("12345678901234567890.123456789"),
                        text(ok),
                        text("-1.5"),
                        text("it's \"q\"\\\\ \t"),
                    ],
                ],
                "{engine} {mode}"
            );
            target.drop().await;
        }
    }
}

/// A load under an older lease token than the one the ledger holds (a worker
/// that lost its lease without knowing) is refused inside the transaction,
/// and applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_under_an_older_lease_token_is_refused() {
    use cdcflow::warehouse::{HistoryRows, LoadRequest};
    for engine in ["postgres", "mysql"] {
        let ws = Workspace::new();
        let Some(target) = target_of(&ws, engine).await else {
            return;
        };
        ws.synth(300, 3);
        ws.publish_all();
        ws.write_pipeline_into(
            "pipeline.toml",
            1000,
            false,
            "",
            &target.warehouse("history"),
        );
        let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
        assert!(run.status.success(), "{}", output(&run));
        let pipeline = cdcflow::config::load(&ws.path("pipeline.toml")).unwrap();
        let table = pipeline.tables[0].clone();
        let runner = ws.runner();
        let merger = runner.loaded_merger(&table).await.unwrap();
        let before = rows(&ws.query("SELECT count(*) FROM orders_history").await);
        let schema = merger.history_schema();
        // Refused before a row is read: the stream is never polled.
        let stream = datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
            schema,
            futures::stream::empty(),
        );
        let batch = cdcflow::state::Batch {
            number: 2,
            id: "stale".into(),
            objects: vec![],
            mode: cdcflow::state::BatchMode::Append,
        };
        let refused = runner
            .warehouse()
            .load(LoadRequest {
                table: &table,
                batch: &batch,
                merger: &merger,
                rows: HistoryRows::new(Box::pin(stream)),
                loaded_max: None,
                store: "stale-store",
                lease_token: Some(0),
            })
            .await;
        assert!(
            matches!(refused, Err(cdcflow::error::Error::LeaseLost { .. })),
            "{engine}: {refused:?}"
        );
        assert_eq!(
            rows(&ws.query("SELECT count(*) FROM orders_history").await),
            before
        );
        target.drop().await;
    }
}

/// A lost state store is refused by the database's ledger (nothing loaded),
/// then rebuilt from it by `repair --from-warehouse`: the next run loads
/// exactly what is missing, a further one nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_store_is_refused_then_repaired_from_the_database() {
    for engine in ["postgres", "mysql"] {
        let ws = Workspace::new();
        let Some(target) = target_of(&ws, engine).await else {
            return;
        };
        let data = ws.synth(1500, 31);
        let n = data.tables[0].files;
        ws.publish("orders", 0..n - 3);
        ws.publish("order_items", 0..usize::MAX);
        ws.write_pipeline_into("pipeline.toml", 4, true, "", &target.warehouse("history"));
        let first = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
        assert!(first.status.success(), "{}", output(&first));
        let count = "SELECT count(*) FROM orders_history";
        let loaded = rows(&ws.query(count).await);

        std::fs::remove_dir_all(ws.path("state")).unwrap();
        ws.publish("orders", n - 3..usize::MAX);
        let refused = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
        assert!(!refused.status.success(), "{engine}: {}", output(&refused));
        assert!(
            output(&refused).contains("repair --from-warehouse"),
            "{}",
            output(&refused)
        );
        assert_eq!(
            rows(&ws.query(count).await),
            loaded,
            "{engine}: loaded while refused"
        );

        let repaired = ws.cdcflow(&["repair", "--from-warehouse", "-p", "pipeline.toml"], &[]);
        assert!(repaired.status.success(), "{engine}: {}", output(&repaired));
        for _ in 0..2 {
            let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
            assert!(run.status.success(), "{engine}: {}", output(&run));
            crate::support::assert_warehouse_matches(&ws, &data, true).await;
        }
        target.drop().await;
    }
}

/// A change delivered twice (a sequence column) lands once in history mode,
/// as in every warehouse; a replica, which cannot tell a redelivered older
/// change from a late one, refuses the batch with what to do and applies
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_delivered_twice_lands_once_or_is_refused_by_a_replica() {
    for engine in ["postgres", "mysql"] {
        let ws = Workspace::new();
        let Some(target) = target_of(&ws, engine).await else {
            return;
        };
        crate::bigquery::a_change_delivered_twice_lands_once(&ws, &target.warehouse("history"))
            .await;
        let ws = Workspace::new();
        let dir = ws.source().join("public/t2");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("20240501-100000000.csv"),
            "I,2024-05-01 10:00:00,0010,1,first\nI,2024-05-01 10:00:01,0020,2,first\n",
        )
        .unwrap();
        crate::bigquery::write_id_v_pipeline(
            &ws,
            "t2",
            "timestamp_column = \"ts\"\nextra_columns = [\"seq\"]\nsequence_column = \"seq\"",
            &target.warehouse("replica"),
        );
        let first = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
        assert!(first.status.success(), "{engine}: {}", output(&first));
        std::fs::write(
            dir.join("20240501-110000000.csv"),
            "I,2024-05-01 10:00:00,0010,1,first\nU,2024-05-01 11:00:00,0030,1,second\n",
        )
        .unwrap();
        let refused = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
        assert!(!refused.status.success(), "{engine}: {}", output(&refused));
        assert!(
            output(&refused).contains("keeps no history"),
            "{}",
            output(&refused)
        );
        assert_eq!(
            ws.text_rows("SELECT id, v FROM t2").await,
            vec![
                vec![Some("1".to_string()), Some("first".to_string())],
                vec![Some("2".to_string()), Some("first".to_string())]
            ],
            "{engine}: the refused batch changed the replica"
        );
        target.drop().await;
    }
}
