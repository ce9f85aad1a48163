/* Compiled fast paths for the host functions a plugin calls on every request
 * (decision 1000): header value get/replace/add/remove and the clock.
 *
 * Each one handles only the common case, exactly as the Python method in imports.py
 * does, reading the same Python objects (the running host's effective context, its
 * HeaderMap's `_items` list, the VM's GuestMemory and allocator). Anything else (an
 * access past the memory size the host last saw, a non-ASCII header name, map types
 * other than the stream's four, a map with a repeated name that `set` would collapse)
 * returns FALLBACK before changing anything, and the Python method runs instead.
 *
 * Return values: HANDLED (result written), FALLBACK (run the Python method), RAISED
 * (a Python exception is set: the trampoline's error path decides, as for Python).
 */
#include <time.h>

enum {
    FAST_NONE = 0,
    FAST_GET_HEADER,
    FAST_REPLACE_HEADER,
    FAST_ADD_HEADER,
    FAST_REMOVE_HEADER,
    FAST_CURRENT_TIME,
    FAST_INCREMENT_METRIC,
    FAST_GET_SHARED_DATA,
    FAST_SET_SHARED_DATA,
    FAST_CALL_FOREIGN,
    FAST_GET_PROPERTY,
    FAST_COUNT
};

enum { HANDLED = 1, FALLBACK = 0, RAISED = -1 };

/* proxy_status_t values answered here. */
enum { ST_OK = 0, ST_NOT_FOUND = 1, ST_BAD_ARGUMENT = 2, ST_CAS_MISMATCH = 8 };

#define KEY_MAX 256

static PyObject *s_t, *s_effective, *s_vm, *s_mem, *s_base, *s_size, *s_alloc, *s_call,
    *s_items, *s_check, *s_maps[4], *s_services, *s_metrics,
    *s_metrics_table, *s_type, *s_value, *s_shared_data, *s_data, *s_next_cas, *s_identity,
    *s_vm_id, *s_call_foreign, *s_pseudo, *s_headers, *s_get, *s_add, *s_popall;
/* headers.LiveHeaderMap, set by configure_phases(); NULL until then. */
static PyTypeObject *live_map_type;
static PyObject *guest_memory_error; /* set by configure(); NULL until then */
/* properties.get_property, set by configure_properties(); NULL: the Python method runs. */
static PyObject *get_property_fn;

static int
init_fast_paths(void)
{
    static const char *maps[4] = {"request_headers", "request_trailers", "response_headers",
                                  "response_trailers"};
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) \
        return -1;
    INTERN(s_t, "t");
    INTERN(s_effective, "_effective");
    INTERN(s_vm, "vm");
    INTERN(s_mem, "mem");
    INTERN(s_base, "base");
    INTERN(s_size, "size");
    INTERN(s_alloc, "_alloc");
    INTERN(s_call, "call");
    INTERN(s_items, "_items");
    INTERN(s_check, "check");
    INTERN(s_services, "services");
    INTERN(s_metrics, "metrics");
    INTERN(s_metrics_table, "_metrics");
    INTERN(s_type, "type");
    INTERN(s_value, "value");
    INTERN(s_shared_data, "shared_data");
    INTERN(s_data, "_data");
    INTERN(s_next_cas, "_next_cas");
    INTERN(s_identity, "identity");
    INTERN(s_vm_id, "vm_id");
    INTERN(s_call_foreign, "call_foreign");
    INTERN(s_pseudo, "pseudo");
    INTERN(s_headers, "headers");
    INTERN(s_get, "get");
    INTERN(s_add, "add");
    INTERN(s_popall, "popall");
    for (int i = 0; i < 4; i++)
        INTERN(s_maps[i], maps[i]);
#undef INTERN
    return 0;
}

