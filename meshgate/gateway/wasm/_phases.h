/* A request's phases in one C call each, as the data path runs them (decision 2300).
 *
 * `headers_phase` is `phases.headers_phase_py`: the header map built (pseudo-headers
 * first), the plugins driven over it, their edits written back onto the data path's
 * headers, and the edited pseudo-header read back. `body_phase` is `body_phase_py`, for
 * a response body read whole; `stream_info` is `stream_info_py`. In Python these were
 * eight frames a plugged request around the compiled `drive_phase`.
 *
 * The map, the buffer and the stream info are copies of templates that `phases.py`
 * makes with the classes' own constructors (as `_streams.h` copies contexts), with what
 * differs per request set after. A map whose edits cannot be replayed (its log is None
 * after `replace_all`) is written back by the Python reference, `phases.write_back`.
 */

static PyObject *p_map_template, *p_buffer_template, *p_info_template, *p_write_back;
static PyObject *p_mutable, *p_add, *p_popall, *p_request_id, *p_traceparent,
    *p_tracestate, *p_span, *p_connection, *p_route_name, *p_cluster_name,
    *p_start_time_ns;

static int
init_phases(void)
{
    p_mutable = PyUnicode_InternFromString("mutable");
    p_add = PyUnicode_InternFromString("add");
    p_popall = PyUnicode_InternFromString("popall");
    p_request_id = PyUnicode_InternFromString("request_id");
    p_traceparent = PyUnicode_InternFromString("traceparent");
    p_tracestate = PyUnicode_InternFromString("tracestate");
    p_span = PyUnicode_InternFromString("span");
    p_connection = PyUnicode_InternFromString("connection");
    p_route_name = PyUnicode_InternFromString("route_name");
    p_cluster_name = PyUnicode_InternFromString("cluster_name");
    p_start_time_ns = PyUnicode_InternFromString("start_time_ns");
    return p_mutable && p_add && p_popall && p_request_id && p_traceparent && p_tracestate &&
                   p_span && p_connection && p_route_name && p_cluster_name && p_start_time_ns
               ? 0
               : -1;
}

/* One logged edit (op, name, value) replayed on `headers`; pseudo-headers are not there.
 * `*touched` becomes 1 if the edit names `watched`. */
static int
replay_edit(PyObject *headers, PyObject *edit, PyObject *watched, int *touched)
{
    if (!PyTuple_CheckExact(edit) || PyTuple_GET_SIZE(edit) != 3) {
        PyErr_SetString(PyExc_TypeError, "a header map's log holds (op, name, value)");
        return -1;
    }
    PyObject *name = PyTuple_GET_ITEM(edit, 1), *value = PyTuple_GET_ITEM(edit, 2);
    if (PyUnicode_Check(name) && PyUnicode_GET_LENGTH(name) > 0 &&
        PyUnicode_READ_CHAR(name, 0) == ':') {
        int same = PyUnicode_Compare(name, watched);
        if (same == -1 && PyErr_Occurred())
            return -1;
        *touched |= same == 0;
        return 0;
    }
    long op = PyLong_AsLong(PyTuple_GET_ITEM(edit, 0));
    if (op == -1 && PyErr_Occurred())
        return -1;
    PyObject *out;
    if (op == EDIT_SET)
        return PyObject_SetItem(headers, name, value);
    if (op == EDIT_ADD)
        out = PyObject_CallMethodObjArgs(headers, p_add, name, value, NULL);
    else
        out = PyObject_CallMethodObjArgs(headers, p_popall, name, Py_None, NULL);
    Py_XDECREF(out);
    return out == NULL ? -1 : 0;
}

/* phases.write_back(hmap, headers), compiled for a map whose log is a list. `*touched`
 * becomes 1 if an edit named `watched`, or if the map was replaced whole. */
static int
write_back_edits(PyObject *hmap, PyObject *headers, PyObject *watched, int *touched)
{
    PyObject *log = GETATTR(hmap, s_log);
    if (log == NULL)
        return -1;
    int rc = 0;
    if (PyList_CheckExact(log)) {
        /* By index, each edit held while replayed: a mapping other than CIMultiDict
         * could run code that edits the map. */
        for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(log); i++) {
            PyObject *edit = Py_NewRef(PyList_GET_ITEM(log, i));
            rc = replay_edit(headers, edit, watched, touched);
            Py_DECREF(edit);
        }
    } else { /* None after replace_all: the reference rebuilds the headers */
        *touched = 1;
        PyObject *out = PyObject_CallFunctionObjArgs(p_write_back, hmap, headers, NULL);
        rc = out == NULL ? -1 : 0;
        Py_XDECREF(out);
    }
    Py_DECREF(log);
    return rc;
}

