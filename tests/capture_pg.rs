//! `cdcflow capture` against a real PostgreSQL 15 (scripts/peers.sh pg): the
//! objects it writes, run through the pipeline, give tables equal to the
//! source, with every change once, across kill -9 at any moment.

use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use tokio_postgres::Client;

use crate::support::{
    StreamingCapture, TcpProxy, Workspace, assert_added_column_matches, assert_same_objects,
    object_rows, output, peer, pg_database, restart_peer, tls_url,
};

/// A fresh database for one test; dropped (with its slot) at the end.
struct Db {
    admin: Client,
    name: String,
    url: String,
    client: Client,
}

use crate::support::pg_connect as connect;

impl Db {
    async fn new(ws: &Workspace) -> Option<Db> {
        Db::on("CDCFLOW_TEST_PG_URL", ws).await
    }

    /// A fresh database on the server whose URL is in `var`.
    async fn on(var: &str, ws: &Workspace) -> Option<Db> {
        let (admin, name, url) = pg_database(var, ws, "cap_").await?;
        let client = connect(&url).await;
        Some(Db {
            admin,
            name,
            url,
            client,
        })
    }

    async fn exec(&self, sql: &str) -> u64 {
        self.client
            .execute(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Rows of `sql` as text (NULL as None), sorted.
    async fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let mut out: Vec<Vec<Option<String>>> = self
            .client
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.get::<_, Option<String>>(i))
                    .collect()
            })
            .collect();
        out.sort();
        out
    }

    async fn drop(self) {
        drop(self.client);
        let _ = self
            .admin
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{0}';
                 DROP DATABASE IF EXISTS {0} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// Writes `capture.toml` (objects into `objects/`) and `pipeline.toml` over them.
fn write_configs(ws: &Workspace, db: &Db, extra_source: &str, tables: &[(&str, &str)]) {
    let objects = ws.path("objects");
    std::fs::write(
        ws.path("capture.toml"),
        format!(
            r#"name = "test"
[source]
url = "{url}"
slot = "{slot}"
publication = "{slot}"
max_changes = 200
{extra_source}
[target]
url = "file://{objects}"
max_rows = 150
interval = "50ms"
date_folders = true
"#,
            url = db.url,
            slot = db.name,
            objects = objects.display(),
        ),
    )
    .unwrap();
    let mut pipeline = format!(
        r#"name = "cap"
[source]
url = "file://{objects}"
timestamp_column = "dms_timestamp"
extra_columns = ["cdc_seq"]
sequence_column = "cdc_seq"
[state]
url = "sqlite://{state}"
[warehouse]
kind = "local"
path = "{warehouse}"
"#,
        objects = objects.display(),
        state = ws.path("state.db").display(),
        warehouse = ws.path("warehouse").display(),
    );
    for (name, key) in tables {
        pipeline.push_str(&format!(
            "[[tables]]\nschema = \"public\"\nname = \"{name}\"\nprimary_key = [{key}]\n"
        ));
    }
    std::fs::write(ws.path("pipeline.toml"), pipeline).unwrap();
}

async fn count(ws: &Workspace, sql: &str) -> i64 {
    let batches = ws.query(sql).await;
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

/// Runs the pipeline over the captured objects; then orders and items must
/// equal the source, and history must hold `history` changes.
async fn load_and_compare(ws: &Workspace, db: &Db, history: i64) {
    let out = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(ws.text_rows(ORDERS_WH).await, db.rows(ORDERS_PG).await);
    assert_eq!(ws.text_rows(ITEMS_WH).await, db.rows(ITEMS_PG).await);
    let found = count(
        ws,
        "SELECT (SELECT count(*) FROM orders_history) + (SELECT count(*) FROM items_history)",
    )
    .await;
    assert_eq!(found, history, "history holds every change exactly once");
}

const ORDERS_PG: &str = "SELECT id::text, customer, amount::text, paid::text, \
     ((extract(epoch from created_at) * 1000000)::bigint)::text, doc::text, encode(blob, 'hex'), \
     u::text, tags::text, d::text, md5(big) FROM orders";
const ORDERS_WH: &str = "SELECT CAST(id AS VARCHAR), customer, CAST(amount AS VARCHAR), \
     CAST(paid AS VARCHAR), CAST(CAST(created_at AS BIGINT) AS VARCHAR), doc, encode(blob, 'hex'), \
     u, tags, CAST(d AS VARCHAR), md5(big) FROM orders";
const ITEMS_PG: &str = "SELECT order_id::text, line_no::text, qty::text, sku FROM items";
const ITEMS_WH: &str = "SELECT CAST(order_id AS VARCHAR), CAST(line_no AS VARCHAR), \
     CAST(qty AS VARCHAR), sku FROM items";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_changes_give_the_source_tables() {
    let ws = Workspace::new();
    let Some(db) = Db::new(&ws).await else { return };
    db.client
        .batch_execute(
            "CREATE TABLE orders(id bigint PRIMARY KEY, customer text, amount numeric(12,2), paid bool,
                created_at timestamptz, doc jsonb, blob bytea, u uuid, tags int[], d date, big text);
             ALTER TABLE orders REPLICA IDENTITY FULL;
             ALTER TABLE orders ALTER COLUMN big SET STORAGE EXTERNAL;
             CREATE TABLE items(order_id bigint, line_no int, qty int, sku text, PRIMARY KEY (order_id, line_no));
             CREATE TABLE ignored(id int PRIMARY KEY);
             INSERT INTO orders SELECT g, 'customer ' || g, g * 1.25, g % 2 = 0,
                timestamptz '2024-05-01 10:00:00.123456+00' + g * interval '1 minute',
                jsonb_build_object('n', g, 's', 'a \"q\", b'), decode(lpad(to_hex(g), 4, '0'), 'hex'),
                md5(g::text)::uuid, ARRAY[g, g + 1], date '2024-01-01' + g,
                CASE WHEN g % 50 = 0 THEN NULL WHEN g % 7 = 0 THEN '' ELSE 'line1\nline2, \"x\"' END
              FROM generate_series(1, 200) g;
             INSERT INTO items SELECT g / 2 + 1, g % 2, g, 'sku-' || g FROM generate_series(0, 399) g;
             INSERT INTO ignored VALUES (1);",
        )
        .await
        .unwrap();
    let rules = r#"{"rules": [{"rule-type": "selection", "rule-id": "1", "rule-name": "1",
        "object-locator": {"schema-name": "public", "table-name": "%"}, "rule-action": "include"},
        {"rule-type": "selection", "rule-id": "2", "rule-name": "2",
        "object-locator": {"schema-name": "public", "table-name": "ign%"}, "rule-action": "exclude"}]}"#;
    std::fs::write(ws.path("rules.json"), rules).unwrap();
    let rules_line = format!("rules = \"{}\"", ws.path("rules.json").display());
    write_configs(
        &ws,
        &db,
        &rules_line,
        &[("orders", "\"id\""), ("items", "\"order_id\", \"line_no\"")],
    );

    // Full load.
    let text = ws.capture_once(&[]);
    assert!(text.contains("captured 600 changes"), "{text}");
    assert!(
        !ws.path("objects/public/ignored").exists(),
        "excluded table written"
    );

    // The workload: every statement's row count is the number of changes it makes.
    let mut changes = 0;
    changes += db.exec("INSERT INTO orders(id, customer, amount) SELECT g, 'late ' || g, g FROM generate_series(201, 250) g").await;
    db.exec("BEGIN").await;
    changes += db
        .exec("UPDATE orders SET amount = amount + 1, paid = NOT paid WHERE id BETWEEN 1 AND 30")
        .await;
    changes += db
        .exec("DELETE FROM orders WHERE id BETWEEN 31 AND 40")
        .await;
    changes += db
        .exec("INSERT INTO items VALUES (1, 7, 1, 'in txn'), (2, 7, 1, NULL)")
        .await;
    db.exec("COMMIT").await;
    // TOAST: an out-of-line value, then updates that leave it unchanged.
    changes += db
        .exec("UPDATE orders SET big = repeat(md5(id::text), 200) WHERE id BETWEEN 41 AND 45")
        .await;
    changes += db
        .exec("UPDATE orders SET customer = 'toast kept' WHERE id BETWEEN 41 AND 45")
        .await;
    // Key updates: a delete of the old key and an insert of the new one each.
    changes += 2 * db
        .exec("UPDATE orders SET id = id + 10000 WHERE id BETWEEN 100 AND 104")
        .await;
    changes += 2 * db
        .exec("UPDATE items SET line_no = line_no + 100 WHERE order_id = 3")
        .await;
    changes += db
        .exec("DELETE FROM items WHERE order_id BETWEEN 10 AND 20")
        .await;
    // Delete then insert again the same key, in one transaction.
    db.exec("BEGIN").await;
    changes += db.exec("DELETE FROM orders WHERE id = 150").await;
    changes += db
        .exec("INSERT INTO orders(id, customer) VALUES (150, 'reborn')")
        .await;
    db.exec("COMMIT").await;
    changes += db.exec("INSERT INTO ignored VALUES (2)").await - 1;
    // A new column: a new schema version, and the pipeline adds the column.
    db.exec("ALTER TABLE orders ADD COLUMN note text").await;
    changes += db
        .exec("UPDATE orders SET note = 'noted ' || id WHERE id BETWEEN 1 AND 3")
        .await;
    // A truncate (one change) removes rows loaded before and rows changed in this batch.
    changes += db.exec("TRUNCATE items").await + 1;
    changes += db
        .exec("INSERT INTO items VALUES (500, 1, 1, 'after truncate'), (3, 100, 5, 'back')")
        .await;

    let text = ws.capture_once(&[]);
    assert!(
        text.contains(&format!("captured {changes} changes")),
        "{changes}: {text}"
    );
    load_and_compare(&ws, &db, 600 + changes as i64).await;
    let history = 600 + changes as i64;
    let distinct = count(&ws, "SELECT count(DISTINCT cdc_seq) FROM orders_history").await
        + count(&ws, "SELECT count(DISTINCT cdc_seq) FROM items_history").await;
    assert_eq!(distinct, history, "a change sequence appears twice");
    // Key 150, in commit order: loaded, deleted, inserted again.
    let ops = ws
        .text_rows(
            "SELECT string_agg(op, '' ORDER BY change_seq) FROM orders_history WHERE id = 150",
        )
        .await;
    assert_eq!(ops, vec![vec![Some("IDI".to_string())]]);
    // The key update: 100 deleted, 10100 inserted.
    let ops = ws.text_rows("SELECT CAST(id AS VARCHAR), string_agg(op, '' ORDER BY change_seq) FROM orders_history WHERE id IN (100, 10100) GROUP BY id").await;
    assert_eq!(
        ops,
        vec![
            vec![Some("100".into()), Some("ID".into())],
            vec![Some("10100".into()), Some("I".into())]
        ]
    );

    let notes = "SELECT CAST(id AS VARCHAR), note FROM orders WHERE note IS NOT NULL";
    assert_eq!(
        ws.text_rows(notes).await,
        db.rows(&notes.replace("CAST(id AS VARCHAR)", "id::text"))
            .await
    );
    assert!(
        ws.path("objects/public/orders/cdcflow-schema-v0002.json")
            .exists()
    );
    // The truncate ends the versions it removed; the rows inserted after it are current.
    let current = ws
        .text_rows("SELECT CAST(count(*) AS VARCHAR) FROM items_versions WHERE is_current")
        .await;
    assert_eq!(current, vec![vec![Some("2".to_string())]]);

    // Nothing new: a run writes nothing and the slot is at the server's position.
    let text = ws.capture_once(&[]);
    assert!(text.contains("captured 0 changes"), "{text}");
    let status = ws.cdcflow(&["capture", "--config", "capture.toml", "--status"], &[]);
    let status = output(&status);
    assert!(
        status.contains("full load: done") && status.contains("behind by"),
        "{status}"
    );
    db.drop().await;
}