static int
add_fast_path_names(PyObject *m)
{
    static const char *names[FAST_COUNT] = {
        NULL, "proxy_get_header_map_value", "proxy_replace_header_map_value",
        "proxy_add_header_map_value", "proxy_remove_header_map_value",
        "proxy_get_current_time_nanoseconds", "proxy_increment_metric",
        "proxy_get_shared_data", "proxy_set_shared_data", "proxy_call_foreign_function",
        "proxy_get_property"};
    PyObject *table = PyDict_New();
    if (table == NULL)
        return -1;
    for (int i = 1; i < FAST_COUNT; i++) {
        PyObject *v = PyLong_FromLong(i);
        if (v == NULL || PyDict_SetItemString(table, names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(table);
            return -1;
        }
        Py_DECREF(v);
    }
    return PyModule_AddObject(m, "FAST_PATHS", table);
}

/* The running plugin's memory and VM. References are new; release with guest_release. */
typedef struct {
    PyObject *host, *vm, *mem;
    uint8_t *base;
    uint64_t size;
} Guest;

static void
guest_release(Guest *g)
{
    Py_XDECREF(g->host);
    Py_XDECREF(g->vm);
    Py_XDECREF(g->mem);
}

/* A new reference as an unsigned 64-bit value, the reference released; -1 on error.
 * PyLong_AsSize_t, not PyLong_AsUnsignedLongLong: the latter takes a generic byte-array
 * conversion for any int over 30 bits, and the guest's base address is one, read on every
 * host call. */
_Static_assert(sizeof(size_t) == sizeof(uint64_t), "64-bit hosts only");
static int
u64_of(PyObject *v, uint64_t *out)
{
    if (v == NULL)
        return -1;
    *out = PyLong_AsSize_t(v);
    Py_DECREF(v);
    return (*out == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

static int
guest_size(Guest *g)
{
    uint64_t base;
    if (u64_of(GETATTR(g->mem, s_base), &base) < 0 ||
        u64_of(GETATTR(g->mem, s_size), &g->size) < 0)
        return -1;
    g->base = (uint8_t *)(uintptr_t)base;
    return 0;
}

/* 0 on success; FALLBACK with no exception if the objects are not what we expect. */
static int
guest_load(HostFunction *h, Guest *g)
{
    memset(g, 0, sizeof *g);
    g->host = GETATTR(h->state, s_t);
    if (g->host == NULL || g->host == Py_None)
        goto fallback;
    g->vm = GETATTR(g->host, s_vm);
    if (g->vm == NULL)
        goto fallback;
    g->mem = GETATTR(g->vm, s_mem);
    if (g->mem == NULL || guest_size(g) < 0)
        goto fallback;
    return 0;
fallback:
    PyErr_Clear();
    guest_release(g);
    memset(g, 0, sizeof *g);
    return -1;
}

static inline int
in_bounds(const Guest *g, uint64_t ptr, uint64_t len)
{
    return ptr + len <= g->size;
}

static inline void
put_u32(const Guest *g, uint32_t at, uint32_t value)
{
    memcpy(g->base + at, &value, 4); /* wasm memory is little-endian, as x86-64 and arm64 */
}

/* The effective context's header map `map_type` (0-3): *map is a new reference or NULL
 * (the context has no such map: NOT_FOUND). FALLBACK for anything else. */
static int
effective_map(const Guest *g, uint32_t map_type, PyObject **map)
{
    *map = NULL;
    if (map_type > 3)
        return FALLBACK;
    PyObject *ctx = GETATTR(g->host, s_effective);
    if (ctx == NULL) {
        PyErr_Clear();
        return FALLBACK;
    }
    static attr_cache maps_cache[4]; /* one per map type: the name differs */
    PyObject *m = cached_getattr(ctx, s_maps[map_type], &maps_cache[map_type]);
    Py_DECREF(ctx);
    if (m == NULL) { /* a root context: let Python answer */
        PyErr_Clear();
        return FALLBACK;
    }
    if (m == Py_None) {
        Py_DECREF(m);
        return HANDLED;
    }
    *map = m;
    return HANDLED;
}

/* The lower-cased ASCII header name at [ptr, ptr+len) as a new str, or NULL (FALLBACK:
 * out of bounds, too long or not ASCII; no exception set unless allocation failed). */
static PyObject *
ascii_key(const Guest *g, uint32_t ptr, uint32_t len)
{
    char buf[KEY_MAX];
    if (len > KEY_MAX || !in_bounds(g, ptr, len))
        return NULL;
    const uint8_t *src = g->base + ptr;
    for (uint32_t i = 0; i < len; i++) {
        uint8_t c = src[i];
        if (c >= 0x80)
            return NULL;
        buf[i] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
    }
    return PyUnicode_FromStringAndSize(buf, len);
}

/* name == key, for a stored name (any str) and a lower-cased ASCII key. */
static inline int
same_ascii(PyObject *name, PyObject *key)
{
    if (!PyUnicode_Check(name))
        return 0;
    if (!PyUnicode_IS_COMPACT_ASCII(name)) { /* rare: compare as Python would */
        int cmp = PyUnicode_Compare(name, key);
        if (cmp == -1 && PyErr_Occurred())
            PyErr_Clear();
        return cmp == 0;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(key);
    return PyUnicode_GET_LENGTH(name) == n &&
           memcmp(PyUnicode_DATA(name), PyUnicode_DATA(key), (size_t)n) == 0;
}

/* The HeaderMap's list if every entry is a (str, str) pair; else NULL (FALLBACK). */
static PyObject *
map_items(PyObject *map)
{
    PyObject *items = GETATTR(map, s_items);
    if (items == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyList_CheckExact(items)) {
        Py_DECREF(items);
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *kv = PyList_GET_ITEM(items, i);
        if (!PyTuple_CheckExact(kv) || PyTuple_GET_SIZE(kv) != 2) {
            Py_DECREF(items);
            return NULL;
        }
    }
    return items;
}

static void
set_status(raw_val *vals, int status)
{
    vals[0].i64 = 0;
    vals[0].i32 = status;
}

/* VM.copy_out: allocate in the guest (its malloc, a nested call), copy, write the
 * pointer and size. Bounds of the return slots were checked by the caller. */
static int
copy_out(Guest *g, const char *data, Py_ssize_t n, uint32_t ret_ptr, uint32_t ret_size)
{
    if (n == 0) {
        put_u32(g, ret_ptr, 0);
        put_u32(g, ret_size, 0);
        return 0;
    }
    PyObject *alloc = GETATTR(g->vm, s_alloc);
    if (alloc == NULL)
        return -1;
    PyObject *call = alloc == Py_None ? NULL : GETATTR(alloc, s_call);
    Py_DECREF(alloc);
    if (call == NULL) {
        if (!PyErr_Occurred()) { /* as VM.copy_out: empty return slots, then the error */
            put_u32(g, ret_ptr, 0);
            put_u32(g, ret_size, 0);
            PyErr_SetString(guest_memory_error,
                            "plugin exports no malloc/proxy_on_memory_allocate");
        }
        return -1;
    }
    PyObject *size = PyLong_FromSsize_t(n);
    PyObject *r = size ? PyObject_CallOneArg(call, size) : NULL;
    Py_DECREF(call);
    Py_XDECREF(size);
    if (r == NULL)
        return -1; /* the allocator trapped: the guest stops, as from Python */
    uint64_t ptr = PyLong_AsUnsignedLongLong(r);
    Py_DECREF(r);
    if (ptr == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    if (ptr == 0) {
        put_u32(g, ret_ptr, 0);
        put_u32(g, ret_size, 0);
        PyErr_Format(guest_memory_error, "plugin allocator returned NULL for %zd bytes", n);
        return -1;
    }
    if (!in_bounds(g, ptr, (uint64_t)n)) { /* the allocator may have grown memory */
        PyObject *at = PyLong_FromUnsignedLongLong(ptr), *len = PyLong_FromSsize_t(n);
        PyObject *rc = at && len ? PyObject_CallMethodObjArgs(g->mem, s_check, at, len, NULL)
                                 : NULL;
        Py_XDECREF(at);
        Py_XDECREF(len);
        if (rc == NULL)
            return -1;
        Py_DECREF(rc);
        if (guest_size(g) < 0)
            return -1;
    }
    memcpy(g->base + ptr, data, (size_t)n);
    put_u32(g, ret_ptr, (uint32_t)ptr);
    put_u32(g, ret_size, (uint32_t)n);
    return 0;
}

/* read_str: the guest's bytes as text, invalid UTF-8 replaced. */
static PyObject *
guest_text(const Guest *g, uint32_t ptr, uint32_t len)
{
    if (!in_bounds(g, ptr, len))
        return NULL;
    return PyUnicode_DecodeUTF8((const char *)g->base + ptr, len, "replace");
}

/* A LiveHeaderMap (decision 2500): its ordinary headers are the data path's CIMultiDict,
 * edited in place. Pseudo-header names answer FALLBACK here: Python edits those. */
static inline int
is_live(PyObject *map)
{
    return live_map_type != NULL && Py_IS_TYPE(map, live_map_type);
}

/* The live map's CIMultiDict (a new reference), or NULL, with no exception, for a
 * pseudo-header name or an unexpected map: FALLBACK. */
static PyObject *
live_headers(PyObject *map, PyObject *key)
{
    if (PyUnicode_GET_LENGTH(key) > 0 && PyUnicode_READ_CHAR(key, 0) == ':')
        return NULL;
    PyObject *headers = GETATTR(map, s_headers);
    if (headers == NULL)
        PyErr_Clear();
    return headers;
}

/* The first value of pseudo-header `key` (lower-case ASCII) in a live map's list: a new
 * reference, None if absent; NULL, with no exception, for a list that is not of pairs. */
static PyObject *
live_pseudo(PyObject *map, PyObject *key)
{
    PyObject *pseudo = GETATTR(map, s_pseudo);
    if (pseudo == NULL || !PyList_CheckExact(pseudo)) {
        Py_XDECREF(pseudo);
        PyErr_Clear();
        return NULL;
    }
    PyObject *found = Py_None;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(pseudo); i++) {
        PyObject *kv = PyList_GET_ITEM(pseudo, i);
        if (!PyTuple_CheckExact(kv) || PyTuple_GET_SIZE(kv) != 2) {
            found = NULL;
            break;
        }
        if (same_ascii(PyTuple_GET_ITEM(kv, 0), key)) {
            found = PyTuple_GET_ITEM(kv, 1);
            break;
        }
    }
    Py_XINCREF(found);
    Py_DECREF(pseudo);
    return found;
}

/* The first value of `key` in a live map: the pseudo-headers' list, or CIMultiDict.get
 * for an ordinary header. A new reference, None if absent; NULL (with an exception, or
 * without one for FALLBACK). */
static PyObject *
live_value(PyObject *map, PyObject *key)
{
    if (PyUnicode_GET_LENGTH(key) > 0 && PyUnicode_READ_CHAR(key, 0) == ':')
        return live_pseudo(map, key);
    PyObject *headers = live_headers(map, key);
    if (headers == NULL)
        return NULL;
    PyObject *args[2] = {headers, key};
    PyObject *value = PyObject_VectorcallMethod(s_get, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                                NULL);
    Py_DECREF(headers);
    return value;
}

/* The first value of `key` in a HeaderMap's list: a new reference, None if absent. */
static PyObject *
items_value(PyObject *items, PyObject *key)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *kv = PyList_GET_ITEM(items, i);
        if (same_ascii(PyTuple_GET_ITEM(kv, 0), key))
            return Py_NewRef(PyTuple_GET_ITEM(kv, 1));
    }
    Py_RETURN_NONE;
}

enum { LIVE_SET, LIVE_ADD, LIVE_REMOVE };

/* An edit of a live map's ordinary header, straight on the CIMultiDict: a replace
 * (`headers[key] = value`, which replaces the first value in place and drops the others,
 * as HeaderMap.set does), an add, or a removal. */
static int
live_edit(Guest *g, raw_val *vals, PyObject *map, PyObject *key, int op)
{
    PyObject *headers = live_headers(map, key);
    if (headers == NULL)
        return FALLBACK;
    PyObject *value = NULL, *out = NULL;
    int rc = FALLBACK;
    if (op == LIVE_REMOVE) {
        PyObject *args[3] = {headers, key, Py_None};
        out = PyObject_VectorcallMethod(s_popall, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                        NULL);
        rc = out == NULL ? RAISED : HANDLED;
    } else if ((value = guest_text(g, (uint32_t)vals[3].i32, (uint32_t)vals[4].i32)) == NULL) {
        PyErr_Clear(); /* out of bounds: Python raises the guest's error */
    } else if (op == LIVE_ADD) {
        PyObject *args[3] = {headers, key, value};
        out = PyObject_VectorcallMethod(s_add, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        rc = out == NULL ? RAISED : HANDLED;
    } else {
        rc = PyObject_SetItem(headers, key, value) < 0 ? RAISED : HANDLED;
    }
    Py_XDECREF(out);
    Py_XDECREF(value);
    Py_DECREF(headers);
    if (rc == HANDLED)
        set_status(vals, ST_OK);
    return rc;
}

/* A live edit's result, the map and key released. */
static int
live_done(int rc, PyObject *map, PyObject *key)
{
    if (rc == FALLBACK)
        PyErr_Clear();
    Py_DECREF(key);
    Py_DECREF(map);
    return rc;
}

/* proxy_get_header_map_value(map_type, key_ptr, key_size, ret_ptr, ret_size) */
static int
fast_get_header(Guest *g, raw_val *vals)
{
    uint32_t ret_ptr = (uint32_t)vals[3].i32, ret_size = (uint32_t)vals[4].i32;
    PyObject *map;
    if (effective_map(g, (uint32_t)vals[0].i32, &map) == FALLBACK)
        return FALLBACK;
    if (map == NULL) {
        set_status(vals, ST_NOT_FOUND);
        return HANDLED;
    }
    PyObject *key = ascii_key(g, (uint32_t)vals[1].i32, (uint32_t)vals[2].i32);
    PyObject *value = NULL;
    if (key != NULL && is_live(map)) {
        value = live_value(map, key);
    } else if (key != NULL) {
        PyObject *items = map_items(map);
        value = items ? items_value(items, key) : NULL;
        Py_XDECREF(items);
    }
    Py_XDECREF(key);
    Py_DECREF(map);
    if (value == NULL)
        return PyErr_Occurred() ? RAISED : FALLBACK;
    if (value == Py_None) {
        Py_DECREF(value);
        set_status(vals, ST_NOT_FOUND);
        return HANDLED;
    }
    Py_ssize_t len;
    const char *data = PyUnicode_Check(value) ? PyUnicode_AsUTF8AndSize(value, &len) : NULL;
    if (data == NULL || !in_bounds(g, ret_ptr, 4) || !in_bounds(g, ret_size, 4)) {
        Py_DECREF(value);
        PyErr_Clear();
        return FALLBACK; /* nothing allocated yet: Python answers (or raises) the same */
    }
    int rc = copy_out(g, data, len, ret_ptr, ret_size);
    Py_DECREF(value);
    if (rc < 0)
        return RAISED;
    set_status(vals, ST_OK);
    return HANDLED;
}

/* The map and lower-cased key of a header edit, with the HeaderMap's list (NULL for a
 * LiveHeaderMap); FALLBACK/HANDLED as effective_map. */
static int
edit_target(Guest *g, raw_val *vals, PyObject **map, PyObject **key, PyObject **items)
{
    *key = *items = NULL;
    if (effective_map(g, (uint32_t)vals[0].i32, map) == FALLBACK)
        return FALLBACK;
    if (*map == NULL) {
        set_status(vals, ST_NOT_FOUND);
        return HANDLED;
    }
    *key = ascii_key(g, (uint32_t)vals[1].i32, (uint32_t)vals[2].i32);
    if (*key != NULL && is_live(*map))
        return HANDLED; /* *items stays NULL: the edit goes to live_edit */
    *items = *key ? map_items(*map) : NULL;
    if (*items == NULL) {
        Py_CLEAR(*map);
        Py_CLEAR(*key);
        return FALLBACK;
    }
    return HANDLED;
}

/* proxy_{replace,add}_header_map_value(map_type, key_ptr, key_size, value_ptr, value_size) */
static int
fast_set_header(Guest *g, raw_val *vals, int add)
{
    PyObject *map, *key, *items;
    if (edit_target(g, vals, &map, &key, &items) == FALLBACK)
        return PyErr_Occurred() ? RAISED : FALLBACK;
    if (map == NULL)
        return HANDLED;
    if (items == NULL)
        return live_done(live_edit(g, vals, map, key, add ? LIVE_ADD : LIVE_SET), map, key);
    int result = FALLBACK;
    PyObject *value = guest_text(g, (uint32_t)vals[3].i32, (uint32_t)vals[4].i32);
    if (value == NULL)
        goto done;
    Py_ssize_t n = PyList_GET_SIZE(items), first = -1;
    for (Py_ssize_t i = 0; !add && i < n; i++) {
        if (same_ascii(PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0), key)) {
            if (first >= 0)
                goto done; /* a repeated name: HeaderMap.set collapses it */
            first = i;
        }
    }
    result = RAISED;
    if (first >= 0) {
        PyObject *name = PyTuple_GET_ITEM(PyList_GET_ITEM(items, first), 0);
        PyObject *pair = PyTuple_Pack(2, name, value);
        if (pair == NULL)
            goto done;
        PyList_SetItem(items, first, pair); /* steals pair */
    } else {
        PyObject *pair = PyTuple_Pack(2, key, value);
        if (pair == NULL)
            goto done;
        int rc = PyList_Append(items, pair);
        Py_DECREF(pair);
        if (rc < 0)
            goto done;
    }
    set_status(vals, ST_OK);
    result = HANDLED;
done:
    if (result == FALLBACK)
        PyErr_Clear();
    Py_XDECREF(value);
    Py_DECREF(items);
    Py_DECREF(key);
    Py_DECREF(map);
    return result;
}

/* proxy_remove_header_map_value(map_type, key_ptr, key_size) */
static int
fast_remove_header(Guest *g, raw_val *vals)
{
    PyObject *map, *key, *items;
    if (edit_target(g, vals, &map, &key, &items) == FALLBACK)
        return PyErr_Occurred() ? RAISED : FALLBACK;
    if (map == NULL)
        return HANDLED;
    if (items == NULL)
        return live_done(live_edit(g, vals, map, key, LIVE_REMOVE), map, key);
    int result = RAISED;
    Py_ssize_t n = PyList_GET_SIZE(items);
    PyObject *kept = PyList_New(0);
    if (kept == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *kv = PyList_GET_ITEM(items, i);
        if (!same_ascii(PyTuple_GET_ITEM(kv, 0), key) && PyList_Append(kept, kv) < 0)
            goto done;
    }
    if (SETATTR(map, s_items, kept) < 0)
        goto done;
    set_status(vals, ST_OK);
    result = HANDLED;
done:
    Py_XDECREF(kept);
    Py_DECREF(items);
    Py_DECREF(key);
    Py_DECREF(map);
    return result;
}

/* proxy_get_current_time_nanoseconds(ret_time): time.time_ns() */
static int
fast_current_time(Guest *g, raw_val *vals)
{
    uint32_t at = (uint32_t)vals[0].i32;
    struct timespec ts;
    if (!in_bounds(g, at, 8) || clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return FALLBACK;
    uint64_t ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    memcpy(g->base + at, &ns, 8);
    set_status(vals, ST_OK);
    return HANDLED;
}

/* getattr(getattr(obj, a), b) as a new reference, or NULL with the error cleared; each
 * use has its own attribute caches. */
#define ATTR2(obj, a, b) ({                                        \
    PyObject *mid_ = GETATTR((obj), (a));                          \
    PyObject *r_ = mid_ ? GETATTR(mid_, (b)) : NULL;               \
    Py_XDECREF(mid_);                                              \
    if (r_ == NULL)                                                \
        PyErr_Clear();                                             \
    r_; })

/* proxy_increment_metric(metric_id, delta): MetricStore.increment */
static int
fast_increment_metric(Guest *g, raw_val *vals)
{
    PyObject *store = ATTR2(g->host, s_services, s_metrics);
    PyObject *table = store ? GETATTR(store, s_metrics_table) : NULL;
    Py_XDECREF(store);
    if (table == NULL || !PyDict_CheckExact(table)) {
        Py_XDECREF(table);
        PyErr_Clear();
        return FALLBACK;
    }
    PyObject *id = PyLong_FromUnsignedLong((uint32_t)vals[0].i32);
    PyObject *metric = id ? PyDict_GetItemWithError(table, id) : NULL; /* borrowed */
    Py_XDECREF(id);
    Py_XINCREF(metric);
    Py_DECREF(table);
    if (metric == NULL) {
        if (PyErr_Occurred())
            return RAISED;
        set_status(vals, ST_NOT_FOUND);
        return HANDLED;
    }
    int result = FALLBACK;
    PyObject *type = GETATTR(metric, s_type), *value = NULL, *sum = NULL,
             *delta = NULL;
    long kind = type ? PyLong_AsLong(type) : -1;
    if (kind == -1 && PyErr_Occurred())
        goto done;
    if (kind != 0 && kind != 1) { /* histograms are recorded, not incremented */
        set_status(vals, ST_BAD_ARGUMENT);
        result = HANDLED;
        goto done;
    }
    if (kind == 0 && vals[1].i64 < 0) { /* counters only go up */
        set_status(vals, ST_BAD_ARGUMENT);
        result = HANDLED;
        goto done;
    }
    value = GETATTR(metric, s_value);
    delta = PyLong_FromLongLong(vals[1].i64);
    sum = value && delta ? PyNumber_Add(value, delta) : NULL;
    if (sum == NULL || SETATTR(metric, s_value, sum) < 0) {
        result = RAISED;
        goto done;
    }
    set_status(vals, ST_OK);
    result = HANDLED;
done:
    if (result == FALLBACK)
        PyErr_Clear();
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(delta);
    Py_XDECREF(sum);
    Py_DECREF(metric);
    return result;
}

/* The SharedDataStore's dict and the (vm_id, key) tuple for a key in guest memory. */
static int
shared_entry(Guest *g, uint32_t key_ptr, uint32_t key_size, PyObject **store, PyObject **data,
             PyObject **key)
{
    *store = *data = *key = NULL;
    if (!in_bounds(g, key_ptr, key_size))
        return FALLBACK;
    PyObject *vm_id = ATTR2(g->host, s_identity, s_vm_id);
    *store = ATTR2(g->host, s_services, s_shared_data);
    *data = *store ? GETATTR(*store, s_data) : NULL;
    PyObject *name = PyBytes_FromStringAndSize((const char *)g->base + key_ptr, key_size);
    if (vm_id && name)
        *key = PyTuple_Pack(2, vm_id, name);
    Py_XDECREF(vm_id);
    Py_XDECREF(name);
    if (*key == NULL || *data == NULL || !PyDict_CheckExact(*data)) {
        Py_CLEAR(*store);
        Py_CLEAR(*data);
        Py_CLEAR(*key);
        PyErr_Clear();
        return FALLBACK;
    }
    return HANDLED;
}

/* A stored (value: bytes, cas: int) pair, or NULL. */
static int
shared_pair(PyObject *entry, PyObject **value, uint64_t *cas)
{
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2 ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(entry, 0)))
        return -1;
    *value = PyTuple_GET_ITEM(entry, 0);
    *cas = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(entry, 1));
    if (*cas == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

/* proxy_get_shared_data(key_ptr, key_size, ret_ptr, ret_size, ret_cas) */
static int
fast_get_shared_data(Guest *g, raw_val *vals)
{
    uint32_t ret_ptr = (uint32_t)vals[2].i32, ret_size = (uint32_t)vals[3].i32,
             ret_cas = (uint32_t)vals[4].i32;
    PyObject *store, *data, *key;
    if (shared_entry(g, (uint32_t)vals[0].i32, (uint32_t)vals[1].i32, &store, &data, &key) ==
        FALLBACK)
        return FALLBACK;
    int result = FALLBACK;
    PyObject *entry = PyDict_GetItemWithError(data, key); /* borrowed */
    if (entry == NULL) {
        if (PyErr_Occurred()) {
            result = RAISED;
        } else {
            set_status(vals, ST_NOT_FOUND);
            result = HANDLED;
        }
        goto done;
    }
    PyObject *value;
    uint64_t cas;
    if (shared_pair(entry, &value, &cas) < 0 || !in_bounds(g, ret_cas, 4) ||
        !in_bounds(g, ret_ptr, 4) || !in_bounds(g, ret_size, 4))
        goto done;
    Py_INCREF(value); /* the allocator below may run anything */
    put_u32(g, ret_cas, (uint32_t)cas);
    int rc = copy_out(g, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), ret_ptr, ret_size);
    Py_DECREF(value);
    if (rc < 0) {
        result = RAISED;
        goto done;
    }
    set_status(vals, ST_OK);
    result = HANDLED;
done:
    Py_DECREF(store);
    Py_DECREF(data);
    Py_DECREF(key);
    return result;
}

