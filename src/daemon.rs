//! Process-level plumbing the binaries share: logging set-up and the shutdown signal.

use std::path::Path;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// The prefix the journald layer puts before every event field but `message`: a field
/// `task_id` is `FIELDHAND_TASK_ID` in the journal.
pub const JOURNALD_FIELD_PREFIX: &str = "FIELDHAND";

/// The journald name of event field `field`, as tracing-journald 0.3 makes it with our
/// prefix: `message` is `MESSAGE`; any other is the prefix, `_`, then the name with `.` as
/// `_`, leading `_` dropped, other characters that are not ASCII letters or digits dropped,
/// in upper case. (A field named `fieldhand_operator` would be `FIELDHAND_FIELDHAND_OPERATOR`:
/// name fields without the prefix.)
pub fn journald_field_name(field: &str) -> String {
    if field == "message" {
        return "MESSAGE".into();
    }
    let name: String = field
        .chars()
        .map(|c| if c == '.' { '_' } else { c })
        .skip_while(|c| *c == '_')
        .filter(|c| *c == '_' || c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    format!("{JOURNALD_FIELD_PREFIX}_{name}")
}

static SINK: std::sync::OnceLock<LogSink> = std::sync::OnceLock::new();

/// Reports a fatal error once: on stderr (prefixed with the program), and also in the
/// journal when logs go there. When logs go to stderr, a log line would say it twice.
pub fn report_fatal(program: &str, message: &str) {
    if SINK.get() == Some(&LogSink::Journald) {
        tracing::error!("{message}");
    }
    eprintln!("{program}: {message}");
}

/// Where logs go; chosen once at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    Journald,
    Stderr,
}

/// Starts logging. The level comes from `FIELDHAND_LOG` (a tracing filter, default `info`).
/// Under systemd (`JOURNAL_STREAM` set and the journald socket present) records go to journald
/// with structured fields; otherwise plain text to stderr, without colours when not a terminal.
pub fn init_logging(fields: &[(&str, String)]) -> LogSink {
    let filter =
        || EnvFilter::try_from_env("FIELDHAND_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    if under_systemd && Path::new(JOURNALD_SOCKET).exists() {
        if let Ok(layer) = tracing_journald::layer() {
            // Our fields become FIELDHAND_TASK_ID, FIELDHAND_ASSIGNMENT_ID, FIELDHAND_PHASE...
            let layer = layer
                .with_field_prefix(Some(JOURNALD_FIELD_PREFIX.into()))
                .with_custom_fields(
                    fields
                        .iter()
                        .map(|(k, v)| (journald_field_name(k), v.clone())),
                );
            if tracing_subscriber::registry()
                .with(filter())
                .with(layer)
                .try_init()
                .is_ok()
            {
                tracing::info!("logging to journald");
                let _ = SINK.set(LogSink::Journald);
                return LogSink::Journald;
            }
        }
    }
    use std::io::IsTerminal;
    let ansi = !under_systemd && std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    // journald adds its own timestamps to captured stderr.
    let result = if under_systemd {
        tracing_subscriber::registry()
            .with(filter())
            .with(fmt.without_time())
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(filter())
            .with(fmt)
            .try_init()
    };
    if result.is_ok() {
        tracing::info!("logging to stderr");
    }
    let _ = SINK.set(LogSink::Stderr);
    LogSink::Stderr
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still dies on the default action.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journald_field_names_carry_our_prefix_once() {
        assert_eq!(journald_field_name("operator"), "FIELDHAND_OPERATOR");
        assert_eq!(journald_field_name("action"), "FIELDHAND_ACTION");
        assert_eq!(journald_field_name("task_id"), "FIELDHAND_TASK_ID");
        assert_eq!(journald_field_name("message"), "MESSAGE");
        assert_eq!(journald_field_name("_odd.name-x"), "FIELDHAND_ODD_NAMEX");
    }
}
