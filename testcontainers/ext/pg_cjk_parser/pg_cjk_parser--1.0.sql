-- dbagent's test stand-in for pg_cjk_parser: the same parser and configuration names, so a
-- restore drill runs its parser checks against a real extension.
\echo Use "CREATE EXTENSION pg_cjk_parser" to load this file. \quit

CREATE FUNCTION cjk_start(internal, int4) RETURNS internal
    AS 'MODULE_PATHNAME' LANGUAGE C STRICT;
CREATE FUNCTION cjk_gettoken(internal, internal, internal) RETURNS internal
    AS 'MODULE_PATHNAME' LANGUAGE C STRICT;
CREATE FUNCTION cjk_end(internal) RETURNS void
    AS 'MODULE_PATHNAME' LANGUAGE C STRICT;
CREATE FUNCTION cjk_lextype(internal) RETURNS internal
    AS 'MODULE_PATHNAME' LANGUAGE C STRICT;

CREATE TEXT SEARCH PARSER pg_cjk_parser (
    START = cjk_start,
    GETTOKEN = cjk_gettoken,
    END = cjk_end,
    LEXTYPES = cjk_lextype,
    HEADLINE = pg_catalog.prsd_headline
);

CREATE TEXT SEARCH CONFIGURATION config_2_gram_cjk (PARSER = pg_cjk_parser);
ALTER TEXT SEARCH CONFIGURATION config_2_gram_cjk ADD MAPPING FOR word, cjk WITH simple;