/* proxy_set_shared_data(key_ptr, key_size, value_ptr, value_size, cas):
 * SharedDataStore.set, CAS values from the store's one counter (never 0). */
static int
fast_set_shared_data(Guest *g, raw_val *vals)
{
    uint32_t value_ptr = (uint32_t)vals[2].i32, value_size = (uint32_t)vals[3].i32,
             cas = (uint32_t)vals[4].i32;
    if (!in_bounds(g, value_ptr, value_size))
        return FALLBACK;
    PyObject *store, *data, *key;
    if (shared_entry(g, (uint32_t)vals[0].i32, (uint32_t)vals[1].i32, &store, &data, &key) ==
        FALLBACK)
        return FALLBACK;
    int result = RAISED;
    PyObject *next = NULL, *following = NULL, *value = NULL, *entry = NULL;
    PyObject *current = PyDict_GetItemWithError(data, key); /* borrowed */
    if (current == NULL && PyErr_Occurred())
        goto done;
    if (current != NULL && cas) {
        PyObject *stored;
        uint64_t stored_cas;
        if (shared_pair(current, &stored, &stored_cas) < 0) {
            result = FALLBACK;
            goto done;
        }
        if (stored_cas != cas) {
            set_status(vals, ST_CAS_MISMATCH);
            result = HANDLED;
            goto done;
        }
    }
    next = GETATTR(store, s_next_cas);
    uint64_t n = next ? PyLong_AsUnsignedLongLong(next) : (uint64_t)-1;
    if (n == (uint64_t)-1 && PyErr_Occurred())
        goto done;
    uint64_t after = (n + 1) & 0xFFFFFFFFu;
    following = PyLong_FromUnsignedLongLong(after ? after : 1);
    value = PyBytes_FromStringAndSize((const char *)g->base + value_ptr, value_size);
    entry = value && next ? PyTuple_Pack(2, value, next) : NULL;
    if (following == NULL || entry == NULL || PyDict_SetItem(data, key, entry) < 0 ||
        SETATTR(store, s_next_cas, following) < 0)
        goto done;
    set_status(vals, ST_OK);
    result = HANDLED;
done:
    if (result == FALLBACK)
        PyErr_Clear();
    Py_XDECREF(next);
    Py_XDECREF(following);
    Py_XDECREF(value);
    Py_XDECREF(entry);
    Py_DECREF(store);
    Py_DECREF(data);
    Py_DECREF(key);
    return result;
}

