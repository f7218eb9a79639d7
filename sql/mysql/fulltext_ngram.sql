-- drill (MySQL): a FULLTEXT index with the n-gram parser finds CJK text
CREATE DATABASE IF NOT EXISTS dbagent_drill;
CREATE TABLE dbagent_drill.ft (body TEXT, FULLTEXT (body) WITH PARSER ngram) DEFAULT CHARSET = utf8mb4;
INSERT INTO dbagent_drill.ft VALUES ('ドラえもん のび太の牧場物語 多拉A梦 野比大雄'), ('unrelated text');