/// Tables `orders` (with `orders` rows) and `items`, the configs over them,
/// and a first `capture --once` (the full load).
async fn orders_and_items(ws: &Workspace, db: &Db, orders: i64) {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE orders(id bigint PRIMARY KEY, customer text, amount numeric(12,2), paid bool,
                created_at timestamptz, doc jsonb, blob bytea, u uuid, tags int[], d date, big text);
             INSERT INTO orders(id, amount) SELECT g, g FROM generate_series(1, {orders}) g;
             CREATE TABLE items(order_id bigint, line_no int, qty int, sku text, PRIMARY KEY (order_id, line_no));"
        ))
        .await
        .unwrap();
    write_configs(
        ws,
        db,
        "",
        &[("orders", "\"id\""), ("items", "\"order_id\", \"line_no\"")],
    );
    ws.capture_once(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_each_step_loses_and_doubles_nothing() {
    let ws = Workspace::new();
    let Some(db) = Db::new(&ws).await else { return };
    orders_and_items(&ws, &db, 100).await;
    let mut changes = 0;
    for (round, failpoint) in crate::support::capture_failpoints().enumerate() {
        // Enough changes for several chunks (200 changes each) and objects (150 rows).
        let base = 1000 * (round as i64 + 1);
        changes += db
            .exec(&format!(
                "INSERT INTO items SELECT {base}, g, g, 'x' FROM generate_series(1, 300) g"
            ))
            .await;
        changes += db
            .exec(&format!(
                "UPDATE orders SET amount = amount + 1 WHERE id <= {}",
                50 + round * 10
            ))
            .await;
        changes += db
            .exec(&format!(
                "DELETE FROM items WHERE order_id = {base} AND line_no % 3 = 0"
            ))
            .await;
        ws.capture_crashing_at(&failpoint);
        ws.capture_once(&[]);
    }
    crate::support::assert_each_change_once(&ws.path("objects"), changes as usize);
    load_and_compare(&ws, &db, 100 + changes as i64).await;
    db.drop().await;
}

/// A crash while capture recovers from a crash: the objects the first run
/// wrote must still be known to the third, though the second run's chunk
/// named other objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_crash_during_recovery_doubles_nothing() {
    let ws = Workspace::new();
    let Some(db) = Db::new(&ws).await else { return };
    orders_and_items(&ws, &db, 0).await;
    // One chunk, one object per table.
    db.client
        .batch_execute(
            "BEGIN;
             INSERT INTO orders(id, amount) SELECT g, g FROM generate_series(1, 40) g;
             INSERT INTO items SELECT g, 1, g, 'x' FROM generate_series(1, 40) g;
             COMMIT;",
        )
        .await
        .unwrap();
    // First crash: one table's object is written, the other's is not.
    ws.capture_crashing_at("capture.after_first_object@1");
    // Second crash, during the replay: the other table's object is written.
    ws.capture_crashing_at("capture.before_confirm@1");
    ws.capture_once(&[]);
    crate::support::assert_each_change_once(&ws.path("objects"), 80);
    load_and_compare(&ws, &db, 80).await;
    db.drop().await;
}