/* A Python answer `r` (stolen), `(status, bytes)`, handed to the guest: the status, and
 * on OK the bytes copied out to the return slots. `who` names the answerer in the
 * TypeError a malformed answer raises. */
static int
hand_back(Guest *g, raw_val *vals, PyObject *r, uint32_t ret_ptr, uint32_t ret_size,
          const char *who)
{
    PyObject *result = NULL;
    long status = -1;
    if (PyTuple_Check(r) && PyTuple_GET_SIZE(r) == 2) {
        status = PyLong_AsLong(PyTuple_GET_ITEM(r, 0));
        result = PyBytes_FromObject(PyTuple_GET_ITEM(r, 1));
    } else {
        PyErr_Format(PyExc_TypeError, "%s answers (status, bytes)", who);
    }
    Py_DECREF(r);
    if (result == NULL || (status == -1 && PyErr_Occurred())) {
        Py_XDECREF(result);
        return RAISED;
    }
    int rc = 0;
    if (status == ST_OK) {
        /* the Python code may have grown the guest's memory; the slots stay valid */
        if (guest_size(g) == 0)
            rc = copy_out(g, PyBytes_AS_STRING(result), PyBytes_GET_SIZE(result), ret_ptr,
                          ret_size);
        else
            rc = -1;
    }
    Py_DECREF(result);
    if (rc < 0)
        return RAISED;
    set_status(vals, (int)status);
    return HANDLED;
}

