//! Sessions with the server (TLS, one text form for values, errors mapped to
//! their kind), what the server must be set to, and the publication and
//! slot capture reads.

use tokio_postgres::Client;

use super::{PgSettings, PgSource, Relations};
use crate::capture::sink::Sink;
use crate::error::{Error, Result};

impl PgSource {
    /// Connects and sets the session so values come out in one text form
    /// (UTC timestamps, ISO dates, hex bytea, exact floats).
    pub async fn connect(settings: PgSettings) -> Result<PgSource> {
        let client = connect(&settings).await?;
        let catalog = connect(&settings).await?;
        Ok(PgSource {
            settings,
            client,
            catalog,
            seen: None,
            passed: false,
            end: None,
            relations: Relations::new(),
        })
    }

    /// Checks `wal_level` and creates the publication and slot when missing.
    /// Returns whether the slot was created now.
    pub(super) async fn prepare(&self, sink: &Sink) -> Result<bool> {
        let c = &self.client;
        let level: String = c
            .query_one("SHOW wal_level", &[])
            .await
            .map_err(pg("reading wal_level"))?
            .get(0);
        if level != "logical" {
            return Err(Error::capture(
                "checking the server",
                format!(
                    "wal_level is {level}; logical replication needs wal_level = logical \
                     (postgresql.conf, then restart; on RDS set rds.logical_replication = 1)"
                ),
            ));
        }
        let s = &self.settings;
        let has_pub = c
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&s.publication],
            )
            .await
            .map_err(pg("looking up the publication"))?
            .is_some();
        if !has_pub {
            let tables = c
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_tables \
                     WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
                    &[],
                )
                .await
                .map_err(pg("listing tables"))?;
            let selected: Vec<String> = tables
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .filter(|(sch, t)| sink.mapping().selects(sch, t))
                .map(|(sch, t)| format!("{}.{}", quote(&sch), quote(&t)))
                .collect();
            if selected.is_empty() {
                return Err(Error::capture(
                    "creating the publication",
                    "no table matches the selection rules",
                ));
            }
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote(&s.publication),
                selected.join(", ")
            );
            c.batch_execute(&sql)
                .await
                .map_err(pg(format!("creating publication {}", s.publication)))?;
            tracing::info!(publication = %s.publication, tables = selected.len(), "created the publication");
        }
        let has_slot = c
            .query_opt(
                "SELECT plugin FROM pg_replication_slots WHERE slot_name = $1",
                &[&s.slot],
            )
            .await
            .map_err(pg("looking up the slot"))?;
        match has_slot {
            Some(row) => {
                let plugin: Option<String> = row.get(0);
                if plugin.as_deref() != Some("pgoutput") {
                    return Err(Error::capture(
                        format!("slot {}", s.slot),
                        format!(
                            "it uses plugin {plugin:?}; cdcflow needs a pgoutput slot: choose another `slot` name"
                        ),
                    ));
                }
                Ok(false)
            }
            None => {
                c.query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&s.slot],
                )
                .await
                .map_err(pg(format!("creating slot {}", s.slot)))?;
                tracing::info!(slot = %s.slot, "created the replication slot");
                Ok(true)
            }
        }
    }

    /// Waits until no other session uses the slot: after a crash the old
    /// session can hold it for a moment; a live one is another capture.
    pub(super) async fn wait_for_slot(&self) -> Result<()> {
        const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
        let started = std::time::Instant::now();
        loop {
            let pid: Option<i32> = self
                .catalog
                .query_opt(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&self.settings.slot],
                )
                .await
                .map_err(pg("reading the slot"))?
                .map(|r| r.get(0));
            let Some(pid) = pid else { return Ok(()) };
            if started.elapsed() > WAIT {
                return Err(Error::capture(
                    format!("slot {}", self.settings.slot),
                    format!(
                        "in use by server process {pid} for {} s: another capture runs on this slot \
                         (one process per slot), or stop that session with pg_terminate_backend({pid})",
                        WAIT.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

pub(super) fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
    let context = context.into();
    move |e| crate::database::Failure::from(e).capture(context)
}

pub(super) async fn connect(settings: &PgSettings) -> Result<Client> {
    crate::database::postgres(&settings.url, &settings.tls)
        .await
        .map_err(|f| {
            f.capture(format!(
                "connecting to {}",
                crate::tls::redact_url(&settings.url)
            ))
        })
}

pub(super) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}
