-- backup: who the server is, and whether it archives (one row). The sizes come from the
-- control file (pg_control_init), not the pg_settings view, whose first use in a new session
-- costs a few milliseconds of catalog reads.
SELECT (SELECT system_identifier::text FROM pg_control_system()),
       current_setting('server_version'),
       current_setting('server_version_num')::int,
       c.bytes_per_wal_segment::bigint,
       current_setting('archive_mode'),
       pg_is_in_recovery(),
       c.database_block_size::bigint,
       c.blocks_per_segment::bigint
  FROM pg_control_init() c