/// A transaction many times `max_memory_mib` is written in parts before its
/// end, in bounded memory, and a crash between the parts loses and doubles
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_memory_is_spilled_and_lands_once() {
    const ROWS: i64 = 120_000;
    const PAYLOAD: usize = 1_000;
    const MEMORY_MIB: u64 = 4;
    let ws = Workspace::new();
    let Some(db) = Db::new(&ws).await else { return };
    db.exec("CREATE TABLE big(id bigint PRIMARY KEY, payload text)")
        .await;
    write_configs(&ws, &db, "", &[("big", "\"id\"")]);
    let capture = std::fs::read_to_string(ws.path("capture.toml")).unwrap();
    let capture = capture.replace(
        "max_rows = 150",
        &format!("max_rows = 1000000\nmax_mib = 2\nmax_memory_mib = {MEMORY_MIB}"),
    );
    std::fs::write(ws.path("capture.toml"), capture).unwrap();
    let args = ["capture", "--config", "capture.toml", "--once"];
    let (out, idle_mib) = ws.cdcflow_peak_mib(&args, &[]);
    assert!(out.status.success(), "{}", output(&out));
    // One transaction of about 120 MB of values.
    db.exec(&format!(
        "INSERT INTO big SELECT g, repeat(md5(g::text), {}) FROM generate_series(1, {ROWS}) g",
        PAYLOAD / 32
    ))
    .await;
    // A crash as the transaction's second part is about to be written: the
    // first part's objects are in the target, the position is not confirmed,
    // so the next run reads the whole transaction again.
    ws.capture_crashing_at("capture.after_checkpoint@2");
    let spilled = crate::support::object_seq_counts(&ws.path("objects"), "cdc_seq");
    assert!(
        (1..ROWS as usize).contains(&spilled.len()),
        "part of the transaction is in objects before its end: {} of {ROWS} changes",
        spilled.len()
    );
    // Again, measured, crashing once all of it is written and before its
    // end is confirmed: the first part is skipped, the rest held in parts.
    let (out, peak_mib) =
        ws.cdcflow_peak_mib(&args, &[("CDCFLOW_FAILPOINT", "capture.before_confirm")]);
    assert!(output(&out).contains("failpoint"), "{}", output(&out));
    ws.capture_once(&[]);
    let transaction_mib = (ROWS as u64 * PAYLOAD as u64) >> 20;
    eprintln!(
        "peak memory: {peak_mib} MiB for a {transaction_mib} MiB transaction, {idle_mib} MiB idle"
    );
    assert!(
        // Buffers, encoding and the allocator's slack: a few times the limit.
        peak_mib < idle_mib + 8 * MEMORY_MIB,
        "capture held the transaction: peak {peak_mib} MiB, idle {idle_mib} MiB, transaction {transaction_mib} MiB"
    );
    crate::support::assert_each_change_once(&ws.path("objects"), ROWS as usize);
    let out = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(
        ws.text_rows("SELECT CAST(id AS VARCHAR), md5(payload) FROM big")
            .await,
        db.rows("SELECT id::text, md5(payload) FROM big").await
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_live_workload_loses_and_doubles_nothing() {
    let ws = Workspace::new();
    let Some(db) = Db::new(&ws).await else { return };
    db.client
        .batch_execute(
            "CREATE TABLE items(order_id bigint, line_no int, qty int, sku text, PRIMARY KEY (order_id, line_no));
             INSERT INTO items SELECT g, 0, g, 'start' FROM generate_series(1, 500) g;",
        )
        .await
        .unwrap();
    write_configs(&ws, &db, "", &[("items", "\"order_id\", \"line_no\"")]);
    ws.capture_once(&[]);
    // The workload runs on its own connection; each transaction's row count is summed.
    let url = db.url.clone();
    let workload = tokio::spawn(async move {
        let mut c = connect(&url).await;
        let mut changes = 0u64;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for i in 0..400i64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let k = (state % 600) as i64 + 1;
            let tx = c.build_transaction().start().await.unwrap();
            changes += tx
                .execute(
                    &format!(
                        "INSERT INTO items VALUES ({k}, {i} + 1, {i}, 'w') ON CONFLICT DO NOTHING"
                    ),
                    &[],
                )
                .await
                .unwrap();
            changes += tx
                .execute(
                    &format!("UPDATE items SET qty = qty + 1, sku = 'u{i}' WHERE order_id = {k}"),
                    &[],
                )
                .await
                .unwrap();
            if i % 5 == 0 {
                changes += tx
                    .execute(
                        &format!(
                            "DELETE FROM items WHERE order_id = {} AND line_no = 0",
                            k + 1
                        ),
                        &[],
                    )
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        changes
    });
    let mut kills = 0;
    let mut delay = 150;
    while !workload.is_finished() {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cdcflow"))
            .current_dir(ws.dir.path())
            .args(["capture", "--config", "capture.toml"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        delay = 90 + (delay * 7) % 300;
    }
    let changes = workload.await.unwrap();
    assert!(kills >= 3, "only {kills} kills: the workload was too short");
    // Streaming capture stops cleanly on SIGTERM, having written what it read.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cdcflow"))
        .current_dir(ws.dir.path())
        .args(["capture", "--config", "capture.toml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let stopped = child.wait_with_output().unwrap();
    assert!(stopped.status.success(), "SIGTERM: {}", output(&stopped));
    assert!(
        output(&stopped).contains("captured"),
        "{}",
        output(&stopped)
    );
    ws.capture_once(&[]);
    let out = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(ws.text_rows(ITEMS_WH).await, db.rows(ITEMS_PG).await);
    let history = count(&ws, "SELECT count(*) FROM items_history").await;
    assert_eq!(
        history,
        500 + changes as i64,
        "history holds every change exactly once ({kills} kills)"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_objects_on_s3_with_dms_rules_and_masks() {
    use object_store::ObjectStoreExt;
    let ws = Workspace::new();
    let Some(endpoint) = peer("CDCFLOW_TEST_S3_ENDPOINT") else {
        return;
    };
    let Some(db) = Db::new(&ws).await else { return };
    db.client
        .batch_execute(
            "CREATE TABLE customers(id bigint PRIMARY KEY, email text, name text, ssn text);
             INSERT INTO customers SELECT g, 'user' || g || '@example.com', 'Name, \"' || g || '\"', 'ssn-' || g
               FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    let bucket = crate::s3::bucket(&endpoint, &ws).await;
    let rules = r#"{"rules": [
        {"rule-type": "selection", "rule-id": "1", "rule-name": "1",
         "object-locator": {"schema-name": "public", "table-name": "cust%"}, "rule-action": "include"},
        {"rule-type": "transformation", "rule-id": "2", "rule-name": "2", "rule-target": "table",
         "object-locator": {"schema-name": "public", "table-name": "customers"}, "rule-action": "rename", "value": "clients"},
        {"rule-type": "transformation", "rule-id": "3", "rule-name": "3", "rule-target": "column",
         "object-locator": {"schema-name": "%", "table-name": "%", "column-name": "ssn"}, "rule-action": "remove-column"},
        {"rule-type": "transformation", "rule-id": "4", "rule-name": "4", "rule-target": "column",
         "object-locator": {"schema-name": "%", "table-name": "%", "column-name": "name"}, "rule-action": "rename", "value": "full_name"}]}"#;
    std::fs::write(ws.path("rules.json"), rules).unwrap();
    let store = format!(
        "endpoint = \"{endpoint}\"\nallow_http = true\nregion = \"us-east-1\"\n\
         options = {{ aws_access_key_id = \"test\", aws_secret_access_key = \"test\" }}\n"
    );
    std::fs::write(
        ws.path("capture.toml"),
        format!(
            "name = \"s3\"\n[source]\nurl = \"{url}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\nrules = \"{rules}\"\n\
             [target]\nurl = \"s3://{bucket}/cap\"\nformat = \"csv\"\n{store}\
             [[masking]]\ntable = \"public.customers\"\ncolumn = \"email\"\nmethod = \"hash\"\nsalt_env = \"TEST_SALT\"\n",
            url = db.url,
            slot = db.name,
            rules = ws.path("rules.json").display(),
        ),
    )
    .unwrap();
    let salt = [("TEST_SALT", "pepper")];
    ws.capture_once(&salt);
    db.exec("UPDATE customers SET email = 'new' || id || '@example.com', ssn = 'changed' WHERE id <= 10").await;
    db.exec("DELETE FROM customers WHERE id = 50").await;
    ws.capture_once(&salt);

    // The schema file describes the headerless CSV: the pipeline declares its columns from it.
    let s3 = crate::s3::store(&endpoint, &bucket);
    let schema = s3
        .get(&"cap/public/clients/cdcflow-schema-v0001.json".into())
        .await
        .expect("schema file written")
        .bytes()
        .await
        .unwrap();
    let schema: serde_json::Value = serde_json::from_slice(&schema).unwrap();
    let columns: Vec<String> = schema["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{{ name = {}, type = {} }}", c["name"], c["type"]))
        .collect();
    assert_eq!(schema["primary_key"], serde_json::json!(["id"]));
    assert!(!columns.iter().any(|c| c.contains("ssn")), "{columns:?}");
    std::fs::write(
        ws.path("pipeline.toml"),
        format!(
            "name = \"s3cap\"\n[source]\nurl = \"s3://{bucket}/cap\"\n{store}timestamp_column = \"dms_timestamp\"\n\
             extra_columns = [\"cdc_seq\"]\nsequence_column = \"cdc_seq\"\n\
             [state]\nurl = \"sqlite://{state}\"\n[warehouse]\nkind = \"local\"\npath = \"{wh}\"\n\
             [[tables]]\nschema = \"public\"\nname = \"clients\"\nprimary_key = [\"id\"]\ncolumns = [{columns}]\n",
            state = ws.path("state.db").display(),
            wh = ws.path("warehouse").display(),
            columns = columns.join(", "),
        ),
    )
    .unwrap();
    let out = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
    assert!(out.status.success(), "{}", output(&out));
    // The hash is computed by PostgreSQL, independently of cdcflow.
    let expected = db
        .rows("SELECT id::text, encode(sha256(('pepper' || email)::bytea), 'hex'), name FROM customers")
        .await;
    let found = ws
        .text_rows("SELECT CAST(id AS VARCHAR), email, full_name FROM clients")
        .await;
    assert_eq!(found, expected);
    db.drop().await;
}

/// The server's next transaction id, as the 32-bit xid of the stream.
async fn xid32(db: &Db) -> i64 {
    db.client
        .query_one("SELECT (txid_current() % 4294967296)::int8", &[])
        .await
        .unwrap()
        .get(0)
}

/// Changes whose transactions cross the 32-bit transaction-id wrap after
/// the full load are all captured (`../shared/repro/pg-xid-wraparound`:
/// before, every transaction after the wrap was taken as seen by the full
/// load's snapshot and dropped: 493 of 700 captured, exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_across_the_transaction_id_wrap_are_all_captured() {
    let ws = Workspace::new();
    let Some(db) = Db::on("CDCFLOW_TEST_PGWRAP_URL", &ws).await else {
        return;
    };
    let xid = xid32(&db).await;
    assert!(
        xid > 4_294_967_295 - 600,
        "this test must cross the wrap: restart the peer (scripts/peers.sh pgwrap start); xid is {xid}"
    );
    captured_t(&ws, &db, 100).await;
    for i in 0..700 {
        db.exec(&format!(
            "UPDATE t SET v = v + 1 WHERE id = {}",
            i % 100 + 1
        ))
        .await;
    }
    let after = xid32(&db).await;
    assert!(
        after < xid,
        "the updates crossed the wrap ({xid} -> {after})"
    );
    ws.capture_once(&[]);
    let out = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(
        ws.text_rows("SELECT CAST(id AS VARCHAR), CAST(v AS VARCHAR) FROM t")
            .await,
        db.rows("SELECT id::text, v::text FROM t").await
    );
    assert_eq!(count(&ws, "SELECT count(*) FROM t_history").await, 800);
    db.drop().await;
}

/// A source that goes backwards (here: a checkpoint ahead of the server, as
/// after restoring the server from a backup) is refused loudly: no change
/// whose sequence is not above the last confirmed one is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_went_backwards_is_refused() {
    let ws = Workspace::new();
    let Some(db) = Db::new(&ws).await else { return };
    captured_t(&ws, &db, 10).await;
    db.exec("UPDATE t SET v = 1").await;
    ws.capture_once(&[]);
    // The last confirmed change, as a server restored from an older backup sees it: ahead.
    let path = ws.path("objects/_cdcflow/capture-test.json");
    let mut checkpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let table = &mut checkpoint["tables"]["public.t"];
    assert!(table["confirmed_seq"].is_string(), "{checkpoint}");
    table["confirmed_seq"] = serde_json::json!("9".repeat(35));
    std::fs::write(&path, serde_json::to_vec(&checkpoint).unwrap()).unwrap();
    let objects_before = data_files(&ws.path("objects/public"));
    db.exec("UPDATE t SET v = 2").await;
    let out = ws.cdcflow(&["capture", "--config", "capture.toml", "--once"], &[]);
    let text = output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("went backwards"), "{text}");
    assert_eq!(
        data_files(&ws.path("objects/public")),
        objects_before,
        "nothing written"
    );
    db.drop().await;
}

/// Table `t (id, v)` with `rows` rows, the configs over it, and a first
/// capture.
async fn captured_t(ws: &Workspace, db: &Db, rows: u32) {
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, v int)")
        .await;
    db.exec(&format!(
        "INSERT INTO t SELECT g, 0 FROM generate_series(1, {rows}) g"
    ))
    .await;
    write_configs(ws, db, "", &[("t", "\"id\"")]);
    ws.capture_once(&[]);
}

/// The files below `dir`.
fn data_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| if p.is_dir() { data_files(&p) } else { 1 })
        .sum()
}

/// TLS as libpq users set it, in the URL: verify-full accepts the host the
/// certificate names and refuses another (and a certificate of another CA);
/// verify-ca accepts any name the CA signed; `require` refuses a server
/// without TLS. The role connecting may only connect over TLS (pg_hba),
/// so a full load that works went over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_accepts_the_named_host_and_refuses_others() {
    let ws = Workspace::new();
    let (Some(db), Some((ca, other))) = (Db::new(&ws).await, crate::support::tls_cas()) else {
        return;
    };
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    db.exec("INSERT INTO t VALUES (1, 'a'), (2, 'b')").await;
    db.admin
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE tlsonly LOGIN SUPERUSER; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .await
        .unwrap();
    let url = |host: &str, params: &str| tls_url(&db.url, "tlsonly", host, params);
    let mut cases = vec![
        (
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Ok(()),
        ),
        (
            url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Err("name the host"),
        ),
        (
            url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")),
            Ok(()),
        ),
        (
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={other}"),
            ),
            Err("UnknownIssuer"),
        ),
        (url("localhost", "sslmode=require"), Ok(())),
        (url("localhost", "sslmode=disable"), Err("no encryption")),
    ];
    if let Some(plain) = peer("CDCFLOW_TEST_PGWRAP_URL") {
        cases.push((format!("{plain}?sslmode=require"), Err("TLS")));
    }
    ws.capture_tls_cases(&cases);
    db.drop().await;
}

