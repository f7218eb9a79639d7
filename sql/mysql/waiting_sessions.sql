-- backup: this account's other sessions that wait for a lock (the dump's FLUSH TABLES WITH
-- READ LOCK behind a long query or LOCK TABLES, or its reads behind a metadata lock), and
-- for how many seconds. STATE is the server's own (never translated) thread state.
SELECT ID, TIME, STATE, COALESCE(LEFT(INFO, 200), '')
  FROM information_schema.PROCESSLIST
 WHERE USER = SUBSTRING_INDEX(CURRENT_USER(), '@', 1)
   AND ID <> CONNECTION_ID()
   AND STATE LIKE 'Waiting for%'
