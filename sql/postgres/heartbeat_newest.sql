-- drill: the newest heartbeat row of a restored server
SELECT ts::text, extract(epoch FROM ts)::float8, canary FROM dbagent.heartbeat ORDER BY ts DESC LIMIT 1
