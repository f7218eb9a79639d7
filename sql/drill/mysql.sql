-- dbagent restore drill: MySQL/MariaDB smoke suite (utf8mb4 and CJK).
-- Same format as postgres.sql: `-- check: <name>` before each query; it passes when it returns
-- one row whose first column is true (1).

-- check: CJK and emoji text round-trips byte for byte through utf8mb4
SELECT HEX(CONVERT(_utf8mb4'野比大雄 のび太 대한민국 🐘' USING utf8mb4)) = 'E9878EE6AF94E5A4A7E99B8420E381AEE381B3E5A4AA20EB8C80ED959CEBAFBCEAB5AD20F09F9098';

-- check: CJK text compares equal under a utf8mb4 collation
SELECT _utf8mb4'のび太' COLLATE utf8mb4_bin = CONVERT(_utf8mb4'のび太' USING utf8mb4);
