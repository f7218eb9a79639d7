-- backup: tables whose engine has no transactions (MyISAM, Aria, MEMORY, CSV, Mroonga…), as
-- `schema.table engine`. A single-transaction dump reads them when it reaches them, not at its
-- snapshot: writes to them during the dump are in the dump and in the binlogs after its
-- position both. (MariaDB's system-versioned tables are tables too; FEDERATED and MERGE
-- tables' rows are not dumped, BLACKHOLE holds none.)
SELECT CONCAT(t.TABLE_SCHEMA, '.', t.TABLE_NAME, ' ', t.ENGINE)
  FROM information_schema.TABLES t
  JOIN information_schema.ENGINES e ON e.ENGINE = t.ENGINE
 WHERE t.TABLE_TYPE IN ('BASE TABLE', 'SYSTEM VERSIONED')
   AND e.TRANSACTIONS <> 'YES'
   AND UPPER(t.ENGINE) NOT IN ('FEDERATED', 'MRG_MYISAM', 'BLACKHOLE')
   AND t.TABLE_SCHEMA NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')
 ORDER BY 1
