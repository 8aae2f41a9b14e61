//! The web UI: server-rendered HTML, no script. It shows what `status`,
//! `runs` and `history` print, for every pipeline of the folder.
//!
//! - `/`: per pipeline, each table's state (ok, behind, waiting for an
//!   operator, failing), lag, waiting and quarantined objects, last batch;
//!   each capture's lag behind its server and last checkpoint;
//! - `/pipelines/{p}/runs`: tables × recent runs, each try's error;
//! - `/pipelines/{p}/runs/{run}/tables/{t}`: one task's tries in a run,
//!   each with its error and the lines it logged;
//! - `/pipelines/{p}/tables/{t}`: the table's objects, figures and a key
//!   lookup;
//! - `/pipelines/{p}/tables/{t}/history?key=…`: the life of one row;
//! - `/captures/{c}`: a capture's lag, checkpoint, and the changes and
//!   objects it wrote per source table;
//! - for an operator ([`super::auth`]): POST `…/skip` and `…/retry` of a
//!   quarantined object, POST `/pipelines/{p}/run` to start a run now.

use std::fmt::Write as _;

use arrow::util::display::{ArrayFormatter, FormatOptions};
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::auth::{Operator, forbidden};
use super::{App, AppState};
use crate::config::Table;
use crate::error::{Error, Result};
use crate::pipeline::{Runner, TableStatus, humanize};
use crate::shutdown::Shutdown;
use crate::state::{CommittedBatch, RunRecord, TaskState, Trigger};

/// Text made safe for HTML.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A path segment made safe for a URL: every byte but the unreserved ones
/// percent-encoded.
fn seg(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}\
th{background:#f4f4f4}.ok{background:#d9f2d9}.behind{background:#fff3c4}\
.operator{background:#ffd9b3}.failing{background:#f8c4c4}.muted{color:#888}a{color:#0645ad}\
pre{white-space:pre-wrap;background:#f8f8f8;padding:8px}";

pub(super) fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{} · cdcflow</title>\
         <style>{STYLE}</style></head><body><p><a href=\"/\">cdcflow</a></p><h1>{}</h1>{body}</body></html>",
        esc(title),
        esc(title)
    ))
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        page("Not found", &format!("<p>{}</p>", esc(what))),
    )
        .into_response()
}

fn failed(err: &crate::error::Error) -> String {
    format!("<p class=\"failing\">{}</p>", esc(&err.to_string()))
}

/// A table's state: what an operator should know first.
fn state(status: &TableStatus, last_try: Option<TaskState>) -> (&'static str, &'static str) {
    if last_try == Some(TaskState::Failed) {
        ("failing", "failing")
    } else if !status.quarantined.is_empty() {
        ("operator", "waiting for operator")
    } else if status.waiting > 0 || status.pending_batch {
        ("behind", "behind")
    } else {
        ("ok", "ok")
    }
}

fn last_try(runs: &[RunRecord], table: &str) -> Option<TaskState> {
    runs.first()?
        .attempts
        .iter()
        .rfind(|a| a.table == table)
        .map(|a| a.state)
}

pub(super) async fn overview(State(app): AppState, headers: HeaderMap) -> Html<String> {
    let operator = app.operator(&headers);
    let mut body = String::new();
    if app.token.is_some() && operator.is_none() {
        body.push_str("<p><a href=\"/login\">log in</a> to act</p>");
    }
    for runner in &app.runners {
        let name = &runner.pipeline().name;
        let _ = write!(
            body,
            "<h2>{}</h2><p><a href=\"/pipelines/{}/runs\">runs</a></p>",
            esc(name),
            seg(name)
        );
        if let Some(op) = &operator {
            body.push_str(&action(
                &format!("/pipelines/{}/run", seg(name)),
                op,
                "",
                "Run now",
            ));
        }
        match overview_rows(runner).await {
            Ok(rows) => body.push_str(&rows),
            Err(err) => body.push_str(&failed(&err)),
        }
    }
    if !app.captures.is_empty() {
        body.push_str(
            "<h2>Captures</h2><table><tr><th>capture</th><th>behind the server</th>\
             <th>full load</th><th>last checkpoint</th></tr>",
        );
        for c in &app.captures {
            let _ = match c.report().await {
                Ok(r) => write!(
                    body,
                    "<tr><td><a href=\"/captures/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    seg(c.name()),
                    esc(c.name()),
                    esc(&r.lag.text),
                    if r.full_load_done { "done" } else { "not done" },
                    when(r.checkpoint_at)
                ),
                Err(err) => write!(
                    body,
                    "<tr><td>{}</td><td class=\"failing\" colspan=\"3\">{}</td></tr>",
                    esc(c.name()),
                    esc(&err.to_string())
                ),
            };
        }
        body.push_str("</table>");
    }
    page("Pipelines", &body)
}

