//! Command-line definitions and dispatch. Parses, resolves the configuration once, calls the
//! domain code and prints; nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, Overrides, ProcessEnv};
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
pub enum Engine {
    Postgres,
    Mysql,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Kind {
    Base,
    Dump,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    },
    /// Download WAL ahead of replay (started by wal-fetch).
    #[command(hide = true)]
    WalPrefetch { dir: PathBuf, names: Vec<String> },
    /// Take a backup: a PostgreSQL base backup over the network.
    Backup {
        #[arg(long, value_enum, default_value = "postgres")]
        engine: Engine,
        #[arg(long, value_enum, default_value = "base")]
        kind: Kind,
    },
    /// List backups and the restorable window.
    List {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Restore to a point in time into an empty data directory, then start and promote.
    Restore {
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
        /// The new data directory: must be absent or empty.
        #[arg(long, value_name = "DIR")]
        target_dir: PathBuf,
        #[arg(long, value_enum, default_value = "postgres")]
        engine: Engine,
        /// Prepare the data directory but do not start PostgreSQL.
        #[arg(long)]
        no_start: bool,
        /// Print the plan and stop; writes nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start the restored server on this port.
        #[arg(long)]
        port: Option<u16>,
    },
}

pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(&cli.command);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return crate::error::report(&anyhow::Error::new(e).context("starting the runtime"));
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::error::report(&e),
    }
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let flags = Overrides {
        config_file: cli.config.clone(),
        repo: cli.repo.clone(),
    };
    let cfg = Config::load(&flags, &ProcessEnv)?;
    match cli.command {
        Command::WalPush { path } => {
            let store = crate::storage::open(&cfg)?;
            crate::pg::wal::push(&cfg, store.as_ref(), &path).await?;
        }
        Command::WalFetch { name, dest } => {
            let store = crate::storage::open(&cfg)?;
            crate::pg::wal::fetch(&cfg, store, &name, &dest).await?;
        }
        Command::WalPrefetch { dir, names } => {
            let store = crate::storage::open(&cfg)?;
            crate::pg::wal::prefetch(&cfg, store, &dir, &names).await?;
        }
        Command::Backup { engine, kind } => {
            if engine != Engine::Postgres || kind != Kind::Base {
                return Err(input_err!(
                    "backup --engine {engine:?} --kind {kind:?} is not available in this version: only PostgreSQL base backups are",
                ));
            }
            let store = crate::storage::open(&cfg)?;
            let started = std::time::Instant::now();
            let m = crate::pg::backup::base_backup(&cfg, store).await?;
            print(&format!(
                "backup {} complete in {:.1}s: {} read, {} stored, WAL {}..{}, consistent at {}\n",
                m.id,
                started.elapsed().as_secs_f64(),
                crate::restore::human(m.data.plain_bytes),
                crate::restore::human(m.data.stored_bytes),
                m.start_wal,
                m.stop_wal,
                crate::timespec::show(m.stop_time)
            ))?;
        }
        Command::List { json } => {
            let store = crate::storage::open(&cfg)?;
            let listing = crate::list::build(store.as_ref()).await?;
            if json {
                print(&(serde_json::to_string_pretty(&listing)? + "\n"))?;
            } else {
                print(&crate::list::render_text(&listing))?;
            }
        }
        Command::Restore {
            at,
            latest,
            target_dir,
            engine,
            no_start,
            dry_run,
            port,
        } => {
            if engine != Engine::Postgres {
                return Err(input_err!(
                    "restore --engine mysql is not available in this version"
                ));
            }
            let target = match (at, latest) {
                (Some(t), false) => Target::Time(crate::timespec::parse_instant(&t)?),
                (None, true) => Target::Latest,
                _ => return Err(input_err!("give either --at <time> or --latest")),
            };
            let store = crate::storage::open(&cfg)?;
            let opts = crate::restore::PgRestoreOptions {
                target,
                target_dir: std::path::absolute(&target_dir)?,
                no_start,
                dry_run,
                port,
            };
            crate::restore::restore_pg(&cfg, store, &opts).await?;
        }
    }
    Ok(())
}
