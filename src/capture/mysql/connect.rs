//! Sessions with the server (TLS, UTC), errors mapped to their kind, and
//! what the server must be set to for capture.

use mysql_async::prelude::Queryable;

use super::stream::Position;
use super::{MySettings, MySource};
use crate::error::{Error, Result};

impl MySource {
    /// Connects and checks what capture needs, with what to fix.
    pub async fn connect(settings: MySettings) -> Result<MySource> {
        let (mut conn, opts) = crate::database::mysql(&settings.url, &settings.tls)
            .await
            .map_err(|f| {
                f.capture(format!(
                    "connecting to {}",
                    crate::tls::redact_url(&settings.url)
                ))
            })?;
        let database = opts.db_name().map(str::to_string).ok_or_else(|| {
            Error::capture(
                "reading source.url",
                "name the database: mysql://user@host:port/<database>",
            )
        })?;
        let version: String = conn
            .query_first("SELECT VERSION()")
            .await
            .map_err(my("reading the version"))?
            .unwrap_or_default();
        let mariadb = version.to_ascii_lowercase().contains("mariadb");
        let mut source = MySource {
            settings,
            opts,
            conn,
            mariadb,
            database,
            tables: std::collections::HashMap::new(),
            reader: None,
        };
        source.check().await?;
        Ok(source)
    }

    async fn check(&mut self) -> Result<()> {
        let row: Option<(String, String, String)> = self
            .conn
            .query_first("SELECT CAST(@@log_bin AS CHAR), @@binlog_format, @@binlog_row_image")
            .await
            .map_err(my("reading the binlog settings"))?;
        let (log_bin, format, image) = row.unwrap_or_default();
        let mut problems = Vec::new();
        if log_bin != "1" && !log_bin.eq_ignore_ascii_case("on") {
            problems.push("log_bin is off: start the server with --log-bin".to_string());
        }
        if !format.eq_ignore_ascii_case("row") {
            problems.push(format!(
                "binlog_format is {format}: set binlog_format = ROW"
            ));
        }
        if !image.eq_ignore_ascii_case("full") {
            problems.push(format!(
                "binlog_row_image is {image}: set binlog_row_image = FULL"
            ));
        }
        let grants: Vec<String> = self
            .conn
            .query("SHOW GRANTS")
            .await
            .map_err(my("reading the grants"))?;
        let grants = grants.join(" ").to_ascii_uppercase();
        let all = grants.contains("ALL PRIVILEGES ON *.*");
        for needed in ["REPLICATION SLAVE", "REPLICATION CLIENT"] {
            let alias = needed.replace("REPLICATION SLAVE", "REPLICATION REPLICA");
            if !all
                && !grants.contains(needed)
                && !grants.contains(&alias)
                && !grants.contains("BINLOG MONITOR")
            {
                problems.push(format!("the user lacks {needed}: GRANT REPLICATION SLAVE, REPLICATION CLIENT, SELECT ON *.* TO …"));
            }
        }
        let expire: Option<u64> = self
            .conn
            .query_first(if self.mariadb {
                "SELECT CAST(@@expire_logs_days * 86400 AS UNSIGNED)"
            } else {
                "SELECT @@binlog_expire_logs_seconds"
            })
            .await
            .unwrap_or(None);
        if let Some(secs) = expire.filter(|&s| s > 0 && s < 86_400) {
            problems.push(format!(
                "binlogs are kept {secs} s: keep them at least a day so a stopped capture can resume"
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::capture("checking the server", problems.join("; ")))
        }
    }

    /// The server's current binlog position.
    pub async fn current_position(&mut self) -> Result<Position> {
        let row: Option<mysql_async::Row> = self
            .conn
            .query_first("SHOW MASTER STATUS")
            .await
            .map_err(my("reading the binlog position"))?;
        let row =
            row.ok_or_else(|| Error::capture("reading the binlog position", "the binlog is off"))?;
        let file: String = row.get(0).unwrap_or_default();
        let pos: u64 = row.get(1).unwrap_or_default();
        let gtid = if self.mariadb {
            self.conn
                .query_first::<String, _>("SELECT @@gtid_binlog_pos")
                .await
                .map_err(my("reading the GTID position"))?
                .filter(|g| !g.is_empty())
        } else {
            None
        };
        Ok(Position { file, pos, gtid })
    }
}

pub(super) fn my(context: impl Into<String>) -> impl FnOnce(mysql_async::Error) -> Error {
    let context = context.into();
    move |e| crate::database::Failure::from(e).capture(context)
}