/* proxy_call_foreign_function(name_ptr, name_size, args_ptr, args_size, ret_ptr, ret_size):
 * the host's call_foreign (Python: the foreign functions are Python), without the
 * Python layer of marshalling around it. */
static int
fast_call_foreign(Guest *g, raw_val *vals)
{
    uint32_t name_ptr = (uint32_t)vals[0].i32, name_size = (uint32_t)vals[1].i32,
             args_ptr = (uint32_t)vals[2].i32, args_size = (uint32_t)vals[3].i32,
             ret_ptr = (uint32_t)vals[4].i32, ret_size = (uint32_t)vals[5].i32;
    if (!in_bounds(g, args_ptr, args_size) || !in_bounds(g, ret_ptr, 4) ||
        !in_bounds(g, ret_size, 4))
        return FALLBACK;
    PyObject *name = guest_text(g, name_ptr, name_size);
    if (name == NULL) {
        PyErr_Clear();
        return FALLBACK;
    }
    PyObject *args = PyBytes_FromStringAndSize((const char *)g->base + args_ptr, args_size);
    PyObject *r = args ? PyObject_CallMethodObjArgs(g->host, s_call_foreign, name, args, NULL)
                       : NULL;
    Py_DECREF(name);
    Py_XDECREF(args);
    if (r == NULL)
        return RAISED;
    return hand_back(g, vals, r, ret_ptr, ret_size, "a foreign function");
}

