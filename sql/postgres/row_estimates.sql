-- backup: every table's row estimate ($1: how many tables at most). A table never vacuumed or
-- analyzed has no reltuples (-1): its live rows from the statistics system stand in (0 after
-- a crash reset them: then not compared), so that a table loaded and backed up before its
-- first ANALYZE is still compared by the drill.
SELECT format('%I.%I', n.nspname, c.relname),
       CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint
            ELSE coalesce(nullif(pg_stat_get_live_tuples(c.oid), 0), -1) END
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg_toast%'
 ORDER BY 1 LIMIT $1
