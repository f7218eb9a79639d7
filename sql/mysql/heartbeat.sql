-- dbagent heartbeat in pt-heartbeat's layout (readers: pt-heartbeat --check, ProxySQL,
-- Orchestrator, mysqld_exporter --collect.heartbeat with database dbagent, table heartbeat).
-- ts is UTC with microseconds, as pt-heartbeat --utc writes it. canary is dbagent's addition.
CREATE DATABASE IF NOT EXISTS dbagent;
CREATE TABLE IF NOT EXISTS dbagent.heartbeat (
    ts                    varchar(26) NOT NULL,
    server_id             int unsigned NOT NULL PRIMARY KEY,
    file                  varchar(255) DEFAULT NULL,
    position              bigint unsigned DEFAULT NULL,
    relay_master_log_file varchar(255) DEFAULT NULL,
    exec_master_log_pos   bigint unsigned DEFAULT NULL,
    canary                varchar(255) CHARACTER SET utf8mb4 DEFAULT NULL
) DEFAULT CHARSET = utf8mb4;