/// Streaming capture whose connections are cut twice, with new ones refused
/// for 2 s each time (what a client sees when the server restarts or fails
/// over), reconnects and resumes from its checkpoint: it keeps running, it
/// captures what was committed after each cut, and every change lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_capture_reconnects_after_the_database_goes_away() {
    let ws = Workspace::new();
    let Some(mut db) = Db::new(&ws).await else {
        return;
    };
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, v int)")
        .await;
    db.exec("INSERT INTO t SELECT g, 0 FROM generate_series(1, 50) g")
        .await;
    let proxy = TcpProxy::start(&db.url).await;
    let proxied = proxy.url(&db.url);
    let direct = std::mem::replace(&mut db.url, proxied);
    write_configs(&ws, &db, "", &[("t", "\"id\"")]);
    db.url = direct;
    let mut capture = StreamingCapture::start(&ws);
    capture.wait_for_full_load(&ws.path("objects")).await;
    let updates = proxy.updates_around_outages(&mut db).await;
    let expected = db.rows("SELECT id::text, v::text FROM t").await;
    capture
        .until_loaded(
            &ws,
            "SELECT CAST(id AS VARCHAR), CAST(v AS VARCHAR) FROM t",
            &expected,
        )
        .await;
    assert_eq!(
        count(&ws, "SELECT count(*) FROM t_history").await,
        50 + updates as i64
    );
    db.drop().await;
}

