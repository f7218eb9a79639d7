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
}

/// Shorthand for an input error with a formatted message.
#[macro_export]
macro_rules! input_err {
    ($($arg:tt)*) => { anyhow::Error::new($crate::error::Failure::Input(format!($($arg)*))) };
}

pub const EXIT_OK: u8 = 0;
pub const EXIT_INPUT: u8 = 1;
pub const EXIT_FAILED: u8 = 2;
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
        let mut line = String::from("dbagent: error: ");
        let mut first = true;
        for cause in err.chain() {
            if !first {
                line.push_str(": ");
            }
            line.push_str(&cause.to_string());
            first = false;
        }
        eprintln!("{line}");
    }
    ExitCode::from(code)
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
