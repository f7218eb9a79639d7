-- drill: the newest heartbeat row of a restored server
SELECT ts, canary FROM dbagent.heartbeat ORDER BY ts DESC LIMIT 1
