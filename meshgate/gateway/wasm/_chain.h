/* PluginChain's per-request methods, compiled (decision 2600).
 *
 * `filters.PluginChain` is the data path's side of a plugged request: `start` opens its
 * streams, and `begin_request_headers`, `begin_response_headers` and
 * `begin_whole_response_body` run one phase each. Around the compiled phases these were
 * still six Python frames a request (`start`, `_stream_info`, `__init__` and the three
 * phases). Here each is a C method: `compile_chain` answers them as descriptors of the
 * class, which filters.py sets on it; its own definitions stay the reference the tests
 * hold these to. A chain is a copy of a template, as `_streams.h` copies streams.
 *
 * A phase that a plugin did not settle goes on in Python, through the same methods the
 * reference calls (`_request_rest`, `_response_rest`, `_body_rest`).
 */

static PyObject *c_chain_template, *c_start_py; /* NULL until compile_chain */
static PyObject *c_reversed, *c_limit, *c_path, *c_status, *c_responded, *c_body_exists,
    *c_scheme, *c_transport, *c_x_request_id, *c_empty, *c_method_key, *c_path_key,
    *c_authority_key, *c_scheme_key, *c_status_key, *c_request_rest, *c_response_rest,
    *c_body_rest;

enum { CHAIN_SET = 3 }; /* streams, reversed_streams, limit */
static Py_ssize_t c_chain_offsets[CHAIN_SET];

static int
init_chain(void)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    INTERN(c_reversed, "reversed_streams");
    INTERN(c_limit, "limit");
    INTERN(c_path, "path");
    INTERN(c_status, "status");
    INTERN(c_responded, "responded");
    INTERN(c_body_exists, "body_exists");
    INTERN(c_scheme, "scheme");
    INTERN(c_transport, "transport");
    INTERN(c_x_request_id, "x-request-id");
    INTERN(c_empty, "");
    INTERN(c_method_key, ":method");
    INTERN(c_path_key, ":path");
    INTERN(c_authority_key, ":authority");
    INTERN(c_scheme_key, ":scheme");
    INTERN(c_status_key, ":status");
    INTERN(c_request_rest, "_request_rest");
    INTERN(c_response_rest, "_response_rest");
    INTERN(c_body_rest, "_body_rest");
#undef INTERN
    return 0;
}

static int
chain_configured(void)
{
    if (c_chain_template != NULL && phases_configured())
        return 1;
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_RuntimeError, "the compiled chain is not configured");
    return 0;
}

/* PluginChain.start's reference, called with `cls` first (keywords, a subclass, a `w3c`
 * that is no pair: whatever the compiled start does not take). */
static PyObject *
start_in_python(PyObject *cls, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t total = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *with_cls[16];
    if (total + 1 > 16) {
        PyErr_SetString(PyExc_TypeError, "PluginChain.start: too many arguments");
        return NULL;
    }
    with_cls[0] = cls;
    for (Py_ssize_t i = 0; i < total; i++)
        with_cls[i + 1] = args[i];
    return PyObject_Vectorcall(c_start_py, with_cls, (size_t)nargs + 1, kwnames);
}

/* The request's StreamInfo, as filters._stream_info builds it: a new reference or NULL. */
static PyObject *
chain_stream_info(PyObject *request, PyObject *span, PyObject *w3c, PyObject *route,
                  PyObject *cluster)
{
    PyObject *traceparent = Py_None, *tracestate = Py_None;
    if (w3c != Py_None) {
        traceparent = PyTuple_GET_ITEM(w3c, 0);
        tracestate = PyTuple_GET_ITEM(w3c, 1);
        int given = PyObject_IsTrue(tracestate);
        if (given < 0)
            return NULL;
        tracestate = given ? tracestate : Py_None;
    }
    PyObject *headers = PyObject_GetAttr(request, s_headers);
    PyObject *get_args[3] = {headers, c_x_request_id, c_empty};
    PyObject *request_id =
        headers ? PyObject_VectorcallMethod(s_get, get_args, 3, NULL) : NULL;
    PyObject *transport = request_id ? PyObject_GetAttr(request, c_transport) : NULL;
    PyObject *info = NULL;
    if (transport != NULL) {
        PyObject *values[7] = {request_id, traceparent, tracestate, span, transport, route,
                               cluster};
        info = new_stream_info(values);
    }
    Py_XDECREF(headers);
    Py_XDECREF(request_id);
    Py_XDECREF(transport);
    return info;
}

