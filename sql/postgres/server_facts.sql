-- backup: who the server is, and whether it archives (one row)
SELECT (SELECT system_identifier::text FROM pg_control_system()),
       current_setting('server_version'),
       current_setting('server_version_num')::int,
       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
       current_setting('archive_mode'),
       pg_is_in_recovery()
