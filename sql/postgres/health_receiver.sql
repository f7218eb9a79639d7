-- serve, on a replica: the WAL receiver
SELECT status, pg_wal_lsn_diff(latest_end_lsn, '0/0')::bigint, sender_host, sender_port, received_tli,
       current_user::text
  FROM pg_stat_wal_receiver
