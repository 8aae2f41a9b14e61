//! The README's database walkthroughs, end to end against real servers:
//! capture → objects → pipeline into a database replica → `verify`.

use mysql_async::prelude::Queryable;

use crate::database::Target;
use crate::support::{Workspace, output, peer, pg_connect, pg_database};

/// `cdcflow verify`: (exit code 0, output).
fn verify(ws: &Workspace, env: &[(&str, &str)]) -> (bool, String) {
    let out = ws.cdcflow(
        &[
            "verify",
            "--capture",
            "capture.toml",
            "--pipeline",
            "pipeline.toml",
        ],
        env,
    );
    (out.status.success(), output(&out))
}

/// Writes `capture.toml` (source `[source]` keys `source`, objects into
/// `objects/`, then `after` such as masks) and `pipeline.toml` over the
/// objects into `warehouse`, with `tables` as `(schema, name, key list)`.
fn write_configs(
    ws: &Workspace,
    source: &str,
    after: &str,
    warehouse: &str,
    tables: &[(&str, &str, &str)],
) {
    let objects = ws.path("objects");
    std::fs::write(
        ws.path("capture.toml"),
        format!(
            "name = \"walk\"\n[source]\n{source}\n[target]\nurl = \"file://{}\"\nmax_rows = 120\n{after}",
            objects.display()
        ),
    )
    .unwrap();
    let mut pipeline = format!(
        "name = \"walk\"\n[source]\nurl = \"file://{}\"\ntimestamp_column = \"dms_timestamp\"\n\
         extra_columns = [\"cdc_seq\"]\nsequence_column = \"cdc_seq\"\n\
         [state]\nurl = \"sqlite://{}\"\n[warehouse]\n{warehouse}\n",
        objects.display(),
        ws.path("state.db").display(),
    );
    for (schema, name, key) in tables {
        pipeline.push_str(&format!(
            "[[tables]]\nschema = \"{schema}\"\nname = \"{name}\"\nprimary_key = [{key}]\n"
        ));
    }
    std::fs::write(ws.path("pipeline.toml"), pipeline).unwrap();
}

/// The `[source]` keys of a PostgreSQL capture of the database `name` at `url`
/// (slot and publication named after it).
fn pg_source(url: &str, name: &str) -> String {
    format!("url = \"{url}\"\nslot = \"{name}\"\npublication = \"{name}\"")
}

/// Drops the source database `name` made by `pg_database`, with its slot.
async fn drop_source(admin: &tokio_postgres::Client, name: &str) {
    admin
        .batch_execute(&format!("SELECT pg_drop_replication_slot('{name}')"))
        .await
        .unwrap();
    crate::support::drop_pg_database(admin, name).await;
}

fn run(ws: &Workspace) {
    let out = ws.cdcflow(&["run", "--now", "--pipeline", "pipeline.toml"], &[]);
    assert!(out.status.success(), "{}", output(&out));
}