/* proxy_get_property(path_ptr, path_size, ret_ptr, ret_size): properties.get_property,
 * where Envoy's attribute names live, called from here (decision 2400). The Python
 * layer around it (the method, reading the path, and copy_out with its nested call into
 * the guest's allocator) cost a plugin that reads `source.address` on every request
 * about 13 µs. */
static int
fast_get_property(Guest *g, raw_val *vals)
{
    uint32_t path_ptr = (uint32_t)vals[0].i32, path_size = (uint32_t)vals[1].i32,
             ret_ptr = (uint32_t)vals[2].i32, ret_size = (uint32_t)vals[3].i32;
    if (get_property_fn == NULL || !in_bounds(g, path_ptr, path_size) ||
        !in_bounds(g, ret_ptr, 4) || !in_bounds(g, ret_size, 4))
        return FALLBACK;
    PyObject *ctx = GETATTR(g->host, s_effective);
    PyObject *ident = ctx ? GETATTR(g->host, s_identity) : NULL;
    if (ident == NULL) {
        Py_XDECREF(ctx);
        PyErr_Clear();
        return FALLBACK;
    }
    PyObject *path = PyBytes_FromStringAndSize((const char *)g->base + path_ptr, path_size);
    PyObject *r = path ? PyObject_CallFunctionObjArgs(get_property_fn, ctx, ident, path, NULL)
                       : NULL;
    Py_DECREF(ctx);
    Py_DECREF(ident);
    Py_XDECREF(path);
    if (r == NULL)
        return RAISED;
    return hand_back(g, vals, r, ret_ptr, ret_size, "get_property");
}

