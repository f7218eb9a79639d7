/*
 * dbagent's test stand-in for pg_cjk_parser: a text search parser that splits runs of CJK
 * characters (Han, kana, Hangul) into overlapping 2-grams, and other letters and digits into
 * words. Assumes a UTF8 database.
 */
#include "postgres.h"

#include "fmgr.h"
#include "tsearch/ts_public.h"

PG_MODULE_MAGIC;

#define TOKEN_WORD 1
#define TOKEN_CJK 2

typedef struct
{
	char	   *p;
	char	   *end;
} CjkState;

/* Length of the UTF-8 sequence at p (1 for a stray byte), never past end. */
static int
seq_len(const char *p, const char *end)
{
	unsigned char c = (unsigned char) *p;
	int			n = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;

	return n > end - p ? (int) (end - p) : n;
}

static uint32
code_point(const char *p, int n)
{
	const unsigned char *s = (const unsigned char *) p;

	switch (n)
	{
		case 2:
			return ((s[0] & 0x1F) << 6) | (s[1] & 0x3F);
		case 3:
			return ((s[0] & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
		case 4:
			return ((s[0] & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
		default:
			return s[0];
	}
}

static bool
is_cjk(uint32 c)
{
	return (c >= 0x1100 && c <= 0x11FF)		/* Hangul Jamo */
		|| (c >= 0x3040 && c <= 0x30FF)		/* Hiragana, Katakana */
		|| (c >= 0x3130 && c <= 0x318F)		/* Hangul compatibility Jamo */
		|| (c >= 0x3400 && c <= 0x4DBF)		/* CJK extension A */
		|| (c >= 0x4E00 && c <= 0x9FFF)		/* CJK unified ideographs */
		|| (c >= 0xAC00 && c <= 0xD7AF)		/* Hangul syllables */
		|| (c >= 0xF900 && c <= 0xFAFF)		/* CJK compatibility ideographs */
		|| (c >= 0x20000 && c <= 0x2FA1F);	/* CJK extensions B and later */
}

static bool
is_word(uint32 c)
{
	if (c < 0x80)
		return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
	if (c < 0xC0 || is_cjk(c))
		return false;
	/* Punctuation and symbol blocks separate words. */
	return !((c >= 0x2000 && c <= 0x2BFF) || (c >= 0x3000 && c <= 0x303F) ||
			 (c >= 0xFE30 && c <= 0xFE4F) || (c >= 0xFF00 && c <= 0xFF0F) ||
			 (c >= 0xFF1A && c <= 0xFF20));
}

PG_FUNCTION_INFO_V1(cjk_start);
Datum
cjk_start(PG_FUNCTION_ARGS)
{
	CjkState   *st = (CjkState *) palloc0(sizeof(CjkState));

	st->p = (char *) PG_GETARG_POINTER(0);
	st->end = st->p + PG_GETARG_INT32(1);
	PG_RETURN_POINTER(st);
}

PG_FUNCTION_INFO_V1(cjk_gettoken);
Datum
cjk_gettoken(PG_FUNCTION_ARGS)
{
	CjkState   *st = (CjkState *) PG_GETARG_POINTER(0);
	char	  **token = (char **) PG_GETARG_POINTER(1);
	int		   *len = (int *) PG_GETARG_POINTER(2);

	while (st->p < st->end)
	{
		int			n = seq_len(st->p, st->end);
		uint32		c = code_point(st->p, n);

		if (is_cjk(c))
		{
			char	   *second = st->p + n;
			int			n2 = second < st->end ? seq_len(second, st->end) : 0;

			*token = st->p;
			if (n2 > 0 && is_cjk(code_point(second, n2)))
			{
				char	   *third = second + n2;
				int			n3 = third < st->end ? seq_len(third, st->end) : 0;

				*len = n + n2;
				/* The next 2-gram starts at the second character, unless the run ends. */
				st->p = (n3 > 0 && is_cjk(code_point(third, n3))) ? second : third;
			}
			else
			{
				*len = n;		/* a run of one character */
				st->p = second;
			}
			PG_RETURN_INT32(TOKEN_CJK);
		}
		if (is_word(c))
		{
			*token = st->p;
			while (st->p < st->end)
			{
				n = seq_len(st->p, st->end);
				c = code_point(st->p, n);
				if (!is_word(c))
					break;
				st->p += n;
			}
			*len = (int) (st->p - *token);
			PG_RETURN_INT32(TOKEN_WORD);
		}
		st->p += n;
	}
	PG_RETURN_INT32(0);
}

PG_FUNCTION_INFO_V1(cjk_end);
Datum
cjk_end(PG_FUNCTION_ARGS)
{
	pfree(PG_GETARG_POINTER(0));
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(cjk_lextype);
Datum
cjk_lextype(PG_FUNCTION_ARGS)
{
	LexDescr   *d = (LexDescr *) palloc(sizeof(LexDescr) * 3);

	d[0].lexid = TOKEN_WORD;
	d[0].alias = pstrdup("word");
	d[0].descr = pstrdup("Word, letters and digits");
	d[1].lexid = TOKEN_CJK;
	d[1].alias = pstrdup("cjk");
	d[1].descr = pstrdup("CJK 2-gram");
	d[2].lexid = 0;
	PG_RETURN_POINTER(d);
}
