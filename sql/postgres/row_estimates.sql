-- backup: every table's row estimate ($1: how many tables at most)
SELECT format('%I.%I', n.nspname, c.relname), c.reltuples::bigint
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg_toast%'
 ORDER BY 1 LIMIT $1
