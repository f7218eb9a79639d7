-- backup: how far archiving has got, and where WAL is being written now (no message text:
-- the server's words depend on lc_messages)
SELECT coalesce(last_archived_wal, ''),
       coalesce(last_failed_wal, ''),
       failed_count,
       pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                            ELSE pg_current_wal_lsn() END, '0/0')::bigint
  FROM pg_stat_archiver
