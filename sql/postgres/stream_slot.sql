-- serve.wal_stream: the WAL the streaming slot holds back on the server, and its state
-- (`lost` once max_slot_wal_keep_size invalidated it). $1: the slot name.
SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END
        - restart_lsn)::bigint,
       wal_status
  FROM pg_replication_slots
 WHERE slot_name = $1
