//! PostgreSQL: connections, programs, SQL, the control file, WAL push/fetch, base backups and
//! logical dumps.

pub mod backup;
pub mod basebackup;
pub mod bins;
pub mod conn;
pub mod control;
pub mod dump;
pub mod filebackup;
pub mod fileset;
pub mod replication;
pub mod sql;
pub mod tarscan;
pub mod tls;
pub mod wal;
pub mod walcheck;
pub mod walrefs;
pub mod walscan;
pub mod walsidecar;
pub mod walstream;