/* PluginChain.start(plugins, request, span, limit, w3c, route_name="", cluster_name="") */
static PyObject *
chain_start(PyObject *cls, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (!chain_configured())
        return NULL;
    int plain = (kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0) && nargs >= 5 &&
                nargs <= 7 && cls == (PyObject *)Py_TYPE(c_chain_template) &&
                (PyTuple_CheckExact(args[0]) || PyList_CheckExact(args[0])) &&
                (args[4] == Py_None ||
                 (PyTuple_CheckExact(args[4]) && PyTuple_GET_SIZE(args[4]) == 2));
    if (!plain)
        return start_in_python(cls, args, nargs, kwnames);
    PyObject *route = nargs > 5 ? args[5] : c_empty, *cluster = nargs > 6 ? args[6] : c_empty;
    PyObject *info = chain_stream_info(args[1], args[2], args[4], route, cluster);
    PyObject *streams = info ? open_stream_list(args[0], info) : NULL;
    PyObject *reversed = streams ? PyList_GetSlice(streams, 0, PyList_GET_SIZE(streams)) : NULL;
    PyObject *chain = NULL;
    if (reversed != NULL && PyList_Reverse(reversed) == 0) {
        PyObject *values[CHAIN_SET] = {streams, reversed, args[3]};
        chain = filled_copy(c_chain_template, c_chain_offsets, values, CHAIN_SET);
    }
    Py_XDECREF(info);
    Py_XDECREF(streams);
    Py_XDECREF(reversed);
    return chain;
}

/* The request's pseudo-headers, as the reference lists them: a new list or NULL. */
static PyObject *
request_pseudo(PyObject *method, PyObject *path, PyObject *request)
{
    PyObject *authority = PyObject_GetAttr(request, d_host);
    PyObject *scheme = authority ? PyObject_GetAttr(request, c_scheme) : NULL;
    PyObject *pseudo = scheme ? PyList_New(4) : NULL;
    PyObject *names[4] = {c_method_key, c_path_key, c_authority_key, c_scheme_key};
    PyObject *values[4] = {method, path, authority, scheme};
    for (int i = 0; pseudo != NULL && i < 4; i++) {
        PyObject *item = PyTuple_Pack(2, names[i], values[i]);
        if (item == NULL)
            Py_CLEAR(pseudo);
        else
            PyList_SET_ITEM(pseudo, i, item);
    }
    Py_XDECREF(authority);
    Py_XDECREF(scheme);
    return pseudo;
}

/* begin_request_headers(method, path, headers, request) */
static PyObject *
chain_request_headers(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "begin_request_headers(method, path, headers, request)");
        return NULL;
    }
    if (!chain_configured())
        return NULL;
    int has_body = truth_of(PyObject_GetAttr(args[3], c_body_exists));
    if (has_body < 0)
        return NULL;
    PyObject *end = has_body ? Py_False : Py_True;
    PyObject *streams = GETATTR(self, d_streams);
    PyObject *pseudo = streams ? request_pseudo(args[0], args[1], args[3]) : NULL;
    PyObject *out = NULL;
    if (pseudo != NULL && !PyList_CheckExact(streams))
        PyErr_SetString(PyExc_TypeError, "PluginChain.streams is not a list");
    else if (pseudo != NULL)
        out = run_headers_phase(streams, PHASE_REQUEST_HEADERS, pseudo, args[2], end, Py_None,
                                c_path_key);
    Py_XDECREF(streams);
    Py_XDECREF(pseudo);
    if (out == NULL || PyTuple_CheckExact(out)) { /* unsettled: the rest in Python */
        PyObject *rest = out ? PyObject_CallMethodObjArgs(self, c_request_rest, out, end, NULL)
                             : NULL;
        Py_XDECREF(out);
        return rest;
    }
    int rc = SETATTR(self, c_path, out); /* None, or the :path a plugin set */
    Py_DECREF(out);
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

/* filters._status_code: the status a settled response phase answered (`int(out)` when
 * out is ASCII digits, else None): a new reference or NULL. */
static PyObject *
status_of(PyObject *out)
{
    if (!PyUnicode_Check(out) || !PyUnicode_IS_ASCII(out) || PyUnicode_GET_LENGTH(out) == 0)
        return Py_NewRef(Py_None);
    const Py_UCS1 *chars = PyUnicode_1BYTE_DATA(out);
    for (Py_ssize_t i = 0; i < PyUnicode_GET_LENGTH(out); i++)
        if (chars[i] < '0' || chars[i] > '9')
            return Py_NewRef(Py_None);
    return PyLong_FromUnicodeObject(out, 10);
}

