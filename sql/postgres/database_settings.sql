-- a database's own settings (ALTER DATABASE … SET, for every role) as name=value ($1: the database)
SELECT unnest(s.setconfig) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
 WHERE d.datname = $1 AND s.setrole = 0 ORDER BY 1
