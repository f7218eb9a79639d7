-- serve, on a primary: every standby and its replay lag in bytes
SELECT usename::text, application_name, client_addr::text, state, sync_state, sync_priority,
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint
  FROM pg_stat_replication ORDER BY application_name, client_addr::text
