//! `[alerts]`: a webhook receiver (axum, on loopback) gets each incident
//! once when it opens and once when it resolves; a dead receiver fails
//! nothing, and what it missed is sent at the next run.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::post;

use crate::support::{Workspace, output};

const EXIT_TABLES_FAILED: i32 = 3;

/// Bodies posted to a local webhook.
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route(
                "/hook",
                post(
                    |State(bodies): State<Arc<Mutex<Vec<serde_json::Value>>>>,
                     body: axum::body::Bytes| async move {
                        bodies
                            .lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).expect("a JSON body"));
                        "ok"
                    },
                ),
            )
            .with_state(bodies.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, bodies }
    }

    /// The (kind, table, status) of the bodies received since the last call, sorted.
    fn take(&self) -> Vec<(String, String, String)> {
        let mut got: Vec<_> = std::mem::take(&mut *self.bodies.lock().unwrap())
            .iter()
            .map(|b| {
                let field = |f: &str| {
                    b[f].as_str()
                        .unwrap_or_else(|| panic!("{f} in {b}"))
                        .to_string()
                };
                assert_eq!(field("pipeline"), "test", "{b}");
                assert!(!field("detail").is_empty(), "{b}");
                (field("kind"), field("table"), field("status"))
            })
            .collect();
        got.sort();
        got
    }
}

/// An address nothing listens on.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}/hook", listener.local_addr().unwrap())
}

fn set_webhook(ws: &Workspace, url: &str) {
    let path = ws.path("pipeline.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let head = text.split("\n[alerts]\n").next().unwrap();
    std::fs::write(
        &path,
        format!("{head}\n[alerts]\nwebhook = \"{url}\"\nformat = \"json\"\nlag = \"1s\"\n"),
    )
    .unwrap();
}

fn run(ws: &Workspace, expect: i32) {
    let out = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert_eq!(out.status.code(), Some(expect), "{}", output(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_is_told_once_when_it_opens_and_once_when_it_resolves() {
    let ws = Workspace::new();
    let data = ws.synth(1500, 43);
    ws.write_pipeline(3, false);
    ws.publish_all();
    let key = ws.break_object("order_items", data.tables[1].files / 2);
    let (bad, original) = (ws.source().join(&key), ws.path("staging").join(&key));
    let receiver = Receiver::start().await;
    set_webhook(&ws, &receiver.url);
    // order_items waits at the broken object, and its objects after it
    // wait too: it is quarantined, and its lag passes the 1 s bound;
    // orders loads everything (no lag).
    let incidents = |status: &str| {
        ["lag", "quarantined"]
            .map(|kind| {
                (
                    kind.to_string(),
                    "public.order_items".to_string(),
                    status.to_string(),
                )
            })
            .to_vec()
    };
    run(&ws, EXIT_TABLES_FAILED);
    assert_eq!(receiver.take(), incidents("firing"));
    run(&ws, EXIT_TABLES_FAILED);
    assert_eq!(
        receiver.take(),
        vec![],
        "an open incident is not told again"
    );

    // The object replaced: the run loads it, and the webhook is dead. The
    // run succeeds all the same; the resolution waits for the next run.
    std::fs::copy(&original, &bad).unwrap();
    set_webhook(&ws, &dead_url());
    run(&ws, 0);
    set_webhook(&ws, &receiver.url);
    run(&ws, 0);
    assert_eq!(receiver.take(), incidents("resolved"));
    run(&ws, 0);
    assert_eq!(receiver.take(), vec![]);
}

/// A table whose task fails (its warehouse table cannot be created) is told
/// once, as failing, with the error; once it loads, as resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_is_told_and_resolves_when_the_table_loads() {
    let (ws, _) = Workspace::published(600, 44, 1000, "[retries]\ncount = 0");
    let receiver = Receiver::start().await;
    set_webhook(&ws, &receiver.url);
    let blocker = ws.path("warehouse/order_items_history");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, "not a directory").unwrap();
    let failed = |status: &str| {
        vec![(
            "task_failed".to_string(),
            "public.order_items".to_string(),
            status.to_string(),
        )]
    };
    run(&ws, EXIT_TABLES_FAILED);
    assert_eq!(receiver.take(), failed("firing"));
    std::fs::remove_file(&blocker).unwrap();
    run(&ws, 0);
    assert_eq!(receiver.take(), failed("resolved"));
}