/// A time as the UI shows it, or "never".
fn when(at: Option<chrono::DateTime<chrono::Utc>>) -> String {
    at.map_or("never".into(), |t| {
        t.format("%Y-%m-%d %H:%M:%S").to_string()
    })
}

/// A capture's page: where it stands, and what it wrote per source table.
pub(super) async fn capture_page(State(app): AppState, Path(name): Path<String>) -> Response {
    let Some(c) = app.captures.iter().find(|c| c.name() == name) else {
        return not_found(&format!("no capture {name}"));
    };
    let r = match c.report().await {
        Ok(r) => r,
        Err(err) => return page(&name, &failed(&err)).into_response(),
    };
    let mut body = format!(
        "<table><tr><th>behind the server</th><td>{}</td></tr>\
         <tr><th>full load</th><td>{}</td></tr>\
         <tr><th>confirmed position</th><td>{}</td></tr>\
         <tr><th>last checkpoint</th><td>{}</td></tr></table>\
         <h2>Source tables</h2><table><tr><th>table</th><th>schema version</th>\
         <th>changes written</th><th>objects written</th><th>last object</th></tr>",
        esc(&r.lag.text),
        if r.full_load_done { "done" } else { "not done" },
        esc(r.position.as_deref().unwrap_or("none")),
        when(r.checkpoint_at),
    );
    for (table, t) in &r.tables {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>v{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(table),
            t.version,
            t.changes,
            t.objects,
            esc(t.last_object.as_deref().unwrap_or("-"))
        );
    }
    body.push_str(
        "</table><p class=\"muted\">Changes and objects count what confirmed checkpoints \
         hold (CDC only; the full load is not counted).</p>",
    );
    page(&format!("capture {name}"), &body).into_response()
}

async fn overview_rows(runner: &Runner) -> Result<String> {
    let runs = runner.state().recent_runs(1)?;
    let mut rows = String::from(
        "<table><tr><th>table</th><th>state</th><th>loaded</th><th>waiting</th>\
         <th>quarantined</th><th>last batch</th><th>loaded up to</th><th>lag</th></tr>",
    );
    for table in &runner.pipeline().tables {
        let s = runner.table_status(table).await?;
        let (class, label) = state(&s, last_try(&runs, &s.table));
        let label = match &s.held_by {
            Some((owner, _)) => format!("{label}; loading now: {}", esc(owner)),
            None => label.to_string(),
        };
        let _ = write!(
            rows,
            "<tr><td><a href=\"/pipelines/{}/tables/{}\">{}</a></td><td class=\"{class}\">{label}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            seg(&runner.pipeline().name),
            seg(&s.table),
            esc(&s.table),
            s.loaded,
            s.waiting,
            s.quarantined.len(),
            s.last_batch.as_ref().map_or("-".into(), |b| format!(
                "#{}, {} rows",
                b.number, b.stats.rows
            )),
            s.loaded_up_to
                .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
            s.lag().map_or("not loaded".into(), humanize),
        );
    }
    rows.push_str("</table>");
    Ok(rows)
}

/// A POST form to `url` with the CSRF value, `fields` (HTML) and a button.
fn action(url: &str, op: &Operator, fields: &str, button: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{url}\"><input type=\"hidden\" name=\"csrf\" \
         value=\"{}\">{fields} <button>{}</button></form>",
        op.csrf,
        esc(button)
    )
}

fn table<'a>(runner: &'a Runner, name: &str) -> Option<&'a Table> {
    runner
        .pipeline()
        .tables
        .iter()
        .find(|t| t.qualified() == name)
}

