//! Real AWS DMS output from public repositories (testdata/dms-samples, see
//! SOURCES.md there), loaded end to end.

use cdcflow::synth::Value;

use crate::support::{Workspace, rows};

/// Copies sample files into `<source>/<schema>/<table>/` and writes a pipeline.
fn setup(
    ws: &Workspace,
    sample: &str,
    files: &[(&str, &str)],
    tables_toml: &str,
    source_toml: &str,
) {
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/dms-samples");
    for (from, to) in files {
        let dest = ws.source().join(to);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(samples.join(sample).join(from), dest).unwrap();
    }
    let text = format!(
        "name = \"samples\"\n[source]\nurl = \"file://{}\"\n{source_toml}\n[state]\nurl = \"sqlite://{}/state.db\"\n[warehouse]\nkind = \"local\"\npath = \"{}/wh\"\n{tables_toml}",
        ws.source().display(),
        ws.dir.path().display(),
        ws.dir.path().display()
    );
    std::fs::write(ws.path("pipeline.toml"), text).unwrap();
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_customers_with_quoting_and_insert_update_delete_reinsert_in_one_file() {
    let ws = Workspace::new();
    setup(
        &ws,
        "m55hr-cdc-pipeline",
        &[
            (
                "LOAD00000001.csv",
                "classicmodels/customers/LOAD00000001.csv",
            ),
            (
                "20240809-192717787.csv",
                "classicmodels/customers/2024/08/09/20240809-192717787.csv",
            ),
        ],
        r#"[[tables]]
schema = "classicmodels"
name = "customers"
primary_key = ["customerNumber"]
columns = [
  { name = "customerNumber", type = "integer" }, { name = "customerName", type = "varchar(50)" },
  { name = "contactLastName", type = "varchar(50)" }, { name = "contactFirstName", type = "varchar(50)" },
  { name = "phone", type = "varchar(50)" }, { name = "addressLine1", type = "varchar(50)" },
  { name = "addressLine2", type = "varchar(50)" }, { name = "city", type = "varchar(50)" },
  { name = "state", type = "varchar(50)" }, { name = "postalCode", type = "varchar(15)" },
  { name = "country", type = "varchar(50)" }, { name = "salesRepEmployeeNumber", type = "integer" },
  { name = "creditLimit", type = "decimal(10,2)" },
]"#,
        "",
    );
    let report = ws.run_now().await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(
        rows(&ws.query("SELECT count(*) FROM customers").await),
        vec![vec![Value::Int(123)]]
    );
    let c103 = rows(&ws.query(r#"SELECT "contactFirstName", "addressLine1", "addressLine2" FROM customers WHERE "customerNumber" = 103"#).await);
    assert_eq!(
        c103,
        vec![vec![text("Carine "), text("54, rue Royale"), Value::Null]]
    );
    let life = rows(&ws.query(r#"SELECT op, "contactLastName", is_current FROM customers_versions WHERE "customerNumber" = 497 ORDER BY change_seq"#).await);
    let ops: Vec<(Value, Value)> = life.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert_eq!(
        ops,
        vec![
            (text("I"), text("Mitesh")),
            (text("U"), text("Ruffy")),
            (text("D"), text("Ruffy")),
            (text("I"), text("Mitesh"))
        ]
    );
    assert_eq!(life[3][2], Value::Int(1));
    let now = rows(&ws.query(r#"SELECT "contactFirstName", "contactLastName" FROM customers WHERE "customerNumber" = 497"#).await);
    assert_eq!(now, vec![vec![text("Ravatka"), text("Mitesh")]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rds_users_with_many_tiny_cdc_files() {
    let ws = Workspace::new();
    let names = [
        "LOAD00000001.csv",
        "20211017-194324349.csv",
        "20211018-223933563.csv",
        "20211018-224657689.csv",
        "20211018-225235856.csv",
        "20211018-225959941.csv",
    ];
    let files: Vec<(&str, String)> = names
        .iter()
        .map(|n| (*n, format!("public/users/{n}")))
        .collect();
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    setup(
        &ws,
        "qiushiyan-pyspark-cdc",
        &files,
        "[[tables]]\nschema = \"public\"\nname = \"users\"\nprimary_key = [\"user_id\"]\ncolumns = [{ name = \"user_id\", type = \"bigint\" }, { name = \"name\", type = \"text\" }, { name = \"city\", type = \"text\" }, { name = \"last_login\", type = \"date\" }]",
        "",
    );
    assert!(ws.run_now().await.ok());
    assert_eq!(
        rows(&ws.query("SELECT count(*) FROM users").await),
        vec![vec![Value::Int(110)]]
    );
    assert_eq!(
        rows(&ws.query("SELECT city FROM users WHERE user_id = 8").await),
        vec![vec![text("Denver")]]
    );
    assert_eq!(
        rows(&ws.query("SELECT name FROM users WHERE user_id = 8").await),
        vec![vec![text("Kevin Durant")]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_employees_with_header_rows() {
    let ws = Workspace::new();
    setup(
        &ws,
        "dhawalkp-datalake",
        &[
            ("LOAD00000001.csv", "HR/EMPLOYEES/LOAD00000001.csv"),
            (
                "20190118-184518184.csv",
                "HR/EMPLOYEES/20190118-184518184.csv",
            ),
        ],
        r#"[[tables]]
schema = "HR"
name = "EMPLOYEES"
target = "employees"
primary_key = ["EMPLOYEE_ID"]
columns = [
  { name = "EMPLOYEE_ID", type = "bigint" }, { name = "FIRST_NAME", type = "varchar(20)" },
  { name = "LAST_NAME", type = "varchar(25)" }, { name = "EMAIL", type = "varchar(25)" },
  { name = "PHONE_NUMBER", type = "varchar(20)" }, { name = "HIRE_DATE", type = "date" },
  { name = "JOB_ID", type = "varchar(10)" }, { name = "SALARY", type = "decimal(8,2)" },
  { name = "COMMISSION_PCT", type = "decimal(2,2)" }, { name = "MANAGER_ID", type = "bigint" },
  { name = "DEPARTMENT_ID", type = "bigint" },
]"#,
        "[source.csv]\nheader = true",
    );
    let report = ws.run_now().await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.tables[0].stats.updates, 17);
    let row = rows(&ws.query(r#"SELECT "LAST_NAME", "SALARY", "COMMISSION_PCT" FROM employees WHERE "EMPLOYEE_ID" = 321"#).await);
    assert_eq!(
        row,
        vec![vec![
            text("Gietzupd2"),
            Value::Decimal(830_000),
            Value::Null
        ]]
    );
    assert_eq!(
        rows(
            &ws.query(r#"SELECT "FIRST_NAME" FROM employees WHERE "EMPLOYEE_ID" = 100"#)
                .await
        ),
        vec![vec![text("Steven")]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_parquet_full_load_with_types_from_the_file() {
    let ws = Workspace::new();
    setup(
        &ws,
        "",
        &[(
            "segmentio-parquet-go__dms_test_table_LOAD00000001.parquet",
            "public/dms_test_table/LOAD00000001.parquet",
        )],
        "[[tables]]\nschema = \"public\"\nname = \"dms_test_table\"\nprimary_key = [\"id\"]",
        "timestamp_column = \"DMS_TIMESTAMP\"",
    );
    assert!(ws.run_now().await.ok());
    let got = rows(
        &ws.query("SELECT count(*), sum(CASE WHEN my_bool THEN 1 ELSE 0 END) FROM dms_test_table")
            .await,
    );
    assert_eq!(got[0][0], Value::Int(10));
    let first = rows(&ws.query("SELECT my_numeric, my_money, my_uuid, commit_ts FROM dms_test_table_history WHERE id = 1").await);
    assert_eq!(first[0][0], Value::Decimal(142_713_184_759));
    assert_eq!(first[0][1], Value::Decimal(476_329_697_585_400));
    assert_eq!(first[0][2], text("181e9c5d-9b55-4535-8c6e-6c8c1234b807"));
    // DMS_TIMESTAMP '2022-07-26 06:46:18.616807' becomes commit_ts
    assert_eq!(first[0][3], Value::Micros(1_658_817_978_616_807));
}
