//! `cdcflow serve`: /metrics read by a real parser (prometheus-client's
//! OpenMetrics parser, from PyPI) against figures the test counts itself
//! from the generated dataset and the files; /healthz and /readyz.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};

use cdcflow::decode::Op;

use crate::support::{Workspace, output, peer, staged_objects};

/// A `cdcflow serve` process and its address.
pub(crate) struct Served {
    child: Child,
    pub(crate) base: String,
}

impl Served {
    pub(crate) fn start(ws: &Workspace, pipelines: &str) -> Served {
        Served::start_with(ws, pipelines, &[], &[])
    }

    /// [`Served::start`] with more arguments and environment.
    pub(crate) fn start_with(
        ws: &Workspace,
        pipelines: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Served {
        let mut all = vec!["serve", "--pipelines", pipelines, "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut child = ws
            .command(&all, env)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("serve printed its address").unwrap();
            if let Some(rest) = line.strip_prefix("listening on ") {
                break rest.split(':').take(3).collect::<Vec<_>>().join(":");
            }
        };
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Served { child, base }
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("{}{path}", self.base)).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Samples of an OpenMetrics text, parsed by prometheus-client (Python):
/// `name{label="value",…}` (labels sorted) → value.
pub(crate) fn parse(python: &str, text: &str) -> BTreeMap<String, f64> {
    const SCRIPT: &str = r#"
import sys, json
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused:\n{}\n{text}",
        output(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A sample's key as [`parse`] writes it, for a table of pipeline `test`.
fn key(name: &str, table: &str, extra: &[(&str, &str)]) -> String {
    let table = format!("public.{table}");
    let mut labels = vec![("pipeline", "test"), ("table", table.as_str())];
    labels.extend_from_slice(extra);
    labels.sort();
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

pub(crate) fn sample(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} among {:#?}", samples.keys()))
}

/// After a run that loads all of `orders` but its newest object (published
/// after the run) and stops `order_items` at a broken object: the counters
/// equal the changes and bytes of the objects loaded, the gauges the objects
/// waiting and quarantined, the histograms count the batches and the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_loaded_and_what_waits() {
    let Some(python) = peer("CDCFLOW_TEST_PYTHON") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(1500, 41);
    ws.write_pipeline(3, false);
    let (orders, items) = (&data.tables[0], &data.tables[1]);
    let staging = ws.path("staging");
    let order_files = staged_objects(&staging, "orders");
    let item_files = staged_objects(&staging, "order_items");
    assert_eq!(
        (order_files.len(), item_files.len()),
        (orders.files, items.files)
    );
    ws.publish("orders", 0..orders.files - 1);
    ws.publish("order_items", 0..usize::MAX);
    let bad = items.files / 2;
    ws.break_object("order_items", bad);
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(!run.status.success(), "{}", output(&run));
    ws.publish("orders", orders.files - 1..usize::MAX);
    ws.pipelines_folder();

    let served = Served::start(&ws, "pipelines");
    assert_eq!(served.get("/healthz").await, (200, "ok\n".into()));
    assert_eq!(served.get("/readyz").await.0, 200);
    let (code, text) = served.get("/metrics").await;
    assert_eq!(code, 200, "{text}");
    let m = parse(&python, &text);

    // Independent figures: the generator's changes by object, the files' sizes.
    let count = |t: &cdcflow::synth::SynthTable, before: usize, op: Op| {
        t.changes
            .iter()
            .filter(|c| c.file < before && c.op == op)
            .count() as f64
    };
    let bytes = |files: &[std::path::PathBuf], before: usize| {
        files[..before]
            .iter()
            .map(|f| std::fs::metadata(staging.join(f)).unwrap().len())
            .sum::<u64>() as f64
    };
    for (name, t, files, loaded) in [
        ("orders", orders, &order_files, orders.files - 1),
        ("order_items", items, &item_files, bad),
    ] {
        let at = |metric: &str| sample(&m, &key(metric, name, &[]));
        for (op, label) in [
            (Op::Insert, "insert"),
            (Op::Update, "update"),
            (Op::Delete, "delete"),
        ] {
            assert_eq!(
                sample(
                    &m,
                    &key("cdcflow_rows_loaded_total", name, &[("op", label)])
                ),
                count(t, loaded, op),
                "{name} {label}"
            );
        }
        assert_eq!(at("cdcflow_objects_loaded_total"), loaded as f64, "{name}");
        assert_eq!(
            at("cdcflow_bytes_loaded_total"),
            bytes(files, loaded),
            "{name}"
        );
        let batches = at("cdcflow_batches_total");
        assert!(
            batches >= (loaded as f64 / 3.0).ceil(),
            "{name}: {batches} batches"
        );
        assert_eq!(
            at("cdcflow_batch_duration_seconds_count"),
            batches,
            "{name}"
        );
        let newest_loaded = t
            .changes
            .iter()
            .filter(|c| c.file < loaded)
            .map(|c| c.commit_micros)
            .max()
            .unwrap();
        assert_eq!(
            at("cdcflow_loaded_up_to_timestamp_seconds"),
            newest_loaded as f64 / 1e6,
            "{name}"
        );
    }
    let objects =
        |table: &str, state: &str| sample(&m, &key("cdcflow_objects", table, &[("state", state)]));
    assert_eq!(objects("orders", "waiting"), 1.0);
    assert_eq!(objects("orders", "quarantined"), 0.0);
    assert_eq!(objects("order_items", "quarantined"), 1.0);
    assert_eq!(
        objects("order_items", "waiting"),
        (items.files - bad - 1) as f64
    );
    assert!(sample(&m, &key("cdcflow_lag_seconds", "orders", &[])) > 0.0);
    let attempts = |table: &str, state: &str| {
        sample(
            &m,
            &key("cdcflow_task_attempts_total", table, &[("state", state)]),
        )
    };
    assert_eq!(attempts("orders", "success"), 1.0);
    // A quarantine stops the table's batches, not its task.
    assert_eq!(attempts("order_items", "success"), 1.0);
    assert_eq!(
        sample(&m, "cdcflow_run_duration_seconds_count{pipeline=\"test\"}"),
        1.0
    );
    assert_eq!(sample(&m, "cdcflow_up{pipeline=\"test\"}"), 1.0);

    // A state store that no longer answers: not ready, and `up` says so.
    let state = ws.path("state/pipeline.toml.db");
    std::fs::write(&state, vec![b'x'; 8192]).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", state.display()));
    }
    let (code, body) = served.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("pipeline test") && body.contains("state"),
        "{body}"
    );
    let (_, text) = served.get("/metrics").await;
    assert_eq!(
        sample(&parse(&python, &text), "cdcflow_up{pipeline=\"test\"}"),
        0.0
    );
}

/// Every YAML document of `deploy/kubernetes/`, as JSON (PyYAML reads them).
fn kubernetes_documents(python: &str) -> Vec<serde_json::Value> {
    const SCRIPT: &str = r#"
import sys, json, glob, yaml
docs = []
for path in sorted(glob.glob(sys.argv[1] + "/*.yaml")):
    with open(path) as f:
        docs += [d for d in yaml.safe_load_all(f) if d]
print(json.dumps(docs))
"#;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
    let out = std::process::Command::new(python)
        .args(["-c", SCRIPT, dir])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The Kubernetes examples hold pipelines `cdcflow validate` accepts, and
/// the scheduler's probes, Service and ServiceMonitor reach the port it
/// listens on, at the paths it serves.
#[test]
fn the_kubernetes_examples_validate_and_their_probes_reach_the_server() {
    let Some(python) = peer("CDCFLOW_TEST_PYTHON") else {
        return;
    };
    let docs = kubernetes_documents(&python);
    let of_kind = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind);
    let ws = Workspace::new();
    let mut pipelines = 0;
    for map in of_kind("ConfigMap") {
        for (name, text) in map["data"].as_object().unwrap() {
            if name.ends_with(".toml") {
                let path = ws.path(name);
                std::fs::write(&path, text.as_str().unwrap()).unwrap();
                let out = ws.cdcflow(&["validate", "-p", path.to_str().unwrap()], &[]);
                assert!(out.status.success(), "{name}: {}", output(&out));
                pipelines += 1;
            }
        }
    }
    assert!(pipelines >= 2, "{pipelines} pipelines in the examples");

    let deployment = of_kind("Deployment")
        .next()
        .expect("the scheduler Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "schedule");
    let listen = args[args.iter().position(|a| *a == "--listen").unwrap() + 1];
    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let named = &container["ports"][0];
    assert_eq!(named["containerPort"], port);
    let name = named["name"].as_str().unwrap();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], name, "{probe}");
    }
    let service = of_kind("Service").next().expect("a Service");
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(service_port["targetPort"], name);
    let monitor = of_kind("ServiceMonitor").next().expect("a ServiceMonitor");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service_port["name"]
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&service["spec"]["selector"], labels);

    // The fleet keeps nothing on a pod's disk: no claim is mounted, and each
    // of its pipelines has its state in PostgreSQL and its tables remote.
    let pod = &deployment["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.get("persistentVolumeClaim").is_none()),
        "{pod}"
    );
    let fleet_maps = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["configMap"]["name"].as_str());
    for map in fleet_maps {
        let data = &of_kind("ConfigMap")
            .find(|m| m["metadata"]["name"] == map)
            .expect("the mounted ConfigMap")["data"];
        for (name, text) in data.as_object().unwrap() {
            let file: toml::Table = text.as_str().unwrap().parse().unwrap();
            let state = file["state"]["url"].as_str().unwrap();
            assert!(state.starts_with("postgres://"), "{name}: state {state}");
            let warehouse = &file["warehouse"];
            let remote = warehouse["kind"].as_str() == Some("bigquery")
                || warehouse["path"]
                    .as_str()
                    .is_some_and(|p| p.contains("://"));
            assert!(remote, "{name}: warehouse {warehouse}");
        }
    }
}