/// Migration: a MariaDB database moved to another by a full load and CDC,
/// with a workload running throughout and the capture killed in the
/// middle; `verify` says equal after the last capture, and finds a row
/// changed on the target behind cdcflow's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_migration_with_a_workload_a_killed_capture_and_verify() {
    let ws = Workspace::new();
    let Some(base) = peer("CDCFLOW_TEST_MYSQL_URL") else {
        return;
    };
    let Some(target) = Target::mysql(&ws).await else {
        return;
    };
    let source_db = ws.unique_name("src_", '_');
    let mut admin = mysql_async::Conn::new(mysql_async::Opts::from_url(&base).unwrap())
        .await
        .unwrap();
    admin
        .query_drop(format!("CREATE DATABASE {source_db}"))
        .await
        .unwrap();
    let source_url = format!("{base}/{source_db}");
    let mut db = mysql_async::Conn::new(mysql_async::Opts::from_url(&source_url).unwrap())
        .await
        .unwrap();
    db.query_drop(
        "CREATE TABLE accounts(id bigint AUTO_INCREMENT PRIMARY KEY, owner varchar(100), \
           balance decimal(14,2), opened datetime(6), note text, flags tinyint unsigned);
         CREATE TABLE entries(account_id bigint, n int, amount decimal(14,2), memo text, \
           PRIMARY KEY (account_id, n));
         INSERT INTO accounts(owner, balance, opened, note, flags)
           SELECT CONCAT('owner ', seq), seq * 1.25, '2024-01-01 00:00:00' + INTERVAL seq MINUTE,
                  IF(seq % 7 = 0, NULL, CONCAT('it''s ', seq)), seq % 256 FROM seq_1_to_400;
         INSERT INTO entries SELECT seq DIV 4 + 1, seq % 4, seq / 8, 'opening' FROM seq_0_to_799;",
    )
    .await
    .unwrap();
    static NEXT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(7000);
    let server_id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    write_configs(
        &ws,
        &format!("url = \"{source_url}\"\nserver_id = {server_id}\nmax_changes = 50"),
        "",
        &target.warehouse("replica"),
        &[
            (&source_db, "accounts", "\"id\""),
            (&source_db, "entries", "\"account_id\", \"n\""),
        ],
    );

    // The workload: inserts, updates and deletes on both tables until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = {
        let stop = stop.clone();
        let url = source_url.clone();
        tokio::spawn(async move {
            let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&url).unwrap())
                .await
                .unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let sql = match i % 4 {
                    0 => format!(
                        "INSERT INTO accounts(owner, balance, opened) VALUES ('new {i}', {i}.5, NOW(6))"
                    ),
                    1 => format!(
                        "UPDATE accounts SET balance = balance + 1, note = 'w{i}' WHERE id % 13 = {}",
                        i % 13
                    ),
                    2 => format!(
                        "INSERT INTO entries VALUES ({}, {}, 1.10, 'w')",
                        i % 400 + 1,
                        100 + i
                    ),
                    _ => format!(
                        "DELETE FROM entries WHERE account_id = {} AND n < 2",
                        i % 400 + 1
                    ),
                };
                conn.query_drop(sql).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            i
        })
    };
    ws.capture_once(&[]);
    run(&ws);
    ws.capture_crashing_at("capture.after_first_object@1");
    run(&ws);
    ws.capture_once(&[]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statements = workload.await.unwrap();
    assert!(
        statements > 20,
        "the workload ran ({statements} statements)"
    );
    ws.capture_once(&[]);
    run(&ws);

    let (equal, text) = verify(&ws, &[]);
    assert!(equal, "verify after the last capture:\n{text}");
    assert!(
        text.contains("accounts: equal") && text.contains("entries: equal"),
        "{text}"
    );

    // A change behind cdcflow's back is found and named.
    let Target::My { url, .. } = &target else {
        unreachable!()
    };
    let mut target_conn = mysql_async::Conn::new(mysql_async::Opts::from_url(url).unwrap())
        .await
        .unwrap();
    target_conn
        .query_drop("UPDATE accounts SET owner = 'tampered' WHERE id = 42")
        .await
        .unwrap();
    let (equal, text) = verify(&ws, &[]);
    assert!(!equal, "verify missed a changed row:\n{text}");
    assert!(
        text.contains("accounts: DIFFERENT")
            && text.contains("key id=42")
            && text.contains("owner=tampered"),
        "{text}"
    );
    assert!(text.contains("entries: equal"), "{text}");
    drop(target_conn);
    let _ = admin.query_drop(format!("DROP DATABASE {source_db}")).await;
    target.drop().await;
}

