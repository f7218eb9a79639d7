-- restore: the databases that hold anything (tables, views, sequences, routines, events).
-- An empty database, like the `test` one mariadb-install-db creates, is not a reason to
-- refuse a restore target.
SELECT s.SCHEMA_NAME
  FROM information_schema.SCHEMATA s
 WHERE EXISTS (SELECT 1 FROM information_schema.TABLES t WHERE t.TABLE_SCHEMA = s.SCHEMA_NAME)
    OR EXISTS (SELECT 1 FROM information_schema.ROUTINES r WHERE r.ROUTINE_SCHEMA = s.SCHEMA_NAME)
    OR EXISTS (SELECT 1 FROM information_schema.EVENTS e WHERE e.EVENT_SCHEMA = s.SCHEMA_NAME)
 ORDER BY 1