impl crate::support::Exec for Db {
    async fn exec(&mut self, sql: &str) -> u64 {
        Db::exec(self, sql).await
    }
}

/// A column added with a default gives every row the source holds that
/// value, and no change event says so (PostgreSQL 11+ keeps it as the
/// column's "missing value"). The schema version carries it (and NOT
/// NULL); the current table gives it to every row not changed since, while
/// history says truthfully that the older changes had no such column.
/// Before, every row not changed since the ALTER read NULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_with_a_default_has_its_value_in_unchanged_rows() {
    let ws = Workspace::new();
    let Some(db) = Db::new(&ws).await else {
        return;
    };
    captured_t(&ws, &db, 100).await;
    let before = db.exec("UPDATE t SET v = 1 WHERE id <= 10").await;
    db.exec("ALTER TABLE t ADD COLUMN tier varchar(10) NOT NULL DEFAULT 'it''s std'")
        .await;
    let after = db
        .exec("UPDATE t SET v = 2 WHERE id BETWEEN 5 AND 15")
        .await
        + db.exec("UPDATE t SET tier = 'gold' WHERE id BETWEEN 90 AND 95")
            .await
        + db.exec("INSERT INTO t (id, v) VALUES (101, 0)").await;
    ws.capture_once(&[]);
    assert_added_column_matches(&ws, &db.rows(ADDED_PG).await, 100 + before, after).await;
    db.drop().await;
}