/// A masked developer copy, kept current by CDC, which is also a reverse
/// sync's shape: PostgreSQL → capture (e-mail hashed, name redacted,
/// tables renamed and upper-cased by DMS rules) → a PostgreSQL replica
/// whose schema the operator made, with foreign keys and a serial column.
/// The foreign keys hold at the end, the sequence is past the loaded ids,
/// and `verify` says equal (comparing masked values).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_postgres_copy_keeps_foreign_keys_and_verifies_equal() {
    let ws = Workspace::new();
    let Some((admin, name, url)) = pg_database("CDCFLOW_TEST_PG_URL", &ws, "dev_").await else {
        return;
    };
    let Some(target) = Target::postgres(&ws).await else {
        return;
    };
    let source = pg_connect(&url).await;
    source
        .batch_execute(
            "CREATE TABLE customers(id serial PRIMARY KEY, email text, name text, tier int);
             CREATE TABLE orders(id bigint PRIMARY KEY, customer_id int REFERENCES customers(id), total numeric(10,2));
             INSERT INTO customers(email, name, tier) SELECT 'u' || g || '@example.com', 'Name ' || g, g % 3 FROM generate_series(1, 200) g;
             INSERT INTO orders SELECT g, g % 200 + 1, g * 0.5 FROM generate_series(1, 600) g;",
        )
        .await
        .unwrap();
    // The developer schema: renamed, upper-cased tables with their keys.
    let Target::Pg {
        schema,
        url: target_url,
        ..
    } = &target
    else {
        unreachable!()
    };
    let dev = pg_connect(target_url).await;
    dev.batch_execute(&format!(
        "CREATE TABLE {schema}.\"DEV_CUSTOMERS\"(id serial PRIMARY KEY, email text, name text, tier int);
         CREATE TABLE {schema}.\"DEV_ORDERS\"(id bigint PRIMARY KEY,
           customer_id int REFERENCES {schema}.\"DEV_CUSTOMERS\"(id), total numeric(10,2));"
    ))
    .await
    .unwrap();
    let rules = r#"{"rules": [
        {"rule-type": "selection", "rule-id": "1", "rule-name": "1",
         "object-locator": {"schema-name": "public", "table-name": "%"}, "rule-action": "include"},
        {"rule-type": "transformation", "rule-id": "2", "rule-name": "2", "rule-target": "table",
         "object-locator": {"schema-name": "public", "table-name": "%"}, "rule-action": "add-prefix", "value": "dev_"},
        {"rule-type": "transformation", "rule-id": "3", "rule-name": "3", "rule-target": "table",
         "object-locator": {"schema-name": "public", "table-name": "%"}, "rule-action": "convert-uppercase"}]}"#;
    std::fs::write(ws.path("rules.json"), rules).unwrap();
    write_configs(
        &ws,
        &format!(
            "{}\nrules = \"{}\"",
            pg_source(&url, &name),
            ws.path("rules.json").display()
        ),
        "[[masking]]\ntable = \"public.customers\"\ncolumn = \"email\"\nmethod = \"hash\"\nsalt_env = \"DEV_SALT\"\n\
         [[masking]]\ntable = \"public.customers\"\ncolumn = \"name\"\nmethod = \"redact\"\n",
        &target.warehouse("replica"),
        &[
            ("public", "DEV_CUSTOMERS", "\"id\""),
            ("public", "DEV_ORDERS", "\"id\""),
        ],
    );
    let salt = [("DEV_SALT", "pepper")];
    ws.capture_once(&salt);
    run(&ws);
    // Changes that a foreign key orders: a new customer and its orders, an
    // order moved, a customer deleted after its orders.
    source
        .batch_execute(
            "INSERT INTO customers(email, name, tier) VALUES ('new@example.com', 'New', 1);
             INSERT INTO orders VALUES (1001, 201, 9.99), (1002, 201, 1.01);
             UPDATE orders SET customer_id = 201 WHERE id = 5;
             DELETE FROM orders WHERE customer_id = 7;
             DELETE FROM customers WHERE id = 7;
             UPDATE customers SET email = 'changed@example.com', tier = 9 WHERE id = 3;",
        )
        .await
        .unwrap();
    ws.capture_once(&salt);
    run(&ws);

    let count = |sql: String| {
        let dev = &dev;
        async move { dev.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM {schema}.\"DEV_ORDERS\" o LEFT JOIN {schema}.\"DEV_CUSTOMERS\" c \
             ON c.id = o.customer_id WHERE c.id IS NULL"
        ))
        .await,
        0,
        "an order without its customer"
    );
    assert_eq!(
        count(format!("SELECT count(*) FROM {schema}.\"DEV_ORDERS\"")).await,
        600 - 3 + 2
    );
    let masked = dev
        .query_one(
            &format!("SELECT email, name FROM {schema}.\"DEV_CUSTOMERS\" WHERE id = 3"),
            &[],
        )
        .await
        .unwrap();
    let (email, redacted): (String, Option<String>) = (masked.get(0), masked.get(1));
    assert!(
        !email.contains("example.com") && !email.is_empty(),
        "{email}"
    );
    assert_ne!(redacted.as_deref(), Some("Name 3"), "the name is redacted");
    // The sequence is past the loaded ids: the application's next insert works.
    let next: i32 = dev
        .query_one(
            &format!("INSERT INTO {schema}.\"DEV_CUSTOMERS\"(email) VALUES ('dev') RETURNING id"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(next > 201, "the sequence was not moved: next id {next}");
    dev.batch_execute(&format!(
        "DELETE FROM {schema}.\"DEV_CUSTOMERS\" WHERE id = {next}"
    ))
    .await
    .unwrap();

    let (equal, text) = verify(&ws, &salt);
    assert!(equal, "{text}");
    assert!(
        text.contains("DEV_CUSTOMERS: equal") && text.contains("DEV_ORDERS: equal"),
        "{text}"
    );
    drop(source);
    target.drop().await;
    drop_source(&admin, &name).await;
}

/// Reverse sync: the changes of the new PostgreSQL database flow back into
/// the legacy one under its names, by DMS rules (a table renamed, columns
/// renamed and upper-cased); the replica's tables are created by cdcflow; a
/// load killed inside its transaction is applied once by the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reverse_sync_with_rename_and_uppercase_rules() {
    let ws = Workspace::new();
    let Some((admin, name, url)) = pg_database("CDCFLOW_TEST_PG_URL", &ws, "new_").await else {
        return;
    };
    let Some(target) = Target::postgres(&ws).await else {
        return;
    };
    let source = pg_connect(&url).await;
    source
        .batch_execute(
            "CREATE TABLE accounts(id bigint PRIMARY KEY, full_name text, email text, balance numeric(12,2), seen timestamptz);
             INSERT INTO accounts SELECT g, 'User ' || g, 'u' || g || '@example.com', g * 1.5,
               timestamptz '2024-05-01 00:00:00+00' + g * interval '1 minute' FROM generate_series(1, 300) g;",
        )
        .await
        .unwrap();
    let rules = r#"{"rules": [
        {"rule-type": "selection", "rule-id": "1", "rule-name": "1",
         "object-locator": {"schema-name": "public", "table-name": "accounts"}, "rule-action": "include"},
        {"rule-type": "transformation", "rule-id": "2", "rule-name": "2", "rule-target": "table",
         "object-locator": {"schema-name": "public", "table-name": "accounts"}, "rule-action": "rename", "value": "legacy_users"},
        {"rule-type": "transformation", "rule-id": "3", "rule-name": "3", "rule-target": "column",
         "object-locator": {"schema-name": "public", "table-name": "accounts", "column-name": "full_name"}, "rule-action": "rename", "value": "name"},
        {"rule-type": "transformation", "rule-id": "4", "rule-name": "4", "rule-target": "column",
         "object-locator": {"schema-name": "%", "table-name": "%", "column-name": "%"}, "rule-action": "convert-uppercase"}]}"#;
    std::fs::write(ws.path("rules.json"), rules).unwrap();
    write_configs(
        &ws,
        &format!(
            "{}\nrules = \"{}\"",
            pg_source(&url, &name),
            ws.path("rules.json").display()
        ),
        "",
        &target.warehouse("replica"),
        &[("public", "legacy_users", "\"ID\"")],
    );
    ws.capture_once(&[]);
    run(&ws);
    source
        .batch_execute(
            "UPDATE accounts SET balance = balance + 10, full_name = full_name || ' Jr.' WHERE id % 10 = 0;
             DELETE FROM accounts WHERE id > 290;
             INSERT INTO accounts VALUES (1000, 'Late Comer', NULL, 0.01, NULL);",
        )
        .await
        .unwrap();
    ws.capture_once(&[]);
    let killed = ws.cdcflow(
        &["run", "--now", "--pipeline", "pipeline.toml"],
        &[("CDCFLOW_FAILPOINT", "load.before_database_commit")],
    );
    assert!(!killed.status.success(), "{}", output(&killed));
    run(&ws);

    let Target::Pg {
        schema,
        url: target_url,
        ..
    } = &target
    else {
        unreachable!()
    };
    let legacy = pg_connect(target_url).await;
    let row = legacy
        .query_one(
            &format!(
                "SELECT count(*), sum(\"BALANCE\")::text, max(\"NAME\") FILTER (WHERE \"ID\" = 10) \
                 FROM {schema}.legacy_users"
            ),
            &[],
        )
        .await
        .unwrap();
    let (count, sum, renamed): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
    let expected_sum: f64 = (1..=290).map(|g| g as f64 * 1.5).sum::<f64>() + 29.0 * 10.0 + 0.01;
    assert_eq!((count, renamed.as_str()), (291, "User 10 Jr."));
    assert_eq!(sum, format!("{expected_sum:.2}"));
    let (equal, text) = verify(&ws, &[]);
    assert!(equal && text.contains("legacy_users: equal"), "{text}");
    drop((source, legacy));
    target.drop().await;
    drop_source(&admin, &name).await;
}

