#!/bin/bash
# Runs once, when the official image's entrypoint initialises an empty data directory: the
# account dbagent uses (sidecar and Jobs). The password comes from the mounted Secret, never
# from argv. The entrypoint sources this file (a ConfigMap file is not executable), which is
# what makes docker_process_sql available; it runs under the entrypoint's own `set -e`.
password=$(cat /var/run/secrets/dbagent/mysql/password)
docker_process_sql --database=mysql <<SQL
CREATE USER IF NOT EXISTS 'dbagent'@'%' IDENTIFIED BY '${password//\'/\'\'}';
-- Dumps (--single-transaction, routines, events, users), binlog shipping and rotation,
-- replication status, the heartbeat.
GRANT SELECT, RELOAD, LOCK TABLES, PROCESS, SHOW VIEW, EVENT, TRIGGER,
      REPLICATION CLIENT, REPLICATION SLAVE, BINLOG MONITOR, SLAVE MONITOR ON *.* TO 'dbagent'@'%';
GRANT ALL ON dbagent.* TO 'dbagent'@'%';
SQL
unset password