static int
run_fast_path(HostFunction *h, raw_val *vals)
{
    Guest g;
    if (guest_memory_error == NULL || guest_load(h, &g) < 0)
        return FALLBACK;
    int rc = FALLBACK;
    switch (h->fast) {
    case FAST_GET_HEADER:
        rc = fast_get_header(&g, vals);
        break;
    case FAST_REPLACE_HEADER:
        rc = fast_set_header(&g, vals, 0);
        break;
    case FAST_ADD_HEADER:
        rc = fast_set_header(&g, vals, 1);
        break;
    case FAST_REMOVE_HEADER:
        rc = fast_remove_header(&g, vals);
        break;
    case FAST_CURRENT_TIME:
        rc = fast_current_time(&g, vals);
        break;
    case FAST_INCREMENT_METRIC:
        rc = fast_increment_metric(&g, vals);
        break;
    case FAST_GET_SHARED_DATA:
        rc = fast_get_shared_data(&g, vals);
        break;
    case FAST_SET_SHARED_DATA:
        rc = fast_set_shared_data(&g, vals);
        break;
    case FAST_CALL_FOREIGN:
        rc = fast_call_foreign(&g, vals);
        break;
    case FAST_GET_PROPERTY:
        rc = fast_get_property(&g, vals);
        break;
    }
    guest_release(&g);
    return rc;
}

/* configure_properties(get_property): what the compiled proxy_get_property calls. */
static PyObject *
configure_properties(PyObject *module, PyObject *fn)
{
    if (!PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "configure_properties() takes get_property");
        return NULL;
    }
    Py_XSETREF(get_property_fn, Py_NewRef(fn));
    Py_RETURN_NONE;
}

static PyObject *
configure(PyObject *module, PyObject *error_class)
{
    if (!PyExceptionClass_Check(error_class)) {
        PyErr_SetString(PyExc_TypeError, "configure() takes the GuestMemoryError class");
        return NULL;
    }
    Py_INCREF(error_class);
    Py_XSETREF(guest_memory_error, error_class);
    Py_RETURN_NONE;
}