/// `verify` against a warehouse of another kind (the local Delta warehouse,
/// history and current tables with the added columns): equal after capture
/// and load, and a change the capture has not read yet shows as a difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_compares_a_delta_warehouse_and_finds_an_uncaptured_change() {
    let ws = Workspace::new();
    let Some((admin, name, url)) = pg_database("CDCFLOW_TEST_PG_URL", &ws, "ver_").await else {
        return;
    };
    let source = pg_connect(&url).await;
    source
        .batch_execute(
            "CREATE TABLE items(sku text, shop int, price numeric(8,2), at timestamptz, raw bytea, doc jsonb,
               PRIMARY KEY (sku, shop));
             INSERT INTO items SELECT 'sku-' || g, g % 3, g / 4.0, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
               decode(lpad(to_hex(g), 4, '0'), 'hex'), jsonb_build_object('g', g, 'tags', jsonb_build_array('a', g))
               FROM generate_series(1, 2500) g;",
        )
        .await
        .unwrap();
    write_configs(
        &ws,
        &pg_source(&url, &name),
        "",
        &format!(
            "kind = \"local\"\npath = \"{}\"",
            ws.path("warehouse").display()
        ),
        &[("public", "items", "\"sku\", \"shop\"")],
    );
    ws.capture_once(&[]);
    run(&ws);
    let (equal, text) = verify(&ws, &[]);
    assert!(
        equal && text.contains("public.items: equal: source 2500 rows, target 2500 rows; 0 of 3"),
        "{text}"
    );
    source
        .batch_execute("UPDATE items SET price = 0 WHERE sku = 'sku-1777'; DELETE FROM items WHERE sku = 'sku-5'")
        .await
        .unwrap();
    let (equal, text) = verify(&ws, &[]);
    assert!(!equal, "{text}");
    assert!(
        text.contains("source 2499 rows, target 2500 rows; 2 of 3 key ranges differ")
            && text.contains("key sku=sku-1777, shop=1")
            && text.contains("price=0.00")
            && text.contains("key sku=sku-5, shop=2\n    source: (no row)"),
        "{text}"
    );
    ws.capture_once(&[]);
    run(&ws);
    let (equal, text) = verify(&ws, &[]);
    assert!(equal, "after capturing the change: {text}");
    drop(source);
    drop_source(&admin, &name).await;
}
