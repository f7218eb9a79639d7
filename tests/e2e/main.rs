//! End-to-end tests against real servers: PostgreSQL 15, MariaDB and an S3 API server
//! (moto), all started as local processes by `dbagent-testcontainers`.

mod backup;
mod binstream;
mod container;
mod drill;
mod encryption;
mod faults;
mod forks;
mod incremental;
mod mysql;
mod pg_tls;
mod pgdump;
mod pitr;
mod refusals;
mod s3;
mod serve;
mod stream;
mod support;
mod tls;
mod wal;
