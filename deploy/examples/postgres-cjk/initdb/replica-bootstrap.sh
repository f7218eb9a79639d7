#!/bin/bash
# Init container. A pod with an empty data directory clones itself from the primary, wherever
# the primary runs (through postgres-primary), and starts as a streaming replica. Only when no
# primary answers does ordinal 0 let the entrypoint initialise a new cluster: a pod that lost
# its volume never starts a second, empty primary beside a promoted replica.
set -euo pipefail
if [ -s "$PGDATA/PG_VERSION" ]; then
  echo "data directory exists: nothing to do"
  exit 0
fi
if pg_isready --host=postgres-primary --timeout=5 >/dev/null; then
  PGPASSWORD=$(cat /var/run/secrets/postgres/replication-password)
  export PGPASSWORD
  exec pg_basebackup --host=postgres-primary --username=replicator --pgdata="$PGDATA" \
    --write-recovery-conf --wal-method=stream --checkpoint=fast --progress
fi
if [ "${HOSTNAME##*-}" = "0" ]; then
  echo "no primary answers at postgres-primary: the entrypoint initialises a new cluster"
  exit 0
fi
echo "no primary answers at postgres-primary: cannot clone a replica yet" >&2
exit 1
