/* A request's streams opened in one C call (decision 1700).
 *
 * `open_streams(hosts, info)` is `stream.open_streams_py`: one `PluginHost.new_stream`
 * per plugin. In Python that is three frames a plugin (`new_stream`, `StreamContext`'s and
 * `HttpStream`'s `__init__`) on every plugged request. Here each object is a copy of a
 * template, a context and a stream as their `__init__` left them (`stream.py` makes them
 * once), with what differs per stream set after: so `__init__` stays the one definition
 * of their defaults. `configure_streams` checks once that both classes are plain slotted
 * classes (every word past the object header a slot, nothing else) and that no default a
 * copy would share is mutable.
 *
 * A host without a live VM goes to `host.new_stream(info)`, the reference, which boots one.
 */

static PyObject *s_ctx_template, *s_stream_template; /* NULL until configured */
static PyObject *o_info, *o_next_context_id, *o_new_stream;

static int
init_streams(void)
{
    o_info = PyUnicode_InternFromString("info");
    o_next_context_id = PyUnicode_InternFromString("_next_context_id");
    o_new_stream = PyUnicode_InternFromString("new_stream");
    return o_info && o_next_context_id && o_new_stream ? 0 : -1;
}

/* The member after `member` (NULL: the first), class by class along `mro`; NULL after
 * the last. */
static PyMemberDef *
next_slot(PyObject *mro, Py_ssize_t *class_index, PyMemberDef *member)
{
    if (member != NULL && member[1].name != NULL)
        return member + 1;
    while (++*class_index < PyTuple_GET_SIZE(mro)) {
        PyTypeObject *t = (PyTypeObject *)PyTuple_GET_ITEM(mro, *class_index);
        if (t->tp_members != NULL && t->tp_members[0].name != NULL)
            return t->tp_members;
    }
    return NULL;
}

/* 0 if `template` can be copied word for word and what a copy shares is immutable (its
 * slots named in `set_after` excepted, the caller replaces those); else -1, TypeError. */
static int
check_template(PyObject *template, PyObject *const *set_after, int n_set_after)
{
    PyTypeObject *tp = Py_TYPE(template);
    Py_ssize_t words = (tp->tp_basicsize - (Py_ssize_t)sizeof(PyObject)) / sizeof(PyObject *);
    const char *why = NULL;
    if (!PyType_HasFeature(tp, Py_TPFLAGS_HEAPTYPE) || tp->tp_dictoffset != 0 ||
        tp->tp_weaklistoffset != 0 || tp->tp_itemsize != 0 ||
        tp->tp_alloc != PyType_GenericAlloc || tp->tp_base == NULL)
        why = "not a plain slotted class";
    Py_ssize_t class_index = -1, slots = 0;
    for (PyMemberDef *m = NULL; why == NULL && (m = next_slot(tp->tp_mro, &class_index, m));) {
        if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
            why = "a member that is not a writable slot";
            break;
        }
        slots++;
        PyObject *v = *(PyObject **)((char *)template + m->offset);
        int replaced = 0;
        for (int i = 0; i < n_set_after; i++)
            replaced |= PyUnicode_CompareWithASCIIString(set_after[i], m->name) == 0;
        if (!replaced && v != NULL && v != Py_None && !PyBool_Check(v) &&
            !PyLong_CheckExact(v) && !PyUnicode_CheckExact(v) && !PyBytes_CheckExact(v) &&
            !PyFloat_CheckExact(v)) {
            PyErr_Format(PyExc_TypeError, "%s.%s defaults to a %.100s: every stream would "
                         "share it", tp->tp_name, m->name, Py_TYPE(v)->tp_name);
            return -1;
        }
    }
    if (why == NULL && slots != words)
        why = "storage beyond its slots";
    if (why != NULL) {
        PyErr_Format(PyExc_TypeError, "%s cannot be a stream template: %s", tp->tp_name, why);
        return -1;
    }
    return 0;
}

