-- logical dumps: the databases and how to create them again. {icu} is the locale provider and
-- ICU locale columns of this server version (they arrived in 15 and were renamed in 17).
SELECT datname::text, pg_get_userbyid(datdba)::text, pg_encoding_to_char(encoding)::text,
       datcollate::text, datctype::text, {icu}
  FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1