/// Every metric the Grafana dashboard queries is one `cdcflow serve`
/// serves (a renamed metric would leave a panel empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_served_metrics() {
    let (ws, _) = Workspace::published(300, 45, 1000, "");
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(run.status.success(), "{}", output(&run));
    ws.pipelines_folder();
    let served = Served::start(&ws, "pipelines");
    let (_, text) = served.get("/metrics").await;
    let names: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/cdcflow.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("cdcflow_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    for name in &queried {
        assert!(
            names.contains(name.as_str()),
            "{name} is not served; served: {names:?}"
        );
    }
}

/// `url` as headless Chromium renders it: its DOM, and a screenshot saved
/// as a test artifact under `CARGO_TARGET_TMPDIR` (`name`.png).
fn browse(chromium: &str, url: &str, name: &str) -> String {
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let run = |what: &str| {
        let out = std::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                &format!("--user-data-dir={}", profile.path().display()),
                what,
                url,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "chromium {what} {url}: {}",
            output(&out)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    run(&format!(
        "--screenshot={}",
        shots.join(format!("{name}.png")).display()
    ));
    run("--dump-dom")
}

/// The `<tr>` of a rendered table that holds `cell`.
fn row_with<'a>(dom: &'a str, cell: &str) -> &'a str {
    dom.split("<tr>")
        .find(|row| row.contains(&format!(">{cell}<")))
        .unwrap_or_else(|| panic!("no row with {cell} in:\n{dom}"))
}