/* The first value of `name` in the map, a new reference (None if absent), or NULL. */
static PyObject *
first_value(PyObject *hmap, PyObject *name)
{
    PyObject *items = GETATTR(hmap, s_items);
    if (items == NULL)
        return NULL;
    PyObject *found = Py_None;
    for (Py_ssize_t i = 0; PyList_CheckExact(items) && i < PyList_GET_SIZE(items); i++) {
        PyObject *kv = PyList_GET_ITEM(items, i);
        if (PyTuple_CheckExact(kv) && PyTuple_GET_SIZE(kv) == 2 &&
            PyUnicode_Check(PyTuple_GET_ITEM(kv, 0)) &&
            PyUnicode_Compare(PyTuple_GET_ITEM(kv, 0), name) == 0) {
            found = PyTuple_GET_ITEM(kv, 1);
            break;
        }
    }
    Py_INCREF(found);
    Py_DECREF(items);
    return found;
}

/* Where each of `names` lives in `template`'s class: a writable slot (check_template
 * made sure of that for every slot). -1 with TypeError if one is not a slot. */
static int
slot_offsets(PyObject *template, PyObject *const *names, int n, Py_ssize_t *offsets)
{
    for (int i = 0; i < n; i++) {
        PyObject *descr = _PyType_Lookup(Py_TYPE(template), names[i]);
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            PyErr_Format(PyExc_TypeError, "%s.%U is not a slot", Py_TYPE(template)->tp_name,
                         names[i]);
            return -1;
        }
        offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
    }
    return 0;
}

/* A copy of `template` with `n` slots (at `offsets`) set to `values`: a new reference or
 * NULL. */
static PyObject *
filled_copy(PyObject *template, const Py_ssize_t *offsets, PyObject *const *values, int n)
{
    PyObject *obj = copy_of(template);
    for (int i = 0; obj != NULL && i < n; i++)
        Py_XSETREF(*(PyObject **)((char *)obj + offsets[i]), Py_NewRef(values[i]));
    return obj;
}

enum { MAP_SET = 2, BUFFER_SET = 1, INFO_SET = 8 };
static Py_ssize_t p_map_offsets[MAP_SET], p_buffer_offsets[BUFFER_SET],
    p_info_offsets[INFO_SET];

/* A new header map holding `items` (stolen), with no edits and an empty log. */
static PyObject *
new_map(PyObject *items)
{
    PyObject *log = PyList_New(0);
    PyObject *values[MAP_SET] = {items, log};
    PyObject *map = log ? filled_copy(p_map_template, p_map_offsets, values, MAP_SET) : NULL;
    Py_XDECREF(log);
    Py_DECREF(items);
    return map;
}

static int
phases_configured(void)
{
    if (p_map_template != NULL && d_continue != NULL)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "the compiled phases are not configured");
    return 0;
}

/* headers_phase(streams, phase, pseudo, headers, end_of_stream, code, watched) */
static PyObject *
headers_phase(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[2]) ||
        !PyUnicode_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "headers_phase(streams: list, phase, pseudo: list, "
                                         "headers, end_of_stream, code, watched: str)");
        return NULL;
    }
    if (!phases_configured())
        return NULL;
    PyObject *streams = args[0], *headers = args[3];
    long phase = PyLong_AsLong(args[1]);
    if (phase == -1 && PyErr_Occurred())
        return NULL;
    if (phase != PHASE_REQUEST_HEADERS && phase != PHASE_RESPONSE_HEADERS) {
        PyErr_Format(PyExc_ValueError, "not a header phase: %ld", phase);
        return NULL;
    }
    PyObject *items = pairs_of(args[2], headers);
    PyObject *hmap = items ? new_map(items) : NULL;
    PyObject *stopped = hmap ? drive_streams(streams, 0, phase, hmap, args[4], args[5]) : NULL;
    if (stopped == NULL || stopped != Py_None) {
        PyObject *out = stopped ? PyTuple_Pack(2, hmap, stopped) : NULL;
        Py_XDECREF(stopped);
        Py_XDECREF(hmap);
        return out;
    }
    Py_DECREF(stopped);
    PyObject *edits = GETATTR(hmap, s_edits);
    int edited = edits ? PyObject_IsTrue(edits) : -1;
    Py_XDECREF(edits);
    PyObject *out = NULL;
    int touched = 0;
    if (edited == 0)
        out = Py_NewRef(Py_None);
    else if (edited > 0 && write_back_edits(hmap, headers, args[6], &touched) == 0)
        out = touched ? first_value(hmap, args[6]) : Py_NewRef(Py_None);
    Py_DECREF(hmap);
    return out;
}

