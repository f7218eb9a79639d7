//! dbagent: PostgreSQL and MySQL/MariaDB HA sidecar and backup agent.

pub mod cli;
pub mod config;
pub mod crypto;
pub mod drill;
pub mod error;
pub mod health;
pub mod heartbeat;
pub mod http;
pub mod install;
pub mod leftovers;
pub mod list;
pub mod metrics;
pub mod mysql;
pub mod notify;
pub mod pg;
pub mod pipeline;
pub mod proc;
pub mod prune;
pub mod repo;
pub mod restore;
pub mod schedule;
pub mod serve;
pub mod storage;
pub mod timespec;
pub mod tls;
pub mod verify;
