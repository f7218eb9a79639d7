-- serve: this server's heartbeat row (?: the time as pt-heartbeat --utc writes it, the canary)
REPLACE INTO dbagent.heartbeat (ts, server_id, canary) VALUES (?, @@server_id, ?)
