//! Logging through `tracing`: JSON lines (the default for `serve`) or text, to
//! standard error, filtered by a configurable level.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, FormattedFields};
use tracing_subscriber::EnvFilter;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// Installs the global subscriber. Safe to call more than once (later calls
/// are ignored).
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        // Its own report of a failed write is an `eprintln!`, which panics
        // when standard error cannot be written (a full disk under
        // redirected output): a failed log line must never kill the process.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(SpanJson)
            .try_init(),
        LogFormat::Text => builder.compact().try_init(),
    };
}

/// Standard error for log lines, where a line that cannot be written (a full
/// disk, a closed pipe) is dropped and counted in
/// `keyward_log_write_errors_total` rather than reported: the log is not
/// worth the service.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::io::stderr().write(buf) {
            Ok(n) => Ok(n),
            Err(_) => {
                metrics::counter!("keyward_log_write_errors_total").increment(1);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Span fields as a JSON object, written straight out. `tracing-subscriber`'s
/// own `JsonFields` builds a map of `serde_json::Value`s and serializes it for
/// every span: for the span each request opens, that was a tenth of the
/// instructions Keyward spent on a request. The output is the same object (the
/// JSON formatter parses it back when an event inside the span is printed).
struct SpanJson;

impl<'writer> FormatFields<'writer> for SpanJson {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        thread_local! {
            /// Where the object is put together, so that the span's own
            /// string is allocated once, at its size, instead of regrown.
            static BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        BUFFER.with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut buffer) => {
                buffer.clear();
                write_object(&mut Writer::new(&mut *buffer), fields)?;
                writer.write_str(&buffer)
            }
            // A field's `Debug` that made a span of its own.
            Err(_) => write_object(&mut writer, fields),
        })
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // Fields recorded after the span was made (none of Keyward's spans do
        // this): merge them into the object, later values winning.
        let mut added = String::new();
        self.format_fields(Writer::new(&mut added), fields)?;
        if current.fields.is_empty() {
            current.fields = added;
            return Ok(());
        }
        let mut merged: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&current.fields).map_err(|_| fmt::Error)?;
        let added: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&added).map_err(|_| fmt::Error)?;
        merged.extend(added);
        current.fields = serde_json::to_string(&merged).map_err(|_| fmt::Error)?;
        Ok(())
    }
}

fn write_object<R: RecordFields>(writer: &mut Writer<'_>, fields: R) -> fmt::Result {
    let mut visitor = SpanJsonVisitor {
        out: writer,
        first: true,
        result: Ok(()),
    };
    fields.record(&mut visitor);
    visitor.result?;
    if visitor.first {
        writer.write_char('{')?;
    }
    writer.write_char('}')
}

struct SpanJsonVisitor<'a, 'w> {
    out: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl SpanJsonVisitor<'_, '_> {
    /// Writes `"name":` (with the separator before it), then the value.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let separator = if self.first { '{' } else { ',' };
        self.first = false;
        self.result = self
            .out
            .write_char(separator)
            .and_then(|()| crate::json::write_str(self.out, name))
            .and_then(|()| self.out.write_char(':'))
            .and_then(|()| value(self.out));
    }
}

impl Visit for SpanJsonVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |w| crate::json::write_str(w, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.field(field, |w| write!(w, "{value}"));
        } else {
            self.field(field, |w| w.write_str("null"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, |w| crate::json::write_str(w, &value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |w| crate::json::write_str(w, &format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};

    use super::SpanJson;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The `span` object of the one event `f` logs, with Keyward's JSON setup.
    fn span_of_event(f: impl FnOnce()) -> Value {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(SpanJson)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let out = buffer.0.lock().unwrap().clone();
        let line: Value = serde_json::from_slice(&out).expect("one JSON line");
        line["span"].clone()
    }

    #[test]
    fn span_fields_are_the_json_object_of_their_values() {
        let span = span_of_event(|| {
            let span = tracing::info_span!(
                "request",
                path = "/v1/\"quoted\"\\\n\t\u{1}é",
                request_id = "r-1",
                count = 3u64,
                delta = -2i64,
                ok = true,
                ratio = 0.5f64,
                debug = ?vec![1, 2],
                absent = Option::<&str>::None,
                r#type = "raw",
            );
            let _entered = span.enter();
            tracing::info!("inside");
        });
        assert_eq!(
            span,
            json!({
                "name": "request",
                "path": "/v1/\"quoted\"\\\n\t\u{1}é",
                "request_id": "r-1",
                "count": 3,
                "delta": -2,
                "ok": true,
                "ratio": 0.5,
                "debug": "[1, 2]",
                "type": "raw",
            })
        );
    }

    #[test]
    fn fields_recorded_later_join_the_object() {
        let span = span_of_event(|| {
            let span = tracing::info_span!(
                "request",
                method = "POST",
                tenant = tracing::field::Empty,
                late = tracing::field::Empty
            );
            span.record("tenant", "t-1");
            span.record("late", 7u64);
            span.record("tenant", "t-2");
            let _entered = span.enter();
            tracing::info!("inside");
        });
        assert_eq!(
            span,
            json!({"name": "request", "method": "POST", "tenant": "t-2", "late": 7})
        );
        let empty = span_of_event(|| {
            let span = tracing::info_span!("quiet");
            let _entered = span.enter();
            tracing::info!("inside");
        });
        assert_eq!(empty, json!({"name": "quiet"}));
    }
}
