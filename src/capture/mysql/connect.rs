//! Sessions with the server (TLS, UTC), errors mapped to their kind, and
//! what the server must be set to for capture.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};

use super::stream::Position;
use super::{MySettings, MySource};
use crate::error::{Error, Result};

impl MySource {
    /// Connects and checks what capture needs, with what to fix.
    pub async fn connect(settings: MySettings) -> Result<MySource> {
        let opts = Opts::from_url(&settings.url).map_err(|e| {
            Error::capture(
                "reading source.url",
                format!("{e}; e.g. mysql://cdc@127.0.0.1:3306/shop"),
            )
        })?;
        let database = opts.db_name().map(str::to_string).ok_or_else(|| {
            Error::capture(
                "reading source.url",
                "name the database: mysql://user@host:port/<database>",
            )
        })?;
        let (mut conn, opts) = connect_with_tls(opts, &settings).await?;
        conn.query_drop("SET time_zone = '+00:00'")
            .await
            .map_err(my("setting the session time zone"))?;
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
    move |e| {
        if connection_lost(&e) {
            Error::SourceLost {
                context,
                message: e.to_string(),
            }
        } else {
            Error::capture(context, e)
        }
    }
}

/// Whether `e` is the connection failing (refused, reset, closed; the
/// server shutting down or gone) rather than the server refusing what was
/// asked. A certificate that fails its check is an I/O error too, and is not.
fn connection_lost(e: &mysql_async::Error) -> bool {
    use mysql_async::{DriverError, Error as E};
    match e {
        E::Io(io) => !io.to_string().contains("certificate"),
        E::Driver(DriverError::ConnectionClosed | DriverError::PoolDisconnected) => true,
        // Too many connections, server shutdown, connection killed, server
        // gone away, lost connection.
        E::Server(server) => matches!(server.code, 1040 | 1053 | 1927 | 2006 | 2013),
        _ => false,
    }
}

/// The first connection, with TLS as `settings.tls` says, and the options
/// that made it (used for every later connection). `prefer` falls back to
/// a plain connection when the server offers no TLS.
async fn connect_with_tls(opts: Opts, settings: &MySettings) -> Result<(Conn, Opts)> {
    use crate::tls::TlsMode;
    let tls = &settings.tls;
    let ssl = (tls.mode != TlsMode::Disable).then(|| {
        let ssl = mysql_async::SslOpts::default()
            .with_danger_accept_invalid_certs(matches!(
                tls.mode,
                TlsMode::Prefer | TlsMode::Require
            ))
            .with_danger_skip_domain_validation(tls.mode == TlsMode::VerifyCa);
        match &tls.root_cert {
            Some(ca) => ssl
                .with_root_certs(vec![ca.clone().into()])
                .with_disable_built_in_roots(true),
            None => ssl,
        }
    });
    let with = |ssl| -> Opts {
        mysql_async::OptsBuilder::from_opts(opts.clone())
            .ssl_opts(ssl)
            .into()
    };
    let fail = |e: mysql_async::Error| {
        let context = format!("connecting to {}", crate::tls::redact_url(&settings.url));
        match my(context)(e) {
            Error::Capture { context, message } => Error::capture(context, tls.explain(&message)),
            lost => lost,
        }
    };
    let opts = with(ssl);
    match Conn::new(opts.clone()).await {
        Err(mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer))
            if tls.mode == TlsMode::Prefer =>
        {
            let plain = with(None);
            let conn = Conn::new(plain.clone()).await.map_err(fail)?;
            Ok((conn, plain))
        }
        connected => Ok((connected.map_err(fail)?, opts)),
    }
}