pub(super) async fn runs(State(app): AppState, Path(pipeline): Path<String>) -> Response {
    let Some(runner) = app.runner(&pipeline) else {
        return not_found(&format!("no pipeline {pipeline}"));
    };
    let runs = match runner.state().recent_runs(20) {
        Ok(runs) => runs,
        Err(err) => return page(&pipeline, &failed(&err)).into_response(),
    };
    let mut body = String::from("<table><tr><th>table</th>");
    for run in runs.iter().rev() {
        let _ = write!(
            body,
            "<th>#{} {}<br><span class=\"muted\">{}</span></th>",
            run.id,
            esc(&run.trigger),
            esc(&run.started_at[..16.min(run.started_at.len())])
        );
    }
    body.push_str("</tr>");
    for t in &runner.pipeline().tables {
        let name = t.qualified();
        let _ = write!(body, "<tr><td>{}</td>", esc(&name));
        for run in runs.iter().rev() {
            let tries: Vec<_> = run.attempts.iter().filter(|a| a.table == name).collect();
            match tries.last() {
                None => body.push_str("<td class=\"muted\">·</td>"),
                Some(last) => {
                    let class = match last.state {
                        TaskState::Success => "ok",
                        TaskState::Failed => "failing",
                        _ => "behind",
                    };
                    let rows: u64 = tries.iter().map(|a| a.rows).sum();
                    let _ = write!(
                        body,
                        "<td class=\"{class}\" title=\"{}\"><a href=\"/pipelines/{}/runs/{}/tables/{}\">\
                         {} · {rows} rows · {} tr{}</a></td>",
                        esc(last.error.as_deref().unwrap_or("")),
                        seg(&pipeline),
                        run.id,
                        seg(&name),
                        last.state.as_str(),
                        tries.len(),
                        if tries.len() == 1 { "y" } else { "ies" }
                    );
                }
            }
        }
        body.push_str("</tr>");
    }
    body.push_str("</table><h2>Errors</h2><ul>");
    for run in &runs {
        for a in run.attempts.iter().filter(|a| a.error.is_some()) {
            let _ = write!(
                body,
                "<li>run #{} {} try {}: {}</li>",
                run.id,
                esc(&a.table),
                a.try_number,
                esc(a.error.as_deref().unwrap_or(""))
            );
        }
    }
    body.push_str("</ul>");
    page(&format!("{pipeline}: runs"), &body).into_response()
}

/// The tries of one table task in one run: state, rows, error, and what
/// each logged.
pub(super) async fn attempts_page(
    State(app): AppState,
    Path((pipeline, run, name)): Path<(String, i64, String)>,
) -> Response {
    let Some(runner) = app.runner(&pipeline) else {
        return not_found(&format!("no pipeline {pipeline}"));
    };
    let attempts = match runner.state().attempts(run, &name) {
        Ok(attempts) if attempts.is_empty() => {
            return not_found(&format!("no try of {name} in run #{run} of {pipeline}"));
        }
        Ok(attempts) => attempts,
        Err(err) => return page(&pipeline, &failed(&err)).into_response(),
    };
    let mut body = format!(
        "<p><a href=\"/pipelines/{}/runs\">All runs</a></p>",
        seg(&pipeline)
    );
    for (a, log) in &attempts {
        let _ = write!(
            body,
            "<h2>Try {}: {}, {} rows</h2>",
            a.try_number,
            a.state.as_str(),
            a.rows
        );
        if let Some(error) = &a.error {
            let _ = write!(body, "<p class=\"failing\">{}</p>", esc(error));
        }
        let _ = write!(
            body,
            "<pre>{}</pre>",
            esc(log.as_deref().unwrap_or("(no log kept)"))
        );
    }
    page(&format!("{pipeline}: {name} in run #{run}"), &body).into_response()
}

pub(super) async fn table_page(
    State(app): AppState,
    headers: HeaderMap,
    Path((pipeline, name)): Path<(String, String)>,
) -> Response {
    let Some((runner, t)) = find(&app, &pipeline, &name) else {
        return not_found(&format!("no table {name} in pipeline {pipeline}"));
    };
    let body = match table_body(runner, t, app.operator(&headers)).await {
        Ok(body) => body,
        Err(err) => failed(&err),
    };
    page(&format!("{pipeline}: {name}"), &body).into_response()
}

fn find<'a>(app: &'a App, pipeline: &str, name: &str) -> Option<(&'a Runner, &'a Table)> {
    let runner = app.runner(pipeline)?;
    Some((runner, table(runner, name)?))
}

