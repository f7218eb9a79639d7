//! The dbagent binary: everything lives in the library; this only runs the CLI.

fn main() -> std::process::ExitCode {
    dbagent::cli::run()
}