/* body_phase(streams, body) */
static PyObject *
body_phase(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "body_phase(streams: list, body)");
        return NULL;
    }
    if (!phases_configured())
        return NULL;
    PyObject *data = PyByteArray_FromObject(args[1]);
    PyObject *values[BUFFER_SET] = {data};
    PyObject *buffer =
        data ? filled_copy(p_buffer_template, p_buffer_offsets, values, BUFFER_SET) : NULL;
    Py_XDECREF(data);
    PyObject *stopped =
        buffer ? drive_streams(args[0], 0, PHASE_RESPONSE_BODY, buffer, Py_True, Py_None) : NULL;
    PyObject *out = NULL;
    if (stopped != NULL && stopped != Py_None) {
        out = PyTuple_Pack(2, buffer, stopped);
    } else if (stopped != NULL) {
        PyObject *edited = GETATTR(buffer, d_data);
        out = edited ? PyBytes_FromObject(edited) : NULL;
        Py_XDECREF(edited);
    }
    Py_XDECREF(stopped);
    Py_XDECREF(buffer);
    return out;
}

/* stream_info(request_id, traceparent, tracestate, span, connection, route_name,
 * cluster_name) */
static PyObject *
stream_info(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "stream_info(request_id, traceparent, tracestate, "
                                         "span, connection, route_name, cluster_name)");
        return NULL;
    }
    if (!phases_configured())
        return NULL;
    struct timespec now; /* time.time_ns()'s clock */
    if (clock_gettime(CLOCK_REALTIME, &now) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *start = PyLong_FromLongLong((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    if (start == NULL)
        return NULL;
    PyObject *values[INFO_SET] = {args[0], args[1], args[2], args[3], args[4], args[5],
                                  args[6], start};
    PyObject *info = filled_copy(p_info_template, p_info_offsets, values, INFO_SET);
    Py_DECREF(start);
    return info;
}

/* configure_phases(map_template, buffer_template, info_template, write_back) */
static PyObject *
configure_phases(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "configure_phases(map_template, buffer_template, info_template, "
                        "write_back)");
        return NULL;
    }
    PyObject *map_set[MAP_SET] = {s_items, s_log};
    PyObject *buffer_set[BUFFER_SET] = {d_data};
    PyObject *info_set[INFO_SET] = {p_request_id, p_traceparent, p_tracestate, p_span,
                                    p_connection, p_route_name, p_cluster_name,
                                    p_start_time_ns};
    Py_ssize_t map_at[MAP_SET], buffer_at[BUFFER_SET], info_at[INFO_SET];
    if (check_template(args[0], map_set, MAP_SET) < 0 ||
        check_template(args[1], buffer_set, BUFFER_SET) < 0 ||
        check_template(args[2], info_set, INFO_SET) < 0 ||
        slot_offsets(args[0], map_set, MAP_SET, map_at) < 0 ||
        slot_offsets(args[1], buffer_set, BUFFER_SET, buffer_at) < 0 ||
        slot_offsets(args[2], info_set, INFO_SET, info_at) < 0)
        return NULL;
    memcpy(p_map_offsets, map_at, sizeof map_at);
    memcpy(p_buffer_offsets, buffer_at, sizeof buffer_at);
    memcpy(p_info_offsets, info_at, sizeof info_at);
    Py_XSETREF(p_map_template, Py_NewRef(args[0]));
    Py_XSETREF(p_buffer_template, Py_NewRef(args[1]));
    Py_XSETREF(p_info_template, Py_NewRef(args[2]));
    Py_XSETREF(p_write_back, Py_NewRef(args[3]));
    Py_RETURN_NONE;
}
