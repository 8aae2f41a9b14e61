//! The HTTP endpoints of `cdcflow serve` and `cdcflow schedule --listen`:
//! - `/` and below: the web UI ([`ui`]);
//! - `/metrics`: Prometheus / OpenMetrics text, computed at each scrape from
//!   the pipelines' state stores and a listing of each table's source prefix
//!   (see [`metrics`]): the same truth `cdcflow status` prints, whichever
//!   process (or how many) serves it, and counters that survive restarts;
//! - `/healthz`: the process answers (a liveness probe);
//! - `/readyz`: every pipeline's state store answers (a readiness probe);
//!   503 with the reason otherwise.
//!
//! Read-only unless an operator token is configured: then the UI also
//! skips or retries a quarantined object and starts a run, for requests
//! that carry the token ([`auth`]).

mod auth;
mod metrics;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::capture::Capture;
use crate::config::Pipeline;
use crate::error::{Error, Result};
use crate::pipeline::Runner;
use crate::shutdown::Shutdown;

/// What every request handler shares.
pub(super) struct App {
    runners: Vec<Runner>,
    /// Captures whose checkpoint and lag are shown.
    captures: Vec<Capture>,
    /// The operator token; `None`: read-only.
    token: Option<String>,
}

impl App {
    /// The runner of pipeline `name`.
    fn runner(&self, name: &str) -> Option<&Runner> {
        self.runners.iter().find(|r| r.pipeline().name == name)
    }
}

type AppState = State<Arc<App>>;

/// A bound listener and the pipelines it reports on.
pub struct Server {
    listener: tokio::net::TcpListener,
    app: Arc<App>,
}

impl Server {
    /// Opens every pipeline (its state store and source) and binds `listen`
    /// (port 0: any free port; see [`Server::addr`]). With `token`, requests
    /// that carry it may act (skip, retry, run); without, all is read-only.
    pub async fn bind(
        pipelines: Vec<Pipeline>,
        captures: Vec<Capture>,
        listen: SocketAddr,
        token: Option<String>,
    ) -> Result<Server> {
        let runners = pipelines
            .into_iter()
            .map(Runner::open)
            .collect::<Result<Vec<_>>>()?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| Error::io("cannot listen", listen, e))?;
        Ok(Server {
            listener,
            app: Arc::new(App {
                runners,
                captures,
                token,
            }),
        })
    }

    /// The address bound.
    pub fn addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("cannot read the listening address", "", e))
    }

    /// Answers requests until `shutdown` is requested.
    pub async fn run(self, shutdown: Shutdown) -> Result<()> {
        let addr = self.addr()?;
        let app = Router::new()
            .route("/", get(ui::overview))
            .route("/pipelines/{pipeline}/runs", get(ui::runs))
            .route("/pipelines/{pipeline}/tables/{table}", get(ui::table_page))
            .route(
                "/pipelines/{pipeline}/runs/{run}/tables/{table}",
                get(ui::attempts_page),
            )
            .route(
                "/pipelines/{pipeline}/tables/{table}/history",
                get(ui::history),
            )
            .route(
                "/pipelines/{pipeline}/tables/{table}/{action}",
                post(ui::act),
            )
            .route("/pipelines/{pipeline}/run", post(ui::run_now))
            .route("/captures/{capture}", get(ui::capture_page))
            .route("/login", get(auth::login_form).post(auth::login))
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(self.app);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
            .map_err(|e| Error::io("serving HTTP", addr, e))
    }
}

async fn metrics(State(app): AppState) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics::render(&app.runners, &app.captures).await,
    )
        .into_response()
}

async fn readyz(State(app): AppState) -> Response {
    for runner in &app.runners {
        if let Err(err) = runner.state().last_tick() {
            let name = &runner.pipeline().name;
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("pipeline {name}: the state store does not answer: {err}\n"),
            )
                .into_response();
        }
    }
    "ready\n".into_response()
}