/* begin_response_headers(status, headers) */
static PyObject *
chain_response_headers(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "begin_response_headers(status, headers)");
        return NULL;
    }
    if (!chain_configured() || SETATTR(self, c_responded, Py_True) < 0)
        return NULL;
    PyObject *streams = GETATTR(self, c_reversed);
    PyObject *code = streams ? PyObject_Str(args[0]) : NULL;
    PyObject *item = code ? PyTuple_Pack(2, c_status_key, code) : NULL;
    PyObject *pseudo = item ? PyList_New(1) : NULL;
    if (pseudo != NULL)
        PyList_SET_ITEM(pseudo, 0, Py_NewRef(item));
    PyObject *out = NULL;
    if (pseudo != NULL && !PyList_CheckExact(streams))
        PyErr_SetString(PyExc_TypeError, "PluginChain.reversed_streams is not a list");
    else if (pseudo != NULL)
        out = run_headers_phase(streams, PHASE_RESPONSE_HEADERS, pseudo, args[1], Py_False,
                                args[0], c_status_key);
    Py_XDECREF(streams);
    Py_XDECREF(code);
    Py_XDECREF(item);
    Py_XDECREF(pseudo);
    if (out == NULL || PyTuple_CheckExact(out)) {
        PyObject *rest = out ? PyObject_CallMethodObjArgs(self, c_response_rest, out, args[0],
                                                          NULL)
                             : NULL;
        Py_XDECREF(out);
        return rest;
    }
    int rc = 0;
    if (out != Py_None) { /* the :status a plugin set; one that is no number: None */
        PyObject *status = status_of(out);
        rc = status == NULL ? -1 : SETATTR(self, c_status, status);
        Py_XDECREF(status);
    }
    Py_DECREF(out);
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

/* begin_whole_response_body(body) */
static PyObject *
chain_whole_response_body(PyObject *self, PyObject *body)
{
    if (!chain_configured())
        return NULL;
    PyObject *streams = GETATTR(self, c_reversed);
    if (streams == NULL)
        return NULL;
    PyObject *out = NULL;
    if (!PyList_CheckExact(streams))
        PyErr_SetString(PyExc_TypeError, "PluginChain.reversed_streams is not a list");
    else
        out = run_body_phase(streams, body);
    Py_DECREF(streams);
    if (out == NULL || PyBytes_CheckExact(out))
        return out;
    PyObject *rest = PyObject_CallMethodOneArg(self, c_body_rest, out);
    Py_DECREF(out);
    return rest;
}

static PyMethodDef chain_start_def = {
    "start", (PyCFunction)(void (*)(void))chain_start, METH_FASTCALL | METH_KEYWORDS,
    "start(plugins, request, span, limit, w3c, route_name='', cluster_name=''): a "
    "request's chain, its streams open (compiled PluginChain.start)."};

static PyMethodDef chain_method_defs[] = {
    {"begin_request_headers", (PyCFunction)(void (*)(void))chain_request_headers,
     METH_FASTCALL,
     "begin_request_headers(method, path, headers, request): the request headers' phase; "
     "None when settled, else what is left to await (compiled)."},
    {"begin_response_headers", (PyCFunction)(void (*)(void))chain_response_headers,
     METH_FASTCALL,
     "begin_response_headers(status, headers): the response headers' phase, as "
     "begin_request_headers (compiled)."},
    {"begin_whole_response_body", (PyCFunction)chain_whole_response_body, METH_O,
     "begin_whole_response_body(body): the body after the plugins, or what is left to "
     "await (compiled)."},
    {NULL, NULL, 0, NULL},
};

/* compile_chain(template, start): `template` a PluginChain as its __init__ leaves it,
 * `start` the function PluginChain.start wraps. Answers {name: descriptor} for the class
 * to take. */
static PyObject *
compile_chain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "compile_chain(template, start: callable)");
        return NULL;
    }
    PyObject *set_after[CHAIN_SET] = {d_streams, c_reversed, c_limit};
    Py_ssize_t offsets[CHAIN_SET];
    if (check_template(args[0], set_after, CHAIN_SET) < 0 ||
        slot_offsets(args[0], set_after, CHAIN_SET, offsets) < 0)
        return NULL;
    PyTypeObject *tp = Py_TYPE(args[0]);
    PyObject *methods = PyDict_New();
    PyObject *start = methods ? PyDescr_NewClassMethod(tp, &chain_start_def) : NULL;
    int rc = start == NULL || PyDict_SetItemString(methods, "start", start) < 0 ? -1 : 0;
    Py_XDECREF(start);
    for (PyMethodDef *def = chain_method_defs; rc == 0 && def->ml_name != NULL; def++) {
        PyObject *method = PyDescr_NewMethod(tp, def);
        rc = method == NULL || PyDict_SetItemString(methods, def->ml_name, method) < 0 ? -1 : 0;
        Py_XDECREF(method);
    }
    if (rc < 0) {
        Py_XDECREF(methods);
        return NULL;
    }
    memcpy(c_chain_offsets, offsets, sizeof offsets);
    Py_XSETREF(c_chain_template, Py_NewRef(args[0]));
    Py_XSETREF(c_start_py, Py_NewRef(args[1]));
    return methods;
}