const ADDED_PG: &str = "SELECT id::text, v::text, tier FROM t";

/// Runs `pgbench` with `args` and the database URL; returns its standard output.
fn pgbench(args: &[&str], url: &str) -> String {
    let out = std::process::Command::new("/usr/lib/postgresql/15/bin/pgbench")
        .args(args)
        .arg(url)
        .output()
        .expect("pgbench (postgresql-15)");
    let text = output(&out);
    assert!(out.status.success(), "pgbench {args:?}:\n{text}");
    text
}

/// The soak: pgbench (TPC-B-like: 4 clients updating accounts, tellers and
/// branches, and inserting into the keyless, insert-only pgbench_history) runs
/// in two segments while streaming capture is SIGKILLed and restarted at
/// random moments. Between them the server goes away: every connection is
/// cut and new ones are refused for 2 s, and under `make chaos` the server
/// itself restarts. A final `capture --once` and a pipeline run then give
/// tables equal to the source row for row, and history holds each inserted
/// row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_kills_and_a_server_restart_loses_and_doubles_nothing() {
    use crate::chaos::{Delays, kill_capture_while, restart_servers, soak_secs};
    let ws = Workspace::new();
    let Some(mut db) = Db::new(&ws).await else {
        return;
    };
    pgbench(&["-i", "-s", "1", "-q"], &db.url);
    let proxy = TcpProxy::start(&db.url).await;
    let proxied = proxy.url(&db.url);
    let direct = std::mem::replace(&mut db.url, proxied);
    let tables = [
        ("pgbench_accounts", "\"aid\""),
        ("pgbench_branches", "\"bid\""),
        ("pgbench_tellers", "\"tid\""),
        ("pgbench_history", "\"tid\", \"bid\", \"aid\", \"mtime\""),
    ];
    write_configs(&ws, &db, "", &tables);
    db.url = direct;
    ws.capture_once(&[]);
    let mut delays = Delays::new();
    let (mut kills, mut transactions) = (0, 0);
    for segment in 0..2 {
        if segment == 1 {
            if restart_servers() {
                restart_peer("pg");
            } else {
                proxy.outage(Duration::from_secs(2)).await;
            }
        }
        let (url, secs) = (db.url.clone(), soak_secs().to_string());
        let workload = tokio::task::spawn_blocking(move || {
            let out = pgbench(&["-c", "4", "-j", "2", "-n", "-T", &secs], &url);
            out.lines()
                .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no transaction count in:\n{out}"))
        });
        let (k, t) = kill_capture_while(&ws, workload, &mut delays).await;
        kills += k;
        transactions += t;
    }
    // The server may have restarted: the test's own connections are new.
    let db = Db {
        client: connect(&db.url).await,
        admin: connect(&peer("CDCFLOW_TEST_PG_URL").expect("the server's URL")).await,
        ..db
    };
    ws.capture_once(&[]);
    let out = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
    assert!(out.status.success(), "{}", output(&out));
    let mut compared = 0;
    for (pg, wh) in [
        (
            "SELECT aid::text, bid::text, abalance::text FROM pgbench_accounts",
            "SELECT CAST(aid AS VARCHAR), CAST(bid AS VARCHAR), CAST(abalance AS VARCHAR) FROM pgbench_accounts",
        ),
        (
            "SELECT bid::text, bbalance::text FROM pgbench_branches",
            "SELECT CAST(bid AS VARCHAR), CAST(bbalance AS VARCHAR) FROM pgbench_branches",
        ),
        (
            "SELECT tid::text, tbalance::text FROM pgbench_tellers",
            "SELECT CAST(tid AS VARCHAR), CAST(tbalance AS VARCHAR) FROM pgbench_tellers",
        ),
        (
            "SELECT tid::text, bid::text, aid::text, delta::text, \
             ((extract(epoch from mtime) * 1000000)::bigint)::text FROM pgbench_history",
            "SELECT CAST(tid AS VARCHAR), CAST(bid AS VARCHAR), CAST(aid AS VARCHAR), \
             CAST(delta AS VARCHAR), CAST(CAST(mtime AS BIGINT) AS VARCHAR) FROM pgbench_history_history",
        ),
    ] {
        let source = db.rows(pg).await;
        assert_eq!(ws.text_rows(wh).await, source, "{wh}");
        compared += source.len();
    }
    assert!(
        transactions > 0 && kills > 0,
        "{transactions} transactions, {kills} kills"
    );
    eprintln!(
        "soak pgbench: {transactions} transactions, {kills} kills of streaming capture, 1 {}, \
         {compared} rows compared, 0 lost, 0 doubled",
        if restart_servers() {
            "server restart"
        } else {
            "outage of every connection"
        }
    );
    db.drop().await;
}

