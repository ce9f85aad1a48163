/* match_record_span(args): the `wasi:tracing/record-span` argument check, compiled.
 *
 * `meshgate/otel/wasi_tracing.py` answers a record-span call without an exporter from a
 * pattern (`_FAST_RECORD_PATTERN`) instead of a JSON decode: an argument it matches in
 * full is valid JSON with every field record-span needs. The pattern cost 3-4 µs a span
 * on the auth plugin's spans, the largest piece of a plugged request's Python
 * (decision 1100). This is the same language as a hand-written scanner: every repeat of
 * the pattern is possessive and every optional group starts with a fixed key, so one
 * forward pass decides. It returns what the pattern's two groups capture,
 * (start_unix_nanos, end_unix_nanos) as bytes, or None where the pattern does not match.
 * tests/unit/wasm/test_record_span_match.py holds the two equal over generated inputs.
 */

typedef struct {
    const unsigned char *p, *end;
} scan;

static void
skip_ws(scan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

/* The exact bytes `lit` (NUL-terminated) next, consumed. */
static int
take(scan *s, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, lit, n) != 0)
        return 0;
    s->p += n;
    return 1;
}

/* WS* `c` WS* : the punctuation between tokens. */
static int
punct(scan *s, char c)
{
    skip_ws(s);
    if (s->p >= s->end || *s->p != (unsigned char)c)
        return 0;
    s->p++;
    skip_ws(s);
    return 1;
}

static int
is_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* A string of printable ASCII with JSON escapes (no control or non-ASCII bytes). */
static int
string(scan *s)
{
    if (s->p >= s->end || *s->p != '"')
        return 0;
    s->p++;
    while (s->p < s->end) {
        unsigned char c = *s->p++;
        if (c == '"')
            return 1;
        if (c < 0x20 || c >= 0x80)
            return 0;
        if (c != '\\')
            continue;
        if (s->p >= s->end)
            return 0;
        c = *s->p++;
        if (c == 'u') {
            for (int i = 0; i < 4; i++, s->p++)
                if (s->p >= s->end || !is_hex(*s->p))
                    return 0;
        } else if (!strchr("\"\\/bfnrt", c) || c == '\0') {
            return 0;
        }
    }
    return 0;
}

static int
digits(scan *s)
{
    const unsigned char *from = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
        s->p++;
    return s->p > from;
}

/* -?(0|[1-9][0-9]*) */
static int
integer(scan *s)
{
    if (s->p < s->end && *s->p == '-')
        s->p++;
    if (s->p >= s->end || *s->p < '0' || *s->p > '9')
        return 0;
    if (*s->p == '0') {
        s->p++;
        return 1;
    }
    return digits(s);
}

/* integer, then an optional fraction and exponent, each needing a digit once started. */
static int
number(scan *s)
{
    if (!integer(s))
        return 0;
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (!digits(s))
            return 0;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        if (!digits(s))
            return 0;
    }
    return 1;
}

static int
value(scan *s)
{
    if (s->p >= s->end)
        return 0;
    if (*s->p == '"')
        return string(s);
    if (*s->p == 't')
        return take(s, "true");
    if (*s->p == 'f')
        return take(s, "false");
    return number(s);
}

/* "key" WS* ':' WS* */
static int
key(scan *s, const char *name)
{
    return take(s, name) && punct(s, ':');
}

static int
one_of(scan *s, const char *const *words)
{
    for (; *words != NULL; words++)
        if (take(s, *words))
            return 1;
    return 0;
}

/* '{' already taken: pairs up to and with the closing '}'. */
static int
attributes(scan *s)
{
    skip_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return 1;
    }
    for (;;) {
        if (!string(s) || !punct(s, ':') || !value(s))
            return 0;
        skip_ws(s);
        if (s->p < s->end && *s->p == '}') {
            s->p++;
            return 1;
        }
        if (!punct(s, ','))
            return 0;
    }
}

static int
status(scan *s)
{
    static const char *const codes[] = {"\"unset\"", "\"ok\"", "\"error\"", NULL};
    if (!punct(s, '{') || !key(s, "\"code\"") || !one_of(s, codes))
        return 0;
    skip_ws(s);
    if (s->p < s->end && *s->p == ',') {
        if (!punct(s, ',') || !key(s, "\"message\"") || !string(s))
            return 0;
        skip_ws(s);
    }
    return take(s, "}");
}

/* Whether the next thing, after WS* ',' WS*, is `name` (consumed with its ':'). Leaves the
 * position unchanged if not: the pattern's optional groups all start this way. */
static int
next_key(scan *s, const char *name)
{
    const unsigned char *at = s->p;
    if (punct(s, ',') && key(s, name))
        return 1;
    s->p = at;
    return 0;
}

/* WS* ',' WS* "name" WS* ':' WS* integer, the integer's extent in [*from, *to). */
static int
int_field(scan *s, const char *name, const unsigned char **from, const unsigned char **to)
{
    if (!punct(s, ',') || !key(s, name))
        return 0;
    *from = s->p;
    if (!integer(s))
        return 0;
    *to = s->p;
    return 1;
}

static PyObject *scan_record_span(const unsigned char *data, Py_ssize_t len);

static PyObject *
match_record_span(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = scan_record_span((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
scan_record_span(const unsigned char *data, Py_ssize_t len)
{
    static const char *const kinds[] = {"\"internal\"", "\"server\"", "\"client\"",
                                        "\"producer\"", "\"consumer\"", NULL};
    scan s = {data, data + len};
    const unsigned char *start_at, *start_end, *end_at, *end_end;
    skip_ws(&s);
    if (!take(&s, "{"))
        Py_RETURN_NONE;
    skip_ws(&s);
    if (!key(&s, "\"name\"") || !string(&s))
        Py_RETURN_NONE;
    if (next_key(&s, "\"kind\"") && !one_of(&s, kinds))
        Py_RETURN_NONE;
    if (!int_field(&s, "\"start_unix_nanos\"", &start_at, &start_end) ||
        !int_field(&s, "\"end_unix_nanos\"", &end_at, &end_end))
        Py_RETURN_NONE;
    if (next_key(&s, "\"attributes\"") && !(take(&s, "{") && attributes(&s)))
        Py_RETURN_NONE;
    if (next_key(&s, "\"status\"") && !status(&s))
        Py_RETURN_NONE;
    if (!punct(&s, '}') || s.p != s.end)
        Py_RETURN_NONE;
    return Py_BuildValue("(y#y#)", start_at, (Py_ssize_t)(start_end - start_at), end_at,
                         (Py_ssize_t)(end_end - end_at));
}
