//! PostgreSQL logical dumps: `pg_dump -Fc` per database, globals, and database-level settings.
//!
//! Each database is dumped from a snapshot exported by a REPEATABLE READ transaction that also
//! counts every table's rows (`pg_dump --snapshot`), so the manifest's exact row counts are
//! those of the dump itself. `pg_dump -Fc` restored with `pg_restore -d newdb` loses the
//! database's own settings (`ALTER DATABASE … SET default_text_search_config`, which CJK
//! search depends on): they are read from `pg_db_role_setting`, kept in the manifest and
//! re-applied by the restore. Roles come from `pg_dumpall --globals-only`; a restore creates
//! the roles the target server lacks and never changes existing ones.

mod backup;
mod globals;
mod restore;

pub use backup::{DumpReport, backup_dumps};
pub use globals::missing_role_statements;
pub use restore::{
    DumpRestoreOptions, DumpRestoreReport, TargetUrl, choose_dump, parse_target_url, restore_dump,
};
