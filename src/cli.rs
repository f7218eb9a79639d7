//! Command-line definitions and dispatch. Parses, resolves the configuration once, calls the
//! domain code and prints its report (for people, or `--json`); nothing else. This is the only
//! place that writes to stdout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, Overrides, ProcessEnv};
use crate::engine::Engine;
use crate::input_err;
use crate::restore::plan::Target;

#[derive(Debug, Parser)]
#[command(
    name = "dbagent",
    version,
    about = "PostgreSQL and MySQL/MariaDB backup agent and HA sidecar"
)]
pub struct Cli {
    /// Configuration file (TOML). Environment variables override it; flags override both.
    #[arg(long, global = true, env = "DBAGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Repository: file:///path or s3://bucket/prefix.
    #[arg(long, global = true, value_name = "URL")]
    pub repo: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Kind {
    Base,
    Dump,
}

#[derive(Debug, Subcommand)]
pub enum EncryptionAction {
    /// Show the repository's key history and whether the configured keys fit it.
    Status,
    /// Record the keys in encryption.recipients_file as the repository's current key set:
    /// the first time turns encryption on, later ones rotate. Old objects keep their keys.
    Set,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a new age key pair: the secret key to --output (0600), the public key to stdout.
    Keygen {
        /// The identity file to create (never overwritten).
        #[arg(long, short, value_name = "FILE")]
        output: PathBuf,
    },
    /// The repository's encryption: its key history, and recording a new key set.
    Encryption {
        #[command(subcommand)]
        action: EncryptionAction,
    },
    /// Archive one WAL file (PostgreSQL archive_command: `dbagent wal-push %p`).
    WalPush {
        /// The path PostgreSQL passes as %p.
        path: PathBuf,
    },
    /// Restore one WAL file (PostgreSQL restore_command: `dbagent wal-fetch %f %p`).
    /// Exits 1 without a message when the file is not archived.
    WalFetch {
        /// The file name PostgreSQL asks for (%f).
        name: String,
        /// Where to write it (%p).
        dest: PathBuf,
        /// The timeline recovery follows (a restore writes it): a segment of an older
        /// timeline on its path is restored only up to where that timeline left the path.
        #[arg(long)]
        timeline: Option<u32>,
    },
    /// Download WAL ahead of replay (started by wal-fetch).
    #[command(hide = true)]
    WalPrefetch { dir: PathBuf, names: Vec<String> },
    /// Take a backup: a PostgreSQL base backup (default; read from pg.data_dir in parallel
    /// when it is set, full or incremental, else over the network), PostgreSQL logical dumps
    /// (--kind dump), or a MySQL/MariaDB logical dump (--engine mysql).
    Backup {
        #[arg(long, value_enum, default_value = "postgres")]
        engine: Engine,
        #[arg(long, value_enum, default_value = "base")]
        kind: Kind,
        /// A full base backup, whatever backup.full_every says.
        #[arg(long, conflicts_with = "incremental")]
        full: bool,
        /// Store only what changed since the newest base backup of this cluster and timeline
        /// (a full backup when there is none). Needs a file-level backup (pg.data_dir).
        #[arg(long)]
        incremental: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ship every closed MySQL/MariaDB binlog once (for a cron; `serve` does it continuously).
    BinlogPush {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run as a sidecar: health endpoints (Patroni-compatible), metrics, heartbeat, lag,
    /// look-ahead WAL shipping and scheduled jobs.
    Serve {
        /// Address to listen on (default 0.0.0.0:8008, or serve.listen).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Database engine (default postgres, or serve.engine).
        #[arg(long, value_enum)]
        engine: Option<Engine>,
    },
    /// Restore drill: restore into a scratch server, run the checks and SQL suites, report.
    /// Exits 0 only when every check passed.
    Drill {
        #[arg(long, value_enum, default_value = "postgres")]
        engine: Engine,
        /// Restore to this time instead of the newest restorable point.
        #[arg(long, value_name = "TIME", conflicts_with_all = ["random", "latest"])]
        at: Option<String>,
        /// Restore to a random point inside the restorable window.
        #[arg(long, conflicts_with = "latest")]
        random: bool,
        /// Restore to the newest restorable point (the default).
        #[arg(long)]
        latest: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply retention: delete backups and WAL no longer needed for the recovery window
    /// (`retention.keep_days`) and the newest `retention.keep_backups` backups.
    Prune {
        /// Print the plan and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the repository: every object's checksum trailer against its manifest and every
    /// backup's WAL chain; --full reads and checksums every byte. Exits 2 on any problem.
    Verify {
        #[arg(long)]
        full: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List backups and the restorable window.
    List {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Restore to a point in time into an empty data directory, then start and promote.
    Restore(RestoreArgs),
    /// Copy this binary into DIR (as DIR/dbagent, executable, atomically): for an init
    /// container that shares it with the database container. Needs no shell.
    Install {
        /// The shared volume's mount point.
        dir: PathBuf,
    },
    /// Remove a restore's recovery settings from ./postgresql.auto.conf (PostgreSQL
    /// recovery_end_command, which runs in the data directory when recovery ends).
    #[command(hide = true)]
    RecoveryEnd,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Target time: RFC 3339, or "YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM]]" (UTC without an offset).
    #[arg(
        long,
        value_name = "TIME",
        conflicts_with = "latest",
        required_unless_present = "latest"
    )]
    at: Option<String>,
    /// Replay all archived WAL.
    #[arg(long)]
    latest: bool,
    /// The new data directory: must be absent or empty. For MySQL, a scratch server is
    /// initialised here (without it, the restore goes into DBAGENT_MYSQL_URL).
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// Restore this database's logical dump instead of a base backup (PostgreSQL).
    #[arg(long, value_name = "DB", requires = "target_url")]
    dump: Option<String>,
    /// Where a dump is restored: postgresql://user@host:port/newdb (a new database).
    #[arg(long, value_name = "URL")]
    target_url: Option<String>,
    #[arg(long, value_enum, default_value = "postgres")]
    engine: Engine,
    /// Prepare the data directory but do not start PostgreSQL. MySQL: stop the restored
    /// server cleanly and leave --target-dir as its data directory (what a MariaDB/MySQL
    /// container mounts at /var/lib/mysql)
    #[arg(long)]
    no_start: bool,
    /// Print the plan and stop; writes nothing.
    #[arg(long)]
    dry_run: bool,
    /// Start the restored server on this port.
    #[arg(long)]
    port: Option<u16>,
    /// Follow this timeline (PostgreSQL), e.g. one branch of a forked history, instead
    /// of the branch that continues production.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    timeline: Option<u32>,
    /// The restored server replaces production (PostgreSQL): it archives its new timeline
    /// into the repository. Without it, it archives nothing (archive_mode = off).
    #[arg(long)]
    as_primary: bool,
    /// Restore into an existing data directory of the same cluster (stopped), writing only
    /// the files and blocks that differ from the backup: a fast re-seed of a replica or a
    /// repeated drill. Needs a file-level backup.
    #[arg(long)]
    delta: bool,
    /// The restored server is a standby (PostgreSQL): standby.signal, it replays the archive
    /// and streams from the primary in its primary_conninfo, and never promotes by itself.
    /// With --delta and --no-start: the re-seed of a replica. Takes --latest.
    #[arg(long)]
    standby: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run() -> ExitCode {
    // PostgreSQL reads a restore_command's exit status up to 125 as "not archived" and ends
    // recovery there: `wal-fetch` fails with 126 whatever went wrong, even before it knows
    // its arguments (a binary replaced by one that does not take `--timeline`).
    let fetch_args = std::env::args_os().any(|a| a == "wal-fetch");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print(); // `dbagent` alone: the help, on stderr
            return ExitCode::from(crate::error::EXIT_INPUT);
        }
        Err(e) => {
            eprintln!("dbagent: error: {}", usage_line(&e.to_string()));
            return ExitCode::from(if fetch_args {
                crate::error::EXIT_ABORT_RECOVERY
            } else {
                crate::error::EXIT_INPUT
            });
        }
    };
    init_logging(&cli.command);
    // PostgreSQL starts `wal-push` once per WAL file, and its work is on blocking threads
    // (reading, compressing) or waits for the store: a second worker thread is only one more
    // thread to start. A push of a switched segment, medians of 11 (`perf stat`): 10.0
    // against 9.5 ms of CPU; of a backup history file 3.9 against 3.4. (`wal-fetch`, which
    // a restore's replay waits for, is left as it was: not measured.)
    let pushing = matches!(cli.command, Command::WalPush { .. });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if pushing { 1 } else { 2 })
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let e = anyhow::Error::new(e).context("starting the runtime");
            if fetch_args {
                return crate::error::report_with(&e, crate::error::EXIT_ABORT_RECOVERY);
            }
            return crate::error::report(&e);
        }
    };
    let fetching = matches!(cli.command, Command::WalFetch { .. });
    let result = runtime.block_on(dispatch(cli));
    // Every command has awaited whatever its result depends on (a store is durable before
    // `dispatch` returns), so nothing left on the runtime matters: idle blocking threads, a
    // reader whose consumer is gone. Dropping the runtime would join each of them first:
    // 2.5 ms of every run, `wal-push` included, which PostgreSQL's archiver waits for.
    runtime.shutdown_background();
    if let Err(e) = &result {
        if let Some(crate::error::Failure::Restart {
            why,
            in_place: true,
        }) = e.downcast_ref()
        {
            restart_in_place(why);
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if fetching => crate::error::report_with(&e, crate::error::fetch_exit_code(&e)),
        Err(e) => crate::error::report(&e),
    }
}

/// `serve` found its configuration changed and has drained: it starts again as the same
/// process (the same pid, arguments and environment; the files are read anew), so the kubelet
/// sees no container restart, with its readiness gap and its back-off (10 s, 20 s, … for a
/// second change within ten minutes, while the primary's Service has no endpoint). The HTTP
/// port is closed only while the new image starts. Returns only when the exec failed: the
/// caller then exits 3, for the supervisor to restart it the old way.
fn restart_in_place(why: &str) {
    use std::os::unix::process::CommandExt;
    tracing::warn!("{why}: serve starts again in place with the new configuration");
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "dbagent".into());
    // Every descriptor dbagent opens is close-on-exec: the listening socket goes with the old
    // image. /proc/self/exe is this binary even when its file was replaced or removed.
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .exec();
    tracing::error!(error = %err, "starting serve again in place failed: exiting 3 for the supervisor to start it");
}

/// A clap error as one line: what is wrong (the lines naming a missing argument or a tip
/// included), without its prefix, the usage block and the pointer to --help, which follows.
fn usage_line(text: &str) -> String {
    let said: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let said = said.join(" ");
    let said = said.strip_prefix("error: ").unwrap_or(&said);
    format!("{said}; see `dbagent help`")
}

fn init_logging(command: &Command) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // archive/restore commands run once per segment inside PostgreSQL's log: keep them quiet.
    let default = match command {
        Command::WalPush { .. } | Command::WalFetch { .. } | Command::WalPrefetch { .. } => "warn",
        _ => "info",
    };
    let filter = EnvFilter::try_from_env("DBAGENT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let json = match std::env::var("DBAGENT_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    // Colours only on a terminal: log files and PostgreSQL's log get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Writes a result to stdout; a closed pipe (`dbagent list | head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Prints a command's report: for people, or as JSON for scripts.
fn emit<R: std::fmt::Display + serde::Serialize>(report: &R, json: bool) -> anyhow::Result<()> {
    if json {
        return print(&(serde_json::to_string_pretty(report)? + "\n"));
    }
    let text = report.to_string();
    match text.is_empty() {
        true => Ok(()),
        false => print(&(text + "\n")),
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let flags = Overrides {
        config_file: cli.config.clone(),
        repo: cli.repo.clone(),
    };
    if let Command::Install { dir } = &cli.command {
        // Needs no configuration: it runs in an init container that has none.
        let (dest, size) = crate::install::install(dir)?;
        return print(&format!("installed {} ({size} bytes)\n", dest.display()));
    }
    if let Command::RecoveryEnd = &cli.command {
        // Needs no configuration or repository: it edits the data directory it runs in.
        return crate::restore::recovery::recovery_end(Path::new("."));
    }
    let cfg = Config::load(&flags, &ProcessEnv)?;
    for (var, near) in crate::config::keys::unknown_variables(
        std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()),
    ) {
        tracing::warn!(
            "{var} is set but dbagent reads no such variable: it has no effect{}",
            near.map_or(String::new(), |n| format!(" (did you mean {n}?)"))
        );
    }
    let store = || crate::storage::open(&cfg);
    // A writer the repository refuses (encryption keys) stops before it starts work; the
    // pipeline asks again before every write.
    let writer = || async {
        let store = store()?;
        crate::pipeline::recipients(store.as_ref()).await?;
        anyhow::Ok(store)
    };
    match cli.command {
        Command::Keygen { output } => {
            let public = crate::crypto::keys::keygen(&output)?;
            eprintln!(
                "dbagent: wrote the secret key to {}; the public key (for encryption.recipients_file) follows",
                output.display()
            );
            print(&(public + "\n"))
        }
        Command::Encryption { action } => encryption(&cfg, action).await,
        Command::WalPush { path } => crate::pg::wal::push_opening(&cfg, &path).await.map(drop),
        Command::WalFetch {
            name,
            dest,
            timeline,
        } => crate::pg::wal::fetch(&cfg, store()?, &name, &dest, timeline).await,
        Command::WalPrefetch { dir, names } => {
            crate::pg::wal::prefetch(&cfg, store()?, &dir, &names).await
        }
        Command::Backup {
            engine,
            kind,
            full,
            incremental,
            json,
        } => match (engine, kind) {
            (Engine::Mysql, _) | (_, Kind::Dump) if full || incremental => Err(input_err!(
                "--full and --incremental are for PostgreSQL base backups; a logical dump is always whole"
            )),
            (Engine::Mysql, _) => emit(
                &crate::mysql::backup_dump(&cfg, writer().await?).await?,
                json,
            ),
            (Engine::Postgres, Kind::Dump) => emit(
                &crate::pg::dump::backup_dumps(&cfg, writer().await?).await?,
                json,
            ),
            (Engine::Postgres, Kind::Base) => emit(
                &crate::pg::backup::base_backup(
                    &cfg,
                    writer().await?,
                    crate::pg::backup::Wanted::from_flags(full, incremental),
                )
                .await?,
                json,
            ),
        },
        Command::BinlogPush { json } => emit(
            &crate::mysql::binlog_push(&cfg, writer().await?).await?,
            json,
        ),
        Command::Serve { listen, engine } => {
            let with_flags = move |mut cfg: Config| {
                cfg.serve.engine = engine.unwrap_or(cfg.serve.engine);
                cfg
            };
            let reload = Box::new(move || Config::load(&flags, &ProcessEnv).map(with_flags));
            crate::serve::run(with_flags(cfg), listen, reload).await
        }
        Command::Drill {
            engine,
            at,
            random,
            latest: _,
            json,
        } => {
            let target = drill_target(at, random)?;
            let drilled = crate::drill::run(&cfg, store()?, engine, target).await?;
            emit(&drilled, json)?;
            drilled.verdict()
        }
        Command::Prune { dry_run, json } => emit(
            &crate::prune::run(&cfg, store()?.as_ref(), dry_run).await?,
            json,
        ),
        Command::Verify { full, json } => {
            let verified = crate::verify::run(&cfg, store()?, full).await?;
            emit(&verified, json)?;
            verified.verdict()
        }
        Command::List { json } => emit(&crate::list::build(store()?.as_ref()).await?, json),
        Command::Restore(args) => restore(&cfg, args).await,
        Command::Install { .. } | Command::RecoveryEnd => {
            unreachable!("handled before the configuration is loaded")
        }
    }
}

/// `dbagent encryption status|set`.
async fn encryption(cfg: &Config, action: EncryptionAction) -> anyhow::Result<()> {
    let store = crate::storage::open(cfg)?;
    let repo = cfg.repo_url()?;
    let recipients = cfg.encryption.recipients()?;
    if let EncryptionAction::Set = action {
        let Some(r) = &recipients else {
            return Err(input_err!(
                "encryption set records the keys of encryption.recipients_file: set DBAGENT_ENCRYPTION_RECIPIENTS_FILE"
            ));
        };
        // Everything the answer reads is checked before the record is written: a bad
        // identity file refuses the command without having encrypted the repository.
        cfg.encryption.identities()?;
        let rec = crate::crypto::record::set(store.as_ref(), r).await?;
        print(&format!(
            "repository {repo}: new objects are encrypted for key set {} (record {})\n",
            rec.key_set, rec.version
        ))?;
    }
    let records = crate::crypto::Records::load(store.as_ref()).await?;
    let identities = cfg.encryption.identities()?;
    print(&crate::crypto::record::describe(
        &records,
        repo,
        recipients.as_ref(),
        identities.as_ref(),
    ))
}

fn drill_target(at: Option<String>, random: bool) -> anyhow::Result<crate::drill::DrillTarget> {
    use crate::drill::DrillTarget;
    Ok(match (at, random) {
        (Some(t), _) => DrillTarget::At(crate::timespec::parse_instant(&t)?),
        (None, true) => DrillTarget::Random,
        (None, false) => DrillTarget::Latest,
    })
}

/// `dbagent restore`: which of the three restores the flags ask for.
async fn restore(cfg: &Config, args: RestoreArgs) -> anyhow::Result<()> {
    if (args.engine == Engine::Mysql || args.dump.is_some())
        && (args.timeline.is_some() || args.as_primary || args.delta || args.standby)
    {
        return Err(input_err!(
            "--timeline, --as-primary, --delta and --standby are for PostgreSQL restores from a base backup (--target-dir)"
        ));
    }
    if args.standby && (args.at.is_some() || args.timeline.is_some() || args.as_primary) {
        return Err(input_err!(
            "--standby follows the archive to its end and then its primary, on the primary's timeline: give it --latest, without --at, --timeline or --as-primary"
        ));
    }
    if args.dump.is_some() && (args.target_dir.is_some() || args.no_start || args.port.is_some()) {
        return Err(input_err!(
            "--dump loads a logical dump into the database of --target-url: --target-dir, --no-start and --port are for restoring a whole server, leave them out"
        ));
    }
    if args.no_start && args.port.is_some() {
        return Err(input_err!(
            "--port is where a restored server is left listening: with --no-start it is not started, leave --port out (start it on a port of your choosing with pg_ctl -o '-p <port>', or set port in its configuration)"
        ));
    }
    let target = match (args.at, args.latest) {
        (Some(t), false) => Target::Time(crate::timespec::parse_instant(&t)?),
        (None, true) => Target::Latest,
        _ => return Err(input_err!("give either --at <time> or --latest")),
    };
    let target_dir = args.target_dir.map(std::path::absolute).transpose()?;
    let store = crate::storage::open(cfg)?;
    let json = args.json;
    match (args.engine, args.dump) {
        (Engine::Mysql, Some(_)) => Err(input_err!(
            "--dump restores a PostgreSQL logical dump: MySQL restores always load a dump and replay binlogs"
        )),
        (Engine::Mysql, None) if args.no_start && target_dir.is_none() => Err(input_err!(
            "--no-start with --engine mysql leaves --target-dir as the restored server's data directory: give --target-dir"
        )),
        (Engine::Mysql, None) => {
            let opts = crate::mysql::MysqlRestoreOptions {
                target,
                target_dir,
                dry_run: args.dry_run,
                port: args.port,
                no_start: args.no_start,
            };
            emit(&crate::mysql::restore(cfg, store, &opts).await?, json)
        }
        (Engine::Postgres, Some(database)) => {
            let opts = crate::pg::dump::DumpRestoreOptions {
                database,
                target,
                target_url: args
                    .target_url
                    .expect("clap requires --target-url with --dump"),
                dry_run: args.dry_run,
            };
            emit(
                &crate::pg::dump::restore_dump(cfg, store, &opts).await?,
                json,
            )
        }
        (Engine::Postgres, None) => {
            let Some(target_dir) = target_dir else {
                return Err(input_err!(
                    "restore needs --target-dir <dir> (an empty or new data directory)"
                ));
            };
            let opts = crate::restore::PgRestoreOptions {
                target,
                target_dir,
                no_start: args.no_start,
                dry_run: args.dry_run,
                port: args.port,
                timeline: args.timeline,
                as_primary: args.as_primary,
                delta: args.delta,
                standby: args.standby,
            };
            emit(&crate::restore::restore_pg(cfg, store, &opts).await?, json)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn a_usage_mistake_is_one_line_naming_what_is_missing() {
        let e = Cli::try_parse_from(["dbagent", "wal-fetch"]).unwrap_err();
        let line = usage_line(&e.to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("the following required arguments were not provided: <"),
            "{line}"
        );
        assert!(
            !line.starts_with("error:") && !line.contains("Usage:"),
            "{line}"
        );
        let e = Cli::try_parse_from(["dbagent", "wal-fetch", "--bogus", "a", "b"]).unwrap_err();
        let line = usage_line(&e.to_string());
        assert!(line.contains("--bogus"), "{line}");
        let e = Cli::try_parse_from(["dbagent", "restore", "--port", "70000"]).unwrap_err();
        let line = usage_line(&e.to_string());
        assert!(
            line.contains("70000") && !line.contains("For more"),
            "{line}"
        );
    }
}
