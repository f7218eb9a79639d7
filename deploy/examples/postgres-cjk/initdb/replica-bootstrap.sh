#!/bin/bash
# Init container. A pod with an empty data directory clones itself from the primary, wherever
# the primary runs (through postgres-primary), and starts as a streaming replica. Only when no
# primary answers and no other member exists does ordinal 0 let the entrypoint initialise a
# new cluster: a pod that lost its volume never starts a second, empty primary beside a
# promoted replica.
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
  # A peer that exists (its name resolves through the headless Service, ready or not) holds
  # the cluster, promoted or about to be: a new, empty cluster beside it would be a second
  # history in the same repository. Retry (the pod restarts) until a primary answers.
  set_name=${HOSTNAME%-*}
  for i in 1 2 3 4 5 6 7 8 9; do
    if getent hosts "$set_name-$i.$set_name" >/dev/null; then
      echo "no primary answers at postgres-primary, but $set_name-$i exists: not initialising a second cluster beside it; promote it (README runbook) or wait for HAProxy to route to it" >&2
      exit 1
    fi
  done
  echo "no primary answers at postgres-primary and no other member exists: the entrypoint initialises a new cluster"
  exit 0
fi
echo "no primary answers at postgres-primary: cannot clone a replica yet" >&2
exit 1
