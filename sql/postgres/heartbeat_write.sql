-- serve: this node's heartbeat row ($1: node name, $2: the canary)
INSERT INTO dbagent.heartbeat (node, ts, lsn, timeline, canary)
VALUES ($1, clock_timestamp(), pg_current_wal_lsn(),
        (SELECT timeline_id FROM pg_control_checkpoint()), $2)
ON CONFLICT (node) DO UPDATE
   SET ts = EXCLUDED.ts, lsn = EXCLUDED.lsn, timeline = EXCLUDED.timeline, canary = EXCLUDED.canary