/// The web UI in a real browser: the overview gives each table its state
/// (order_items waits for an operator at its broken object, orders is ok),
/// the runs grid shows the run, the table page names the quarantined
/// object, and the key lookup shows a deleted row's whole life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_shows_states_runs_and_a_deleted_rows_life() {
    let Some(chromium) = peer("CDCFLOW_TEST_CHROMIUM") else {
        return;
    };
    let ws = Workspace::new();
    let data = ws.synth(1500, 46);
    ws.write_pipeline(3, false);
    ws.publish_all();
    let bad = ws.break_object("order_items", data.tables[1].files / 2);
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(!run.status.success(), "{}", output(&run));
    ws.pipelines_folder();
    let served = Served::start(&ws, "pipelines");

    let dom = browse(&chromium, &format!("{}/", served.base), "overview");
    assert!(
        row_with(&dom, "public.orders").contains("class=\"ok\">ok<"),
        "{dom}"
    );
    assert!(
        row_with(&dom, "public.order_items").contains("class=\"operator\">waiting for operator<"),
        "{dom}"
    );

    let dom = browse(
        &chromium,
        &format!("{}/pipelines/test/runs", served.base),
        "runs",
    );
    assert!(dom.contains("#1 manual"), "{dom}");
    assert!(row_with(&dom, "public.orders").contains("success"), "{dom}");

    // Each cell links to its tries, with what each logged: one "batch
    // committed" line per batch of 3 objects; order_items' try (a success
    // that stopped its table at a bad object) names the object it quarantined.
    let tries = |table: &str| {
        let row = row_with(&dom, table);
        let href = row
            .split("href=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        browse(&chromium, &format!("{}{href}", served.base), table)
    };
    let orders_try = tries("public.orders");
    assert!(orders_try.contains("Try 1: success"), "{orders_try}");
    assert_eq!(
        orders_try.matches("INFO batch committed").count(),
        data.tables[0].files.div_ceil(3),
        "{orders_try}"
    );
    let items_try = tries("public.order_items");
    let key = bad.to_string_lossy().replace('\\', "/");
    assert!(
        items_try.contains("Try 1: success")
            && items_try.contains("ERROR object quarantined")
            && items_try.contains(&key),
        "{items_try}"
    );

    let table = format!("{}/pipelines/test/tables/public.order_items", served.base);
    let dom = browse(&chromium, &table, "table");
    assert!(
        dom.contains(&key),
        "the quarantined object {key} in:\n{dom}"
    );

    // The table page of orders: its batches (fewer than 20) hold every
    // change the generator made, by operation, and the lag chart is drawn.
    let orders = &data.tables[0];
    let url = format!("{}/pipelines/test/tables/public.orders", served.base);
    let dom = browse(&chromium, &url, "orders");
    assert!(dom.contains("<svg") && dom.contains("<polyline"), "{dom}");
    let batches = dom.split("Recent batches").nth(1).unwrap();
    let batches = batches.split("</table>").next().unwrap();
    let mut sums = [0u64; 3];
    for row in batches.split("<tr>").filter(|r| r.starts_with("<td>#")) {
        let cells: Vec<&str> = row
            .split("<td>")
            .skip(1)
            .map(|c| c.split('<').next().unwrap())
            .collect();
        for (sum, cell) in sums.iter_mut().zip(&cells[4..7]) {
            *sum += cell.parse::<u64>().unwrap();
        }
    }
    let ops = [
        cdcflow::decode::Op::Insert,
        cdcflow::decode::Op::Update,
        cdcflow::decode::Op::Delete,
    ]
    .map(|op| orders.changes.iter().filter(|c| c.op == op).count() as u64);
    assert_eq!(sums, ops, "I, U, D of the batches vs the generator");

    // A key of orders whose last change is a delete, and its changes, from the generator.
    let id_of = |c: &cdcflow::synth::Change| match c.values[0] {
        cdcflow::synth::Value::Int(id) => id,
        ref other => panic!("orders.id is an integer: {other:?}"),
    };
    let deleted = orders
        .changes
        .iter()
        .rev()
        .find(|c| c.op == cdcflow::decode::Op::Delete)
        .map(id_of)
        .unwrap();
    let changes = orders
        .changes
        .iter()
        .filter(|c| id_of(c) == deleted)
        .count();
    let url = format!(
        "{}/pipelines/test/tables/public.orders/history?key={deleted}",
        served.base
    );
    let dom = browse(&chromium, &url, "history");
    let rows = dom.matches("<tr>").count() - 1;
    assert_eq!(rows, changes, "every change of key {deleted} once:\n{dom}");
    let last = dom.rsplit("<tr>").next().unwrap();
    assert!(
        last.contains(">D<"),
        "the last change is the delete: {last}"
    );
}

