-- backup: base tables whose engine has no transactions (MyISAM, Aria, MEMORY, CSV, Mroonga…),
-- as `schema.table engine`. A single-transaction dump reads them when it reaches them, not at
-- its snapshot: writes to them during the dump are in the dump and in the binlogs after its
-- position both.
SELECT CONCAT(t.TABLE_SCHEMA, '.', t.TABLE_NAME, ' ', t.ENGINE)
  FROM information_schema.TABLES t
  JOIN information_schema.ENGINES e ON e.ENGINE = t.ENGINE
 WHERE t.TABLE_TYPE = 'BASE TABLE'
   AND e.TRANSACTIONS <> 'YES'
   AND t.TABLE_SCHEMA NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')
 ORDER BY 1