/// `serve --captures`: /metrics and the UI give the capture's checkpoint
/// time (as its checkpoint file says) and how far its slot is behind the
/// server (between what PostgreSQL says just before and just after the
/// scrape); writes the capture has not read yet raise it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_the_captures_checkpoint_and_slot_lag() {
    let Some(python) = peer("CDCFLOW_TEST_PYTHON") else {
        return;
    };
    let ws = Workspace::new();
    let Some(db) = Db::new(&ws).await else { return };
    captured_t(&ws, &db, 10).await;
    ws.pipelines_folder();
    std::fs::create_dir_all(ws.path("captures")).unwrap();
    std::fs::copy(ws.path("capture.toml"), ws.path("captures/test.toml")).unwrap();
    let served =
        crate::serve::Served::start_with(&ws, "pipelines", &["--captures", "captures"], &[]);
    let slot_lag = || async {
        let row = db
            .admin
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) as f64
    };
    let scrape = || async {
        let before = slot_lag().await;
        let (_, text) = served.get("/metrics").await;
        let after = slot_lag().await;
        (before, crate::serve::parse(&python, &text), after)
    };
    let at = |m: &std::collections::BTreeMap<String, f64>, name: &str| {
        crate::serve::sample(m, &format!("{name}{{capture=\"test\"}}"))
    };

    let (before, m, after) = scrape().await;
    assert_eq!(at(&m, "cdcflow_capture_up"), 1.0);
    assert_eq!(at(&m, "cdcflow_capture_full_load_done"), 1.0);
    let checkpoint: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ws.path("objects/_cdcflow/capture-test.json")).unwrap(),
    )
    .unwrap();
    let written =
        chrono::DateTime::parse_from_rfc3339(checkpoint["updated_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        at(&m, "cdcflow_capture_checkpoint_timestamp_seconds"),
        written.timestamp_micros() as f64 / 1e6
    );
    let behind = at(&m, "cdcflow_capture_behind_bytes");
    assert!(
        (before..=after).contains(&behind),
        "{before} <= {behind} <= {after}"
    );

    db.exec("INSERT INTO t SELECT g, 1 FROM generate_series(11, 2000) g")
        .await;
    let (before, m, after) = scrape().await;
    let grown = at(&m, "cdcflow_capture_behind_bytes");
    assert!(grown > behind, "{grown} > {behind}");
    assert!(
        (before..=after).contains(&grown),
        "{before} <= {grown} <= {after}"
    );

    let (_, page) = served.get("/").await;
    assert!(
        page.contains("Captures") && page.contains("behind by"),
        "{page}"
    );

    // What the capture wrote: the full load is not counted, its CDC is.
    let written = |m: &std::collections::BTreeMap<String, f64>, what: &str| {
        crate::serve::sample(
            m,
            &format!("cdcflow_capture_{what}_written_total{{capture=\"test\",table=\"public.t\"}}"),
        )
    };
    assert_eq!(written(&m, "changes"), 0.0);
    ws.capture_once(&[]);
    let (_, m, _) = scrape().await;
    assert_eq!(written(&m, "changes"), 1990.0);
    let objects = crate::support::cdc_objects(&ws.path("objects/public/t")).len();
    assert!(objects > 0);
    assert_eq!(written(&m, "objects"), objects as f64);
    let (_, page) = served.get("/captures/test").await;
    assert!(page.contains("<td>1990</td>"), "{page}");
    drop(served);
    db.drop().await;
}

/// The added column of [`a_column_added_with_a_default_has_its_value_in_unchanged_rows`]
/// reaches a PostgreSQL warehouse the same way (the table gains the column
/// with its value for the rows it holds), connected over TLS as capture
/// connects: verify-full, a role that may only connect over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_with_a_default_reaches_a_postgres_warehouse_over_tls() {
    let ws = Workspace::new();
    let (Some(db), Some((ca, _))) = (Db::new(&ws).await, crate::support::tls_cas()) else {
        return;
    };
    let Some(target) = crate::database::Target::postgres(&ws).await else {
        return;
    };
    db.admin
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE tlsonly LOGIN SUPERUSER; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .await
        .unwrap();
    captured_t(&ws, &db, 100).await;
    let crate::database::Target::Pg { schema, url, .. } = &target else {
        unreachable!()
    };
    let tls = tls_url(
        url,
        "tlsonly",
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let pipeline = std::fs::read_to_string(ws.path("pipeline.toml")).unwrap();
    let (head, rest) = pipeline.split_once("[warehouse]\n").unwrap();
    let rest = rest.splitn(3, '\n').nth(2).unwrap();
    std::fs::write(
        ws.path("pipeline.toml"),
        format!(
            "{head}[warehouse]\nkind = \"postgres\"\nurl = \"{tls}\"\nschema = \"{schema}\"\n{rest}"
        ),
    )
    .unwrap();
    let before = db.exec("UPDATE t SET v = 1 WHERE id <= 10").await;
    let first = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
    assert!(first.status.success(), "{}", output(&first));
    db.exec("ALTER TABLE t ADD COLUMN tier varchar(10) NOT NULL DEFAULT 'it''s std'")
        .await;
    let after = db
        .exec("UPDATE t SET v = 2 WHERE id BETWEEN 5 AND 15")
        .await
        + db.exec("UPDATE t SET tier = 'gold' WHERE id BETWEEN 90 AND 95")
            .await
        + db.exec("INSERT INTO t (id, v) VALUES (101, 0)").await;
    ws.capture_once(&[]);
    assert_added_column_matches(&ws, &db.rows(ADDED_PG).await, 100 + before, after).await;
    target.drop().await;
    db.drop().await;
}

