-- serve: this node's heartbeat row ($1: node name, $2: the canary), written on a primary:
-- its timeline from its WAL position (pg_control's lags a promotion by a checkpoint)
INSERT INTO dbagent.heartbeat (node, ts, lsn, timeline, canary)
VALUES ($1, clock_timestamp(), pg_current_wal_lsn(),
        ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int, $2)
ON CONFLICT (node) DO UPDATE
   SET ts = EXCLUDED.ts, lsn = EXCLUDED.lsn, timeline = EXCLUDED.timeline, canary = EXCLUDED.canary