async fn table_body(runner: &Runner, t: &Table, operator: Option<Operator>) -> Result<String> {
    let s = runner.table_status(t).await?;
    let totals = runner.state().totals(&s.table)?;
    let mut body = format!(
        "<form action=\"/pipelines/{}/tables/{}/history\"><label>When was this row changed or \
         deleted? Key ({}): <input name=\"key\"></label> <button>Show its life</button></form>\
         <table><tr><th>objects</th><td>{} listed, {} loaded, {} waiting, {} quarantined, {} skipped</td></tr>\
         <tr><th>loaded</th><td>{} batches, {} objects, {} bytes; {} inserts, {} updates, {} deletes</td></tr>{}</table>",
        seg(&runner.pipeline().name),
        seg(&s.table),
        esc(&t.primary_key.join(", ")),
        s.objects,
        s.loaded,
        s.waiting,
        s.quarantined.len(),
        s.skipped.len(),
        totals.batches,
        totals.objects,
        totals.bytes,
        totals.inserts,
        totals.updates,
        totals.deletes,
        s.held_by
            .as_ref()
            .map_or(String::new(), |(owner, until)| format!(
                "<tr><th>loading now</th><td>{}, its lease runs to {}</td></tr>",
                esc(owner),
                until.format("%Y-%m-%d %H:%M:%S UTC")
            ))
    );
    let batches = runner.state().recent_batches(&s.table, 50)?;
    body.push_str(&lag_chart(&batches));
    body.push_str(
        "<h2>Recent batches</h2><table><tr><th>batch</th><th>committed</th><th>objects</th>\
         <th>rows</th><th>I</th><th>U</th><th>D</th><th>seconds</th><th>lag at commit</th>\
         <th>bytes billed</th></tr>",
    );
    for b in batches.iter().take(20) {
        let _ = write!(
            body,
            "<tr><td>#{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{:.1}</td><td>{}</td><td>{}</td></tr>",
            b.number,
            b.committed_at.format("%Y-%m-%d %H:%M:%S"),
            b.objects,
            b.stats.rows,
            b.stats.inserts,
            b.stats.updates,
            b.stats.deletes,
            (b.committed_at - b.planned_at).as_seconds_f64(),
            lag_at_commit(b).map_or("-".into(), |l| humanize(chrono::TimeDelta::seconds(
                l as i64
            ))),
            b.stats.bytes_billed.map_or("-".into(), |n| n.to_string())
        );
    }
    body.push_str("</table>");
    for (title, list) in [("Quarantined", &s.quarantined), ("Skipped", &s.skipped)] {
        if !list.is_empty() {
            let _ = write!(body, "<h2>{title}</h2><ul>");
            for (key, why) in list {
                let _ = write!(body, "<li><code>{}</code>: {}", esc(key), esc(why));
                if let (Some(op), "Quarantined") = (&operator, title) {
                    let base = format!(
                        "/pipelines/{}/tables/{}",
                        seg(&runner.pipeline().name),
                        seg(&s.table)
                    );
                    let object = format!(
                        "<input type=\"hidden\" name=\"object\" value=\"{}\">",
                        esc(key)
                    );
                    body.push_str(&action(
                        &format!("{base}/skip"),
                        op,
                        &format!(
                            "{object}<input name=\"reason\" placeholder=\"why skip it\" required>"
                        ),
                        "Skip",
                    ));
                    body.push_str(&action(&format!("{base}/retry"), op, &object, "Retry"));
                }
                body.push_str("</li>");
            }
            body.push_str("</ul>");
        }
    }
    Ok(body)
}

/// How far behind its newest change a batch was committed, in seconds.
fn lag_at_commit(b: &CommittedBatch) -> Option<f64> {
    let newest = b.stats.max_commit_ts?;
    Some((b.committed_at - newest).as_seconds_f64().max(0.0))
}

/// The lag at commit of `batches` (newest first) as an SVG line, oldest on
/// the left; nothing with fewer than two batches.
fn lag_chart(batches: &[CommittedBatch]) -> String {
    let points: Vec<f64> = batches.iter().rev().filter_map(lag_at_commit).collect();
    if points.len() < 2 {
        return String::new();
    }
    let (width, height) = (600.0, 120.0);
    let top = points.iter().copied().fold(1.0, f64::max);
    let step = width / (points.len() - 1) as f64;
    let line: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, height - v / top * height))
        .collect();
    format!(
        "<h2>Lag at commit, last {} batches</h2><svg width=\"{width}\" height=\"{}\" \
         viewBox=\"0 -10 {width} {}\" role=\"img\"><title>lag at commit</title>\
         <polyline fill=\"none\" stroke=\"#0645ad\" stroke-width=\"2\" points=\"{}\"/>\
         <text x=\"4\" y=\"4\" font-size=\"11\">{}</text>\
         <line x1=\"0\" y1=\"{height}\" x2=\"{width}\" y2=\"{height}\" stroke=\"#ccc\"/></svg>",
        points.len(),
        height + 20.0,
        height + 20.0,
        line.join(" "),
        humanize(chrono::TimeDelta::seconds(top as i64))
    )
}

