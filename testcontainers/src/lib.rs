//! Test support for dbagent: real PostgreSQL, MariaDB and S3 (moto) servers started as local
//! processes, each on a free port in a temporary directory and stopped on drop, and a
//! fault-injecting proxy to put in front of the S3 server, and a TCP relay whose connections
//! can be frozen, to put in front of a database server.
//!
//! No Docker: the servers come from the local installation (see `./scripts/setup`). A missing
//! binary is an error with a clear message, never a skip. When a test fails (the thread is
//! panicking while a server is dropped), the tail of the server log is printed to stderr and
//! the temporary directory is kept for inspection.
//!
//! PostgreSQL refuses to run as root; when the tests run as root, `initdb`, `pg_ctl` and the
//! server run as the `postgres` OS user (`runuser -u postgres --`) in directories chowned to it.

mod cjk;
mod faults;
mod mariadb;
mod postgres;
mod relay;
mod s3;
mod tls;
mod util;
mod walseg;

pub use cjk::{CjkParser, install_cjk_parser};
pub use faults::{Fault, FaultProxy, Rule, RuleId, Seen};
pub use mariadb::{MariaDb, MariaDbBuilder, mariadb_bin, mariadb_replica_pair, replica_status};
pub use postgres::{
    DEFAULT_PG_BIN_DIR, PG_OS_USER, Postgres, PostgresBuilder, command_as_pg_user, pg_bin,
    pg_bin_dir, pg_owned_tempdir,
};
pub use relay::TcpRelay;
pub use s3::{S3Server, moto_server_path};
pub use tls::{CertPair, TestCa, TlsProxy};
pub use util::{free_port, http_request, is_root, log_tail, workspace_root};
pub use walseg::{Fill, wal_segment};