/// Actions need the operator token and the form's CSRF value: a server
/// without a token, a request without the token, and a form without the
/// CSRF value are refused and change nothing; logged in with both, a skip
/// is recorded (as `cdcflow status` then says) and "run now" runs the
/// pipeline past the skipped object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_need_the_operator_token_and_the_forms_csrf_value() {
    let ws = Workspace::new();
    let data = ws.synth(1500, 47);
    ws.write_pipeline(3, false);
    ws.publish_all();
    let bad = ws.break_object("order_items", data.tables[1].files / 2);
    let key = bad.to_string_lossy().replace('\\', "/");
    let run = ws.cdcflow(&["run", "--now", "-p", "pipeline.toml"], &[]);
    assert!(!run.status.success(), "{}", output(&run));
    ws.pipelines_folder();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let table = "/pipelines/test/tables/public.order_items";
    let skip = |served: &Served, csrf: &str, auth: Option<(&str, String)>| {
        let mut request = client.post(format!("{}{table}/skip", served.base)).form(&[
            ("csrf", csrf),
            ("object", key.as_str()),
            ("reason", "broken by the test"),
        ]);
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        request.send()
    };
    let status = || output(&ws.cdcflow(&["status", "-p", "pipeline.toml"], &[]));

    let read_only = Served::start(&ws, "pipelines");
    let refused = skip(&read_only, "x", None).await.unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("read-only"));
    drop(read_only);

    let served = Served::start_with(
        &ws,
        "pipelines",
        &["--token-env", "CDCFLOW_UI_TOKEN"],
        &[("CDCFLOW_UI_TOKEN", "s3cret")],
    );
    let (_, page) = served.get(table).await;
    assert!(
        !page.contains("csrf") && !page.contains("<button>Skip"),
        "{page}"
    );
    let login = |token: &str| {
        client
            .post(format!("{}/login", served.base))
            .form(&[("token", token)])
            .send()
    };
    assert_eq!(login("guess").await.unwrap().status(), 403);
    let ok = login("s3cret").await.unwrap();
    assert_eq!(ok.status(), 303);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && !cookie.contains("s3cret"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let page = client
        .get(format!("{}{table}", served.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF value in the logged-in page:\n{page}"))
        .to_string();
    assert!(page.contains("<button>Skip</button>"), "{page}");

    for (csrf, auth) in [
        (csrf.as_str(), None),
        ("", Some(("cookie", session.clone()))),
        (
            "forged",
            Some(("authorization", "Bearer s3cret".to_string())),
        ),
        (
            csrf.as_str(),
            Some(("authorization", "Bearer guess".to_string())),
        ),
    ] {
        let response = skip(&served, csrf, auth).await.unwrap();
        assert_eq!(response.status(), 403, "{}", response.text().await.unwrap());
    }
    assert!(
        status().contains(&format!("waiting at {key}")),
        "{}",
        status()
    );

    // Retry: the object is no longer quarantined, the next run reads it again.
    let retried = client
        .post(format!("{}{table}/retry", served.base))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str()), ("object", key.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 303);
    assert!(
        !status().contains(&format!("waiting at {key}")),
        "{}",
        status()
    );

    let response = skip(&served, &csrf, Some(("cookie", session.clone())))
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    assert!(
        status().contains(&format!("skipped {key} (broken by the test)")),
        "{}",
        status()
    );

    let started = client
        .post(format!("{}/pipelines/test/run", served.base))
        .header("authorization", "Bearer s3cret")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 303);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let now = status();
        if now.contains("up to date") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run did not load the rest:\n{now}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// The web UI names the worker loading a table while its lease runs, on the
/// overview and the table's page; an expired lease is not shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_names_the_worker_loading_a_table() {
    let (ws, _) = Workspace::published(300, 46, 1000, "");
    ws.pipelines_folder();
    let runner = ws.runner_for("pipelines/test.toml");
    let store = runner.state();
    store
        .acquire_lease(
            "public.orders",
            "worker-7:4242:1",
            std::time::Duration::from_secs(600),
            None,
        )
        .unwrap();
    store
        .acquire_lease(
            "public.order_items",
            "worker-8:1:1",
            std::time::Duration::ZERO,
            None,
        )
        .unwrap();
    let served = Served::start(&ws, "pipelines");
    let (_, overview) = served.get("/").await;
    assert!(
        overview.contains("loading now: worker-7:4242:1"),
        "{overview}"
    );
    assert!(
        !overview.contains("worker-8"),
        "an expired lease: {overview}"
    );
    let (_, page) = served.get("/pipelines/test/tables/public.orders").await;
    assert!(
        page.contains("<th>loading now</th><td>worker-7:4242:1, its lease runs to "),
        "{page}"
    );
    store.release_lease("worker-7:4242:1").unwrap();
    let (_, overview) = served.get("/").await;
    assert!(!overview.contains("loading now"), "{overview}");
}