#[derive(Deserialize)]
pub(super) struct KeyQuery {
    key: String,
}

pub(super) async fn history(
    State(app): AppState,
    Path((pipeline, name)): Path<(String, String)>,
    Query(query): Query<KeyQuery>,
) -> Response {
    let Some((runner, t)) = find(&app, &pipeline, &name) else {
        return not_found(&format!("no table {name} in pipeline {pipeline}"));
    };
    let title = format!("{name}, key {}", query.key);
    let body = match runner.key_history(t, &query.key).await {
        Ok(batches) => html_table(&batches),
        Err(err) => failed(&err),
    };
    page(&title, &body).into_response()
}

#[derive(Deserialize)]
pub(super) struct ObjectForm {
    csrf: String,
    object: String,
    #[serde(default)]
    reason: String,
}

/// Back to `to` after an action, or the action's error.
fn done(outcome: Result<()>, to: &str) -> Response {
    match outcome {
        Ok(()) => (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response(),
        Err(err) => (StatusCode::BAD_REQUEST, page("Not done", &failed(&err))).into_response(),
    }
}

/// `skip` or `retry` of a quarantined object.
pub(super) async fn act(
    State(app): AppState,
    headers: HeaderMap,
    Path((pipeline, name, action)): Path<(String, String, String)>,
    Form(form): Form<ObjectForm>,
) -> Response {
    if let Some(why) = app.refusal(&headers, &form.csrf) {
        return forbidden(why);
    }
    let Some((runner, t)) = find(&app, &pipeline, &name) else {
        return not_found(&format!("no table {name} in pipeline {pipeline}"));
    };
    let reason = form.reason.trim();
    let outcome = match action.as_str() {
        "skip" if reason.is_empty() => Err(Error::Usage("give a reason to skip".into())),
        "skip" => runner.skip_object(t, &form.object, reason).await,
        "retry" => runner.retry_object(t, &form.object),
        _ => return not_found(&format!("no action {action}")),
    };
    tracing::info!(pipeline = %pipeline, table = %name, action = %action, object = %form.object, reason, ok = outcome.is_ok(), "web UI action");
    done(
        outcome,
        &format!("/pipelines/{}/tables/{}", seg(&pipeline), seg(&name)),
    )
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    csrf: String,
}

/// Starts a manual run in the background (its lease keeps it from running
/// beside another), and shows the runs.
pub(super) async fn run_now(
    State(app): AppState,
    headers: HeaderMap,
    Path(pipeline): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(why) = app.refusal(&headers, &form.csrf) {
        return forbidden(why);
    }
    if app.runner(&pipeline).is_none() {
        return not_found(&format!("no pipeline {pipeline}"));
    }
    let name = pipeline.clone();
    tokio::spawn(async move {
        let runner = app.runner(&name).expect("checked above");
        match runner
            .run(Trigger::Manual, None, &Shutdown::default())
            .await
        {
            Ok(report) => {
                tracing::info!(pipeline = %name, run = report.run_id, ok = report.ok(), "web UI: run finished")
            }
            Err(err) => tracing::warn!(pipeline = %name, error = %err, "web UI: run not done"),
        }
    });
    done(Ok(()), &format!("/pipelines/{}/runs", seg(&pipeline)))
}

/// Record batches as an HTML table (every value as its text).
fn html_table(batches: &[arrow::array::RecordBatch]) -> String {
    let Some(first) = batches.first() else {
        return "<p>No change of this key was loaded.</p>".into();
    };
    let mut out = String::from("<table><tr>");
    for field in first.schema().fields() {
        let _ = write!(out, "<th>{}</th>", esc(field.name()));
    }
    out.push_str("</tr>");
    let options = FormatOptions::default().with_null("");
    for batch in batches {
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .filter_map(|c| ArrayFormatter::try_new(c.as_ref(), &options).ok())
            .collect();
        for row in 0..batch.num_rows() {
            out.push_str("<tr>");
            for f in &formatters {
                let _ = write!(out, "<td>{}</td>", esc(&f.value(row).to_string()));
            }
            out.push_str("</tr>");
        }
    }
    out.push_str("</table>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values come from the warehouse and object keys from the bucket:
    /// nothing in them becomes markup.
    #[test]
    fn text_and_path_segments_are_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(seg("public.a b/c?d"), "public.a%20b%2Fc%3Fd");
    }
}
