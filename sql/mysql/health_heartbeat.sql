-- serve: the server's clock and the newest heartbeat it sees (both UTC)
SELECT DATE_FORMAT(UTC_TIMESTAMP(6), '%Y-%m-%dT%H:%i:%s.%f'), MAX(ts) FROM dbagent.heartbeat
