-- serve: role, positions and versions (one row, every refresh)
SELECT pg_is_in_recovery(),
       current_setting('server_version_num')::bigint,
       current_setting('server_version'),
       (SELECT system_identifier::text FROM pg_control_system()),
       -- A primary's timeline from its WAL position, as Patroni reads it: pg_control's
       -- changes only with the first checkpoint after a promotion (spread over minutes).
       CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
       pg_postmaster_start_time(),
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint END,
       CASE WHEN pg_is_in_recovery() THEN pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::bigint END,
       CASE WHEN pg_is_in_recovery() THEN pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint END,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END,
       pg_last_xact_replay_timestamp(),
       current_setting('default_transaction_read_only')::bool
