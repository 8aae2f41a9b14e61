//! Databases as capture's sources, the database warehouse and `verify` reach
//! them: a URL with the password from the environment and the TLS
//! parameters taken out ([`Endpoint`]), and sessions set to one text form
//! for values (UTC, ISO dates, hex bytes).

use mysql_async::prelude::Queryable;
use tokio_postgres::Client;

use crate::tls::{Tls, TlsMode, redact_url};

/// The kind of server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
}

/// Where a database is and how to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// The server kind (from the URL's scheme).
    pub engine: Engine,
    /// The URL with the password, without the TLS parameters
    /// (`mariadb://` is written `mysql://`).
    pub url: String,
    /// TLS as the URL's parameters set it.
    pub tls: Tls,
}

impl Endpoint {
    /// Reads `url` (`postgres://…` or `mysql://…`/`mariadb://…`); a URL
    /// without a password takes it from the environment variable
    /// `password_env` (default `PGPASSWORD` or `MYSQL_PWD`). Errors say what
    /// was expected.
    pub fn parse(url: &str, password_env: Option<&str>) -> Result<Endpoint, String> {
        let mysql = url.starts_with("mysql://") || url.starts_with("mariadb://");
        if !mysql && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err(format!(
                "{:?} is neither postgres://… nor mysql://…",
                redact_url(url)
            ));
        }
        let mut url = url.replacen("mariadb://", "mysql://", 1);
        let env = password_env.unwrap_or(if mysql { "MYSQL_PWD" } else { "PGPASSWORD" });
        if let Ok(password) = std::env::var(env)
            && let Ok(mut u) = url::Url::parse(&url)
            && u.password().is_none()
        {
            let _ = u.set_password(Some(&password));
            url = u.to_string();
        }
        let (url, tls) = Tls::from_url(&url, mysql)?;
        Ok(Endpoint {
            engine: if mysql {
                Engine::MySql
            } else {
                Engine::Postgres
            },
            url,
            tls,
        })
    }

    /// The URL without its password, for messages.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }

    /// The database (MySQL) or database name (PostgreSQL) the URL names.
    pub fn database(&self) -> Option<String> {
        let url = url::Url::parse(&self.url).ok()?;
        let name = url.path().trim_start_matches('/');
        (!name.is_empty()).then(|| name.to_string())
    }
}

/// A database call that failed: the message as a user should read it, and
/// whether the connection was lost (a retry may succeed) rather than the
/// server refusing what was asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The server's message (with its hint), or the driver's with its causes.
    pub message: String,
    /// The connection failed.
    pub lost: bool,
}

impl Failure {
    /// This failure as capture reports it: a lost connection restarts the
    /// run (`Error::SourceLost`), anything else waits for the operator.
    pub fn capture(self, context: impl Into<String>) -> crate::error::Error {
        let context = context.into();
        if self.lost {
            crate::error::Error::SourceLost {
                context,
                message: self.message,
            }
        } else {
            crate::error::Error::capture(context, self.message)
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure {
            lost: crate::error::postgres_connection_lost(&e),
            message: crate::error::postgres_message(&e),
        }
    }
}

impl From<mysql_async::Error> for Failure {
    fn from(e: mysql_async::Error) -> Self {
        Failure {
            lost: mysql_connection_lost(&e),
            message: e.to_string(),
        }
    }
}

/// Whether `e` is the connection failing (refused, reset, closed; the
/// server shutting down or gone) rather than the server refusing what was
/// asked. A certificate that fails its check is an I/O error too, and is not.
pub fn mysql_connection_lost(e: &mysql_async::Error) -> bool {
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

/// A PostgreSQL session whose values come out in one text form (UTC
/// timestamps, ISO dates, hex bytea, exact floats).
pub async fn postgres(url: &str, tls: &Tls) -> Result<Client, Failure> {
    let mut config: tokio_postgres::Config = url.parse().map_err(Failure::from)?;
    let connector = tls.postgres(&mut config).map_err(|e| Failure {
        message: e.to_string(),
        lost: false,
    })?;
    let (client, connection) = config.connect(connector).await.map_err(|e| {
        let failure = Failure::from(e);
        Failure {
            message: tls.explain(&failure.message),
            ..failure
        }
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("PostgreSQL connection closed: {e}");
        }
    });
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET bytea_output = 'hex'; \
             SET extra_float_digits = 3; SET IntervalStyle = 'iso_8601'",
        )
        .await?;
    Ok(client)
}

/// A MySQL / MariaDB session in UTC, with TLS as `tls` says, and the options
/// that made it (for later sessions). `prefer` falls back to a plain
/// connection when the server offers no TLS.
pub async fn mysql(
    url: &str,
    tls: &Tls,
) -> Result<(mysql_async::Conn, mysql_async::Opts), Failure> {
    use mysql_async::{Conn, Opts};
    // mysql_async's rustls takes the process's provider: ring, as everywhere
    // (installed here too for the library used without the binary's main).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let opts = Opts::from_url(url).map_err(|e| Failure {
        message: format!("{e}; e.g. mysql://cdc@127.0.0.1:3306/shop"),
        lost: false,
    })?;
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
        let failure = Failure::from(e);
        Failure {
            message: tls.explain(&failure.message),
            ..failure
        }
    };
    let opts = with(ssl);
    let (mut conn, opts) = match Conn::new(opts.clone()).await {
        Err(mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer))
            if tls.mode == TlsMode::Prefer =>
        {
            let plain = with(None);
            (Conn::new(plain.clone()).await.map_err(fail)?, plain)
        }
        connected => (connected.map_err(fail)?, opts),
    };
    conn.query_drop("SET time_zone = '+00:00'").await?;
    Ok((conn, opts))
}
