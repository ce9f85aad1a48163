/* A request's phases in one C call each, as the data path runs them (decision 2300).
 *
 * `headers_phase` is `phases.headers_phase_py`: the plugins shown a LiveHeaderMap (the
 * pseudo-headers, then the data path's own CIMultiDict, which their edits change in place:
 * decision 2500) and driven over it, and the pseudo-header the data path watches read
 * back if an edit named a pseudo-header. `body_phase` is `body_phase_py`, for a response
 * body read whole; `stream_info` is `stream_info_py`.
 *
 * The map, the buffer and the stream info are copies of templates that `phases.py`
 * makes with the classes' own constructors (as `_streams.h` copies contexts), with what
 * differs per request set after.
 */

static PyObject *p_map_template, *p_buffer_template, *p_info_template;
static PyObject *p_touched, *p_request_id, *p_traceparent, *p_tracestate, *p_span,
    *p_connection, *p_route_name, *p_cluster_name, *p_start_time_ns;

static int
init_phases(void)
{
    p_touched = PyUnicode_InternFromString("touched");
    p_request_id = PyUnicode_InternFromString("request_id");
    p_traceparent = PyUnicode_InternFromString("traceparent");
    p_tracestate = PyUnicode_InternFromString("tracestate");
    p_span = PyUnicode_InternFromString("span");
    p_connection = PyUnicode_InternFromString("connection");
    p_route_name = PyUnicode_InternFromString("route_name");
    p_cluster_name = PyUnicode_InternFromString("cluster_name");
    p_start_time_ns = PyUnicode_InternFromString("start_time_ns");
    return p_touched && p_request_id && p_traceparent && p_tracestate && p_span &&
                   p_connection && p_route_name && p_cluster_name && p_start_time_ns
               ? 0
               : -1;
}

/* phases.edited_pseudo: the watched pseudo-header's value (a new reference) if an edit
 * named a pseudo-header, else None; NULL with an exception. */
static PyObject *
edited_pseudo(PyObject *hmap, PyObject *watched)
{
    int touched = attr_true(hmap, p_touched);
    if (touched <= 0)
        return touched < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *found = live_pseudo(hmap, watched);
    return found != NULL ? found : PyObject_CallMethodOneArg(hmap, s_get, watched);
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

static int
phases_configured(void)
{
    if (p_map_template != NULL && d_continue != NULL)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "the compiled phases are not configured");
    return 0;
}

/* A header phase over `streams` (a list): what headers_phase answers. `pseudo` is a list
 * the map keeps, `watched` an ASCII str. */
static PyObject *
run_headers_phase(PyObject *streams, long phase, PyObject *pseudo, PyObject *headers,
                  PyObject *eos, PyObject *code, PyObject *watched)
{
    PyObject *values[MAP_SET] = {pseudo, headers};
    PyObject *hmap = filled_copy(p_map_template, p_map_offsets, values, MAP_SET);
    PyObject *stopped = hmap ? drive_streams(streams, 0, phase, hmap, eos, code) : NULL;
    PyObject *out = NULL;
    if (stopped != NULL && stopped != Py_None)
        out = PyTuple_Pack(2, hmap, stopped);
    else if (stopped != NULL)
        out = edited_pseudo(hmap, watched);
    Py_XDECREF(stopped);
    Py_XDECREF(hmap);
    return out;
}

/* headers_phase(streams, phase, pseudo, headers, end_of_stream, code, watched) */
static PyObject *
headers_phase(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[2]) ||
        !PyUnicode_Check(args[6]) || !PyUnicode_IS_COMPACT_ASCII(args[6])) {
        PyErr_SetString(PyExc_TypeError, "headers_phase(streams: list, phase, pseudo: list, "
                                         "headers, end_of_stream, code, watched: ASCII str)");
        return NULL;
    }
    if (!phases_configured())
        return NULL;
    long phase = PyLong_AsLong(args[1]);
    if (phase == -1 && PyErr_Occurred())
        return NULL;
    if (phase != PHASE_REQUEST_HEADERS && phase != PHASE_RESPONSE_HEADERS) {
        PyErr_Format(PyExc_ValueError, "not a header phase: %ld", phase);
        return NULL;
    }
    return run_headers_phase(args[0], phase, args[2], args[3], args[4], args[5], args[6]);
}

/* A response body read whole through `streams` (a list): what body_phase answers. */
static PyObject *
run_body_phase(PyObject *streams, PyObject *body)
{
    PyObject *data = PyByteArray_FromObject(body);
    PyObject *values[BUFFER_SET] = {data};
    PyObject *buffer =
        data ? filled_copy(p_buffer_template, p_buffer_offsets, values, BUFFER_SET) : NULL;
    Py_XDECREF(data);
    PyObject *stopped =
        buffer ? drive_streams(streams, 0, PHASE_RESPONSE_BODY, buffer, Py_True, Py_None) : NULL;
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
    return run_body_phase(args[0], args[1]);
}

/* A StreamInfo of the 7 values stream_info takes, started now. */
static PyObject *
new_stream_info(PyObject *const *args)
{
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
    return new_stream_info(args);
}

/* configure_phases(map_template, buffer_template, info_template): the map a
 * LiveHeaderMap (its type is what the fast paths edit in place). */
static PyObject *
configure_phases(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "configure_phases(map_template, buffer_template, info_template)");
        return NULL;
    }
    PyObject *map_set[MAP_SET] = {s_pseudo, s_headers};
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
    live_map_type = Py_TYPE(args[0]); /* the template holds the type */
    Py_RETURN_NONE;
}
