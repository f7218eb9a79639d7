-- backup: the databases a base backup holds (their sizes are read beside the backup, each on
-- its own connection: pg_database_size reads every file's size)
SELECT datname::text FROM pg_database
 WHERE datallowconn AND NOT datistemplate ORDER BY 1
