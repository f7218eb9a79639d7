//! Failures a caller branches on, and the exit code each one maps to.
//!
//! Everything else is an `anyhow::Error` that exits 2 ("the operation failed").

use std::process::ExitCode;

/// A failure whose kind matters to the caller (and to the exit code).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The user's input or environment is wrong; the message says what to fix. Exit 1.
    #[error("{0}")]
    Input(String),
    /// The thing asked for is not there (`wal-fetch` of a segment not yet archived).
    /// Exit 1, and nothing is printed: PostgreSQL asks for such segments routinely.
    #[error("{0}")]
    NotFound(String),
    /// Stored data failed its checksum. Exit 2, except from `wal-fetch`, where it is
    /// `EXIT_ABORT_RECOVERY`.
    #[error("{0}")]
    Corrupt(String),
    /// `serve` found its configuration changed and drained to start again with the new one:
    /// in place (`cli::restart_in_place`) when `in_place`, else (or when that fails) exit 3
    /// for its supervisor.
    #[error("{why}")]
    Restart { why: String, in_place: bool },
}

/// Shorthand for an input error with a formatted message.
#[macro_export]
macro_rules! input_err {
    ($($arg:tt)*) => { anyhow::Error::new($crate::error::Failure::Input(format!($($arg)*))) };
}

pub const EXIT_OK: u8 = 0;
pub const EXIT_INPUT: u8 = 1;
pub const EXIT_FAILED: u8 = 2;
/// `serve` only: its configuration, a key file or a secret changed; start it again.
pub const EXIT_RESTART: u8 = 3;
/// `wal-fetch` of a file it cannot say is absent: corrupt, unreachable after retries, refused
/// credentials, a broken configuration. PostgreSQL treats a restore_command exit status up to
/// 125 as "not archived" and, without a recovery target, ends recovery and promotes there,
/// silently losing the WAL after it; above 125 it stops recovery instead.
pub const EXIT_ABORT_RECOVERY: u8 = 126;

/// `wal-fetch`'s exit code: 1 only when the repository answered that the file is not there.
pub fn fetch_exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Failure>() {
        Some(Failure::NotFound(_)) => EXIT_INPUT,
        _ => EXIT_ABORT_RECOVERY,
    }
}

/// Maps an error to the documented exit code.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    match err.chain().find_map(|e| e.downcast_ref::<Failure>()) {
        Some(Failure::Input(_)) | Some(Failure::NotFound(_)) => EXIT_INPUT,
        Some(Failure::Corrupt(_)) | None => EXIT_FAILED,
        Some(Failure::Restart { .. }) => EXIT_RESTART,
    }
}

/// True when the error should exit without a message.
pub fn is_quiet(err: &anyhow::Error) -> bool {
    matches!(err.downcast_ref::<Failure>(), Some(Failure::NotFound(_)))
}

pub fn is_corrupt(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| matches!(e.downcast_ref::<Failure>(), Some(Failure::Corrupt(_))))
}

/// Prints the error chain once, on one line, and returns the exit code.
pub fn report(err: &anyhow::Error) -> ExitCode {
    report_with(err, exit_code(err))
}

/// Like `report`, with the exit code chosen by the caller.
pub fn report_with(err: &anyhow::Error, code: u8) -> ExitCode {
    if !is_quiet(err) {
        eprintln!("dbagent: error: {}", one_line(err));
    }
    ExitCode::from(code)
}

/// Whether `err` is a write into a pipe whose reader had stopped: the reader's own error is
/// the one that says why.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error chain as one line: causes joined by ": ", each cause's own lines (a server's
/// DETAIL and HINT, an S3 error body) joined by spaces, and a cause already said by the
/// ones before it (libraries that repeat their source in their own message) left out.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Joins scoped threads, all of them, and returns the first error among them in the order
/// given (a panic counts as one, named by `what`).
pub fn join_first<'s>(
    handles: impl IntoIterator<Item = std::thread::ScopedJoinHandle<'s, anyhow::Result<()>>>,
    what: &str,
) -> anyhow::Result<()> {
    let mut first = Ok(());
    for h in handles {
        let r = h
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("{what} panicked")));
        if first.is_ok() {
            first = r;
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_one_line_and_says_each_thing_once() {
        #[derive(Debug)]
        struct Repeats(&'static str, Option<Box<Repeats>>);
        impl std::fmt::Display for Repeats {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Repeats {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        // A server's DETAIL on its own line; an S3 body that each wrapper repeats.
        let body = "<?xml version=\"1.0\"?>\n<Error><Code>InvalidBucketName</Code></Error>";
        let inner = Repeats(body, None);
        let wrapped = Repeats(
            "Client error with status 400: <?xml version=\"1.0\"?>\n<Error><Code>InvalidBucketName</Code></Error>",
            Some(Box::new(inner)),
        );
        let e = anyhow::Error::new(wrapped).context("listing the repository");
        assert_eq!(
            one_line(&e),
            "listing the repository: Client error with status 400: <?xml version=\"1.0\"?> <Error><Code>InvalidBucketName</Code></Error>"
        );
        let e = anyhow::anyhow!("db error: ERROR: permission denied to create role\nDETAIL: Only roles with the CREATEROLE attribute may create roles.")
            .context("creating role \"app\"");
        assert_eq!(
            one_line(&e),
            "creating role \"app\": db error: ERROR: permission denied to create role DETAIL: Only roles with the CREATEROLE attribute may create roles."
        );
    }

    #[test]
    fn wal_fetch_answers_not_archived_only_for_not_found() {
        let not_found = anyhow::Error::new(Failure::NotFound("x is not archived".into()));
        assert_eq!(fetch_exit_code(&not_found), EXIT_INPUT);
        assert!(is_quiet(&not_found));
        for err in [
            anyhow::Error::new(Failure::Input("bad credentials".into())),
            anyhow::Error::new(Failure::Corrupt("checksum mismatch".into())),
            anyhow::anyhow!("storage unreachable"),
        ] {
            assert_eq!(fetch_exit_code(&err), EXIT_ABORT_RECOVERY, "{err:#}");
        }
    }
}
