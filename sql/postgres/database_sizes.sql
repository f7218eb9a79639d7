-- backup: the databases a base backup holds, with their sizes
SELECT datname::text, pg_database_size(oid) FROM pg_database
 WHERE datallowconn AND NOT datistemplate ORDER BY 1
