-- logical dumps: the current database's settings, per role (NULL: for every role)
SELECT r.rolname::text, c
  FROM pg_db_role_setting s
  LEFT JOIN pg_roles r ON r.oid = s.setrole
 CROSS JOIN LATERAL unnest(s.setconfig) c
 WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
 ORDER BY s.setrole, c