/* A new object of `template`'s class holding the same references. */
static PyObject *
copy_of(PyObject *template)
{
    PyTypeObject *tp = Py_TYPE(template);
    PyObject *obj = tp->tp_alloc(tp, 0);
    if (obj == NULL)
        return NULL;
    PyObject **src = (PyObject **)((char *)template + sizeof(PyObject));
    PyObject **dst = (PyObject **)((char *)obj + sizeof(PyObject));
    Py_ssize_t words = (tp->tp_basicsize - (Py_ssize_t)sizeof(PyObject)) / sizeof(PyObject *);
    for (Py_ssize_t i = 0; i < words; i++)
        dst[i] = Py_XNewRef(src[i]);
    return obj;
}

/* PluginHost.new_stream(info) for a host whose VM is live: a new reference, or NULL. */
static PyObject *
open_stream(PyObject *host, PyObject *info)
{
    PyObject *vm = GETATTR(host, d_vm);
    int broken = vm == NULL ? -1 : vm == Py_None ? 1 : attr_true(vm, d_broken);
    Py_XDECREF(vm);
    if (broken != 0)
        return broken < 0 ? NULL : PyObject_CallMethodOneArg(host, o_new_stream, info);
    PyObject *id = GETATTR(host, o_next_context_id);
    PyObject *next = id ? PyNumber_Add(id, d_one) : NULL;
    PyObject *root = next ? GETATTR(host, d_root) : NULL;
    PyObject *generation = root ? GETATTR(host, d_host_generation) : NULL;
    PyObject *open = generation ? GETATTR(host, d_streams) : NULL;
    PyObject *ctx = open ? copy_of(s_ctx_template) : NULL;
    PyObject *stream = ctx ? copy_of(s_stream_template) : NULL;
    int rc = stream == NULL || SETATTR(host, o_next_context_id, next) < 0 ||
             SETATTR(ctx, d_id, id) < 0 || SETATTR(ctx, o_info, info) < 0 ||
             SETATTR(ctx, d_root, root) < 0 || SETATTR(stream, d_host, host) < 0 ||
             SETATTR(stream, d_ctx, ctx) < 0 || SETATTR(stream, d_generation, generation) < 0 ||
             PyObject_SetItem(open, id, ctx) < 0 ? -1 : 0;
    Py_XDECREF(id);
    Py_XDECREF(next);
    Py_XDECREF(root);
    Py_XDECREF(generation);
    Py_XDECREF(open);
    Py_XDECREF(ctx);
    if (rc < 0)
        Py_CLEAR(stream);
    return stream;
}

/* One stream per host of `hosts` (a tuple or list), as open_streams answers. */
static PyObject *
open_stream_list(PyObject *hosts, PyObject *info)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(hosts);
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *host = PySequence_Fast_GET_ITEM(hosts, i);
        PyObject *stream = s_stream_template != NULL
                               ? open_stream(host, info)
                               : PyObject_CallMethodOneArg(host, o_new_stream, info);
        if (stream == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, stream);
    }
    return out;
}

/* open_streams(hosts, info): stream.open_streams_py, compiled. */
static PyObject *
open_streams(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !(PyTuple_CheckExact(args[0]) || PyList_CheckExact(args[0]))) {
        PyErr_SetString(PyExc_TypeError, "open_streams(hosts: tuple | list, info)");
        return NULL;
    }
    return open_stream_list(args[0], args[1]);
}

/* configure_streams(ctx_template, stream_template) */
static PyObject *
configure_streams(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "configure_streams(ctx_template, stream_template)");
        return NULL;
    }
    PyObject *ctx_set[] = {d_id, o_info, d_root};
    PyObject *stream_set[] = {d_host, d_ctx, d_generation};
    if (check_template(args[0], ctx_set, 3) < 0 || check_template(args[1], stream_set, 3) < 0)
        return NULL;
    Py_XSETREF(s_ctx_template, Py_NewRef(args[0]));
    Py_XSETREF(s_stream_template, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}
