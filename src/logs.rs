//! Log lines: to standard error (text or JSON, filtered by `-v` or
//! `RUST_LOG`), and each table task attempt's own lines, kept for the run
//! log so that the web UI's runs grid can show what one try said.
//!
//! The attempt lines are captured by a layer of the process's subscriber:
//! every `cdcflow` event at INFO or above inside a [`TASK_SPAN`] span is
//! appended to that span's lines (whatever the standard-error filter), and
//! [`take_attempt_log`] hands them over when the try ends. Without that
//! subscriber (cdcflow used as a library), nothing is captured.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber, span};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

/// The name of a table task attempt's span.
pub const TASK_SPAN: &str = "task";

/// Lines kept per attempt; later ones are counted, not kept.
const MAX_LINES: usize = 200;

/// Characters kept per line.
const MAX_LINE: usize = 2000;

/// How lines are written to standard error.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// One JSON object per line, with the spans (pipeline, run, table, try).
    Json,
}

/// Installs the process's subscriber: standard error at `default_filter`
/// (unless `RUST_LOG` says otherwise) in `format`, and the attempt capture.
pub fn init(format: Format, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = match format {
        Format::Text => stderr.with_filter(filter).boxed(),
        Format::Json => stderr
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_filter(filter)
            .boxed(),
    };
    let attempts = AttemptCapture.with_filter(Targets::new().with_target("cdcflow", Level::INFO));
    tracing_subscriber::registry()
        .with(stderr)
        .with(attempts)
        .init();
}

/// The lines an attempt's span holds, one per line, and removes them (none
/// when the span is disabled or nothing was logged).
pub fn take_attempt_log(span: &tracing::Span) -> Option<String> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let lines = registry.span(id)?.extensions_mut().remove::<Lines>()?;
        (!lines.kept.is_empty()).then(|| lines.text())
    })
    .flatten()
}

/// One attempt's lines so far.
#[derive(Default)]
struct Lines {
    kept: Vec<String>,
    dropped: usize,
}

impl Lines {
    fn text(&self) -> String {
        let mut text = self.kept.join("\n");
        if self.dropped > 0 {
            let _ = write!(text, "\n… {} more lines not kept", self.dropped);
        }
        text
    }
}

/// The layer that keeps each attempt's lines in its span.
struct AttemptCapture;

impl<S> Layer<S> for AttemptCapture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() == TASK_SPAN
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(Lines::default());
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            let mut extensions = span.extensions_mut();
            if let Some(lines) = extensions.get_mut::<Lines>() {
                if lines.kept.len() < MAX_LINES {
                    lines.kept.push(line(event));
                } else {
                    lines.dropped += 1;
                }
                return;
            }
        }
    }
}

/// `time LEVEL message key=value …`, at most [`MAX_LINE`] characters.
fn line(event: &Event<'_>) -> String {
    let mut fields = Fields::default();
    event.record(&mut fields);
    let mut text = format!(
        "{} {} {}{}",
        chrono::Utc::now().format("%H:%M:%S%.3f"),
        event.metadata().level(),
        fields.message,
        fields.rest
    );
    if let Some((cut, _)) = text.char_indices().nth(MAX_LINE) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// An event's message and its other fields as ` key=value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}
