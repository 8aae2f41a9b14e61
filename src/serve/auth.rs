//! Who may act: a request carries the operator token as
//! `Authorization: Bearer <token>`, or the session cookie the login form
//! sets (`HttpOnly`, `SameSite=Strict`, holding a hash of the token, never
//! the token). Every action is a POST that must also carry the CSRF value
//! the pages embed in their forms (a hash of the token another site cannot
//! read), so a page elsewhere cannot make a logged-in browser act.

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{App, AppState};

const COOKIE: &str = "cdcflow_session";

fn digest(purpose: &str, token: &str) -> String {
    hex::encode(Sha256::digest(format!("cdcflow {purpose}:{token}")))
}

/// Equality whose time does not depend on where the inputs differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// A request that carries the operator token.
pub(super) struct Operator {
    /// The value the forms carry.
    pub(super) csrf: String,
}

impl App {
    /// The operator, when actions are on and the request carries the token.
    pub(super) fn operator(&self, headers: &HeaderMap) -> Option<Operator> {
        let token = self.token.as_deref()?;
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| same(t.trim(), token));
        let session = digest("session", token);
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")))
            .any(|v| same(v, &session));
        (bearer || cookie).then(|| Operator {
            csrf: digest("csrf", token),
        })
    }

    /// Why a POST must be refused (no token configured or sent, a wrong
    /// CSRF value); `None`: it may act.
    pub(super) fn refusal(&self, headers: &HeaderMap, csrf: &str) -> Option<&'static str> {
        if self.token.is_none() {
            return Some("read-only: start `cdcflow serve` with --token-env VAR to allow actions");
        }
        match self.operator(headers) {
            None => Some("log in at /login, or send Authorization: Bearer <token>"),
            Some(op) if !same(&op.csrf, csrf) => {
                Some("the form's CSRF value is missing or wrong: reload the page and try again")
            }
            Some(_) => None,
        }
    }
}

pub(super) async fn login_form() -> Response {
    super::ui::page(
        "Log in",
        "<form method=\"post\" action=\"/login\"><label>Operator token: \
         <input type=\"password\" name=\"token\"></label> <button>Log in</button></form>",
    )
    .into_response()
}

#[derive(Deserialize)]
pub(super) struct Login {
    token: String,
}

pub(super) async fn login(State(app): AppState, Form(login): Form<Login>) -> Response {
    match app.token.as_deref() {
        Some(token) if same(&login.token, token) => (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, "/".to_string()),
                (
                    header::SET_COOKIE,
                    format!(
                        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
                        digest("session", token)
                    ),
                ),
            ],
        )
            .into_response(),
        _ => (StatusCode::FORBIDDEN, "wrong token, or actions are off\n").into_response(),
    }
}

/// The answer to a refused action.
pub(super) fn forbidden(why: &str) -> Response {
    (StatusCode::FORBIDDEN, format!("{why}\n")).into_response()
}