/// Every column type a full load reads in COPY's binary form (and those it
/// reads as text) gives the values the change stream gives as pgoutput text
/// for the same rows, with the same Arrow types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_copied_in_binary_equals_the_change_streams_text() {
    let ws = Workspace::new();
    let Some(db) = Db::new(&ws).await else { return };
    db.client
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'ok');
             CREATE TABLE kinds(id int PRIMARY KEY, s smallint, b bigint, r real, d double precision,
               n numeric(12,3), nn numeric, bo bool, t text, v varchar(20), c char(5), nm name, by bytea,
               dt date, ts timestamp, tz timestamptz, u uuid, j json, jb jsonb, a int[], iv interval,
               tm time, e mood);
             INSERT INTO kinds VALUES
               (1, -32768, -9223372036854775808, 1.5, -2.25e100, -123456789.125, 1e-20, true,
                'tab\there, \"q\"', 'ü', 'ab', 'a name', '\\x00ff10', '0001-01-01', '1999-12-31 23:59:59.999999',
                '2038-01-19 03:14:07.5+02', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"k\": [1, 2]}',
                '{\"k\": [1, 2]}', '{1,NULL,3}', '1 day 02:03:04', '23:59:59.5', 'ok'),
               (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                NULL, NULL, NULL, NULL, NULL, NULL, NULL),
               (3, 32767, 9223372036854775807, 0, 0, 0, 0, false, '', '', '', '', '\\x', '9999-12-31',
                '1970-01-01 00:00:00', '1970-01-01 00:00:00+00', '00000000-0000-0000-0000-000000000000',
                '[]', '[]', '{}', '0', '00:00', 'sad');
             INSERT INTO kinds(id, s, b, d, n, t, dt, ts, tz)
               SELECT 100 + g, g * -97, g * -9876543210123, g / -7.0, g * -1234.567, repeat('é', g),
                 date '1999-01-01' + g * 37, timestamp '2001-02-03 04:05:06' + g * interval '1234567 microseconds',
                 timestamptz '1999-12-31 23:00:00.25+00' + g * interval '86399 seconds'
               FROM generate_series(1, 200) g;",
        )
        .await
        .unwrap();
    write_configs(&ws, &db, "", &[("kinds", "\"id\"")]);
    let text = ws.capture_once(&[]);
    assert!(text.contains("captured 203 changes"), "{text}");
    // The same rows again, from the change stream: an update of each row.
    assert_eq!(db.exec("UPDATE kinds SET id = id").await, 203);
    let text = ws.capture_once(&[]);
    assert!(text.contains("captured 203 changes"), "{text}");
    let objects = ws.path("objects");
    let loaded = object_rows(&objects, "kinds", |name| name.starts_with("LOAD"));
    let changed = object_rows(&objects, "kinds", |name| !name.starts_with("LOAD"));
    assert_eq!(loaded.1.len(), 203);
    assert_same_objects((&loaded.0, &loaded.1), (&changed.0, &changed.1));
    db.drop().await;
}

/// A table of more rows than one session copies is copied in key ranges by
/// sessions side by side, each row once; objects an interrupted load left
/// under any number are deleted first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_table_is_copied_in_key_ranges_each_row_once() {
    let ws = Workspace::new();
    let Some(db) = Db::new(&ws).await else { return };
    db.client
        .batch_execute(
            "CREATE TABLE t (id bigint PRIMARY KEY, v int);
             CREATE TABLE empty (id bigint PRIMARY KEY);
             INSERT INTO t SELECT g, g % 1000 FROM generate_series(-700000, 700000) g
               WHERE g NOT BETWEEN 1000 AND 300000;
             ANALYZE t;",
        )
        .await
        .unwrap();
    write_configs(
        &ws,
        &db,
        "parallel_load = 3",
        &[("t", "\"id\""), ("empty", "\"id\"")],
    );
    let config = std::fs::read_to_string(ws.path("capture.toml")).unwrap();
    std::fs::write(
        ws.path("capture.toml"),
        config.replace("max_rows = 150", "max_rows = 200000"),
    )
    .unwrap();
    // What an interrupted load with other numbers left.
    let stale = ws.path("objects/public/t/LOAD99999999.parquet");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"not parquet").unwrap();
    let text = ws.capture_once(&[("RUST_LOG", "cdcflow=info"), ("NO_COLOR", "1")]);
    let rows = db.rows("SELECT count(*)::text FROM t").await[0][0]
        .clone()
        .unwrap();
    assert!(text.contains(&format!("captured {rows} changes")), "{text}");
    assert!(
        text.contains("tables=2 parts=3"),
        "t in two key ranges:\n{text}"
    );
    assert!(!stale.exists(), "the interrupted load's object is deleted");
    assert!(
        ws.path("objects/public/empty/LOAD00000001.parquet")
            .exists(),
        "an empty table has its one empty object"
    );
    let out = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(
        ws.text_rows(
            "SELECT CAST(count(*) AS VARCHAR), CAST(sum(id) AS VARCHAR), CAST(sum(v) AS VARCHAR), \
             CAST(count(DISTINCT id) AS VARCHAR) FROM t"
        )
        .await,
        db.rows(
            "SELECT count(*)::text, sum(id)::text, sum(v)::text, count(DISTINCT id)::text FROM t"
        )
        .await
    );
    assert_eq!(
        count(&ws, "SELECT count(*) FROM t_history")
            .await
            .to_string(),
        rows,
        "each row once in history"
    );
    assert_eq!(count(&ws, "SELECT count(*) FROM empty").await, 0);
    db.drop().await;
}
