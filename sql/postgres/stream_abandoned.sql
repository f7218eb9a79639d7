-- serve.wal_stream: ends the server's side of a replication connection the stream gave up as
-- silent (its walsender still holds the slot until wal_sender_timeout) and waits up to 5 s for
-- it to go. Only that process: a walsender of this user, named dbagent, on this slot.
-- $1: the walsender's pid (BackendKeyData of the connection given up), $2: the slot name.
SELECT pg_terminate_backend(a.pid, 5000)
  FROM pg_stat_activity a
  JOIN pg_replication_slots s ON s.active_pid = a.pid
 WHERE a.pid = $1
   AND a.backend_type = 'walsender'
   AND a.usename = current_user
   AND a.application_name = 'dbagent'
   AND s.slot_name = $2
