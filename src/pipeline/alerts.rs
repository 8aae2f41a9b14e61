//! Alerts (`[alerts]`): after each run, each table's incidents (its task
//! failed after its retries; it waits at a quarantined object; its lag is
//! above the bound) are compared with the open ones the state store keeps,
//! and the webhook is told once when an incident opens and once when it
//! resolves.
//!
//! The state changes only after the webhook took the alert (a 2xx), so an
//! alert it missed is sent at the next run again: at least once, and once
//! while the webhook answers. Each alert is tried three times with backoff;
//! a failing webhook is logged and never fails the run.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::{RunReport, Runner};
use crate::config::{AlertFormat, Alerts, Webhook};
use crate::error::Result;
use crate::state::ObjectStatus;

/// Tries per alert, and the wait before the second (doubled after).
const TRIES: u32 = 3;
const BACKOFF: Duration = Duration::from_secs(1);

/// One condition of one table now.
struct Condition {
    kind: &'static str,
    table: String,
    /// What is wrong; `None`: nothing (an open incident resolves).
    firing: Option<String>,
}

impl Condition {
    fn key(&self) -> String {
        format!("{}:{}", self.kind, self.table)
    }
}

/// Evaluates and sends the alerts of `report`'s run. Never fails: problems
/// are logged, and the next run tries again.
pub(super) async fn notify(runner: &Runner, report: &RunReport) {
    let Some(alerts) = &runner.pipeline().alerts else {
        return;
    };
    if let Err(err) = notify_all(runner, alerts, report).await {
        tracing::warn!(
            pipeline = %runner.pipeline().name,
            error = %err,
            "alerts: could not evaluate them; the next run tries again"
        );
    }
}

async fn notify_all(runner: &Runner, alerts: &Alerts, report: &RunReport) -> Result<()> {
    let conditions = conditions(runner, alerts, report).await?;
    let state = runner.state();
    let open = state.open_incidents()?;
    let url = match &alerts.webhook {
        Webhook::Url(url) => url.clone(),
        Webhook::Env(var) => match std::env::var(var) {
            Ok(url) => url,
            Err(_) => {
                tracing::warn!(variable = %var, "alerts: the webhook's variable is not set; nothing sent");
                return Ok(());
            }
        },
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| crate::error::Error::Internal(format!("an HTTP client: {e}")))?;
    let pipeline = &runner.pipeline().name;
    for c in conditions {
        let key = c.key();
        let (status, detail) = match (&c.firing, open.get(&key)) {
            (Some(now), None) => ("firing", now),
            (None, Some(was)) => ("resolved", was),
            _ => continue,
        };
        let body = body(alerts.format, pipeline, &c, status, detail);
        if send(&client, &url, &body).await {
            state.set_incident(&key, c.firing.as_deref())?;
        }
    }
    Ok(())
}

/// Every table's conditions after the run.
async fn conditions(
    runner: &Runner,
    alerts: &Alerts,
    report: &RunReport,
) -> Result<Vec<Condition>> {
    let mut conditions = Vec::new();
    for table in &runner.pipeline().tables {
        let name = table.qualified();
        if let Some(task) = report.tables.iter().find(|t| t.table == name) {
            conditions.push(Condition {
                kind: "task_failed",
                table: name.clone(),
                firing: task
                    .error
                    .as_ref()
                    .map(|e| format!("failed after {} tries: {e}", task.tries)),
            });
        }
        // From the state alone: no listing of the source prefix.
        let mut quarantined: Vec<(String, String)> = runner
            .state()
            .objects(&name)?
            .into_iter()
            .filter_map(|(key, r)| match r.status {
                ObjectStatus::Quarantined { error } => Some((key, error)),
                _ => None,
            })
            .collect();
        quarantined.sort();
        conditions.push(Condition {
            kind: "quarantined",
            table: name.clone(),
            firing: quarantined.first().map(|(key, error)| {
                format!(
                    "{} object(s) quarantined; the table waits at {key}: {error}",
                    quarantined.len()
                )
            }),
        });
        // Only the lag needs the newest object: a listing of the prefix.
        let Some(bound) = alerts.lag else {
            continue;
        };
        if let Some(lag) = runner.table_status(table).await?.lag() {
            let lag = lag.to_std().unwrap_or_default();
            conditions.push(Condition {
                kind: "lag",
                table: name,
                firing: (lag > bound).then(|| {
                    format!(
                        "the newest change loaded is {}s behind the newest object (bound {}s)",
                        lag.as_secs(),
                        bound.as_secs()
                    )
                }),
            });
        }
    }
    Ok(conditions)
}

/// The body of one alert.
fn body(
    format: AlertFormat,
    pipeline: &str,
    c: &Condition,
    status: &str,
    detail: &str,
) -> serde_json::Value {
    let summary = match c.kind {
        "task_failed" => "its task failed",
        "quarantined" => "it waits at a quarantined object",
        _ => "its lag is above the bound",
    };
    match format {
        AlertFormat::Json => json!({
            "pipeline": pipeline,
            "table": c.table,
            "kind": c.kind,
            "status": status,
            "summary": summary,
            "detail": detail,
            "at": Utc::now().to_rfc3339(),
        }),
        AlertFormat::Slack => json!({
            "text": if status == "firing" {
                format!(":rotating_light: cdcflow `{pipeline}`: table `{}`: {summary}. {detail}", c.table)
            } else {
                format!(":white_check_mark: cdcflow `{pipeline}`: table `{}`: resolved ({summary}: {detail})", c.table)
            }
        }),
    }
}

/// Posts `body`; true once the webhook answered 2xx.
async fn send(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> bool {
    let mut wait = BACKOFF;
    for attempt in 1..=TRIES {
        let problem = match client.post(url).json(body).send().await {
            Ok(r) if r.status().is_success() => return true,
            Ok(r) => format!("the webhook answered {}", r.status()),
            Err(e) => format!("the webhook did not answer: {e}"),
        };
        tracing::warn!(
            url = %crate::tls::redact_url(url),
            attempt,
            problem,
            "alerts: sending failed"
        );
        if attempt < TRIES {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Slack incoming webhook takes `{"text": …}`: the table, the
    /// condition and the detail, and "resolved" when it is.
    #[test]
    fn a_slack_body_is_one_text_naming_the_table_and_the_state() {
        let c = Condition {
            kind: "quarantined",
            table: "public.orders".into(),
            firing: None,
        };
        let body = body(
            AlertFormat::Slack,
            "shop",
            &c,
            "resolved",
            "1 object(s) quarantined",
        );
        let object = body.as_object().unwrap();
        assert_eq!(object.len(), 1, "{body}");
        let text = object["text"].as_str().unwrap();
        for part in [
            "shop",
            "public.orders",
            "resolved",
            "quarantined",
            "1 object(s)",
        ] {
            assert!(text.contains(part), "{text}");
        }
    }
}
