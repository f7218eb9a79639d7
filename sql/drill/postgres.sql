-- dbagent restore drill: PostgreSQL smoke suite (CJK full-text search).
--
-- Each check is one query preceded by `-- check: <name>`; it passes when it returns one row
-- whose first column is true. `-- requires: <extension>` runs the check only in databases
-- that have the extension (the drill says it skipped it otherwise); `-- database: <name>`
-- runs it only there. Extra suites in this format: drill.extra_suites in the config.

-- check: the server encoding is UTF8
SELECT current_setting('server_encoding') = 'UTF8';

-- check: CJK and emoji text round-trips byte for byte
SELECT convert_to(t, 'UTF8') = '\xe9878ee6af94e5a4a7e99b8420e381aee381b3e5a4aa20eb8c80ed959cebafbceab5ad20f09f909820cf87cea8cf88cea9cf89'::bytea
  FROM (VALUES ('野比大雄 のび太 대한민국 🐘 χΨψΩω')) AS v(t);

-- check: CJK text sorts and compares in the database's collation without error
SELECT count(*) = 3 FROM (SELECT t FROM (VALUES ('野比大雄'), ('のび太'), ('대한민국')) AS v(t) ORDER BY t) AS sorted;

-- requires: pg_cjk_parser
-- check: the pg_cjk_parser text search parser exists
SELECT EXISTS (SELECT 1 FROM pg_ts_parser WHERE prsname = 'pg_cjk_parser');

-- requires: pg_cjk_parser
-- check: the config_2_gram_cjk configuration exists
SELECT EXISTS (SELECT 1 FROM pg_ts_config c JOIN pg_namespace n ON n.oid = c.cfgnamespace
                WHERE c.cfgname = 'config_2_gram_cjk' AND n.nspname = 'public');

-- requires: pg_cjk_parser
-- check: Japanese search: のび太 is found in the Doraemon sample
SELECT to_tsvector('public.config_2_gram_cjk', 'Doraemnon Nobita「ドラえもん のび太の牧場物語」多拉A梦 野比大雄χΨψΩω')
       @@ plainto_tsquery('public.config_2_gram_cjk', 'のび太');

-- requires: pg_cjk_parser
-- check: Chinese search: 野比大雄 is found in the Doraemon sample
SELECT to_tsvector('public.config_2_gram_cjk', 'Doraemnon Nobita「ドラえもん のび太の牧場物語」多拉A梦 野比大雄χΨψΩω')
       @@ plainto_tsquery('public.config_2_gram_cjk', '野比大雄');

-- requires: pg_cjk_parser
-- check: Korean search: 大韩민국개인정보 is found in the privacy-law sample
SELECT to_tsvector('public.config_2_gram_cjk', '大韩민국개인정보의 수집 및 이용 목적(「개인정보 보호법」 제15조)')
       @@ plainto_tsquery('public.config_2_gram_cjk', '大韩민국개인정보');

-- requires: pg_trgm
-- check: CJK trigram similarity works
SELECT similarity('野比大雄のび太', '野比大雄のび') > 0.3;
