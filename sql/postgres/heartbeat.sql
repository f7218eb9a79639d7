-- dbagent heartbeat (pt-heartbeat style): one row per node, written every second while the
-- node is a writable primary. Replicas compute lag as now() minus the newest replayed ts:
-- right on an idle primary, and still growing when replication is cut. The canary column
-- carries a fixed CJK string so every restore can prove that CJK text survived byte for byte.
CREATE SCHEMA IF NOT EXISTS dbagent;
CREATE TABLE IF NOT EXISTS dbagent.heartbeat (
    node     text PRIMARY KEY,
    ts       timestamptz NOT NULL,
    lsn      pg_lsn,
    timeline integer,
    canary   text NOT NULL
);
