#!/bin/bash
# Runs once, when the official image's entrypoint initialises an empty data directory on the
# primary. Roles for replication and for dbagent; passwords come from the mounted Secrets and
# reach psql through its environment (`\getenv`), never its argv, which any user on the node
# can read in /proc. The entrypoint sources this file (a ConfigMap file is not executable), so
# it runs under the entrypoint's own `set -e` and must not change the shell's options.
# (Read first, each on its own: a Secret that cannot be read stops the entrypoint.)
replication_password=$(cat /var/run/secrets/postgres/replication-password)
dbagent_password=$(cat /var/run/secrets/dbagent/postgres/password)
REPLICATION_PASSWORD=$replication_password ROLE_DBAGENT_PASSWORD=$dbagent_password \
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv replication_password REPLICATION_PASSWORD
\getenv dbagent_password ROLE_DBAGENT_PASSWORD
CREATE ROLE replicator LOGIN REPLICATION PASSWORD :'replication_password';
-- The sidecar (over the socket) and the Jobs (over the network): base backups need
-- REPLICATION, `pg_dumpall --globals-only` and `restore --dump` need a superuser.
CREATE ROLE dbagent LOGIN SUPERUSER PASSWORD :'dbagent_password';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
echo "host replication dbagent all scram-sha-256" >> "$PGDATA/pg_hba.conf"
unset replication_password dbagent_password
