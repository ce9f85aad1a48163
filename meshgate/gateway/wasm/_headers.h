/* Header maps built from the data path's headers (decision 1500).
 *
 * Every plugged request builds two maps: its request headers and its response headers,
 * pseudo-headers first, names lower-cased. The comprehension that did it cost about
 * 2.4 µs a map, most of it in calling `str.lower` and making pairs; here a name already
 * in lower case keeps the pair the headers' iterator made (the data path's `CIMultiDict`
 * gives its names as `istr`, a str that compares and hashes as str).
 */

static PyObject *h_items, *h_lower;

static int
init_headers(void)
{
    h_items = PyUnicode_InternFromString("items");
    h_lower = PyUnicode_InternFromString("lower");
    return h_items == NULL || h_lower == NULL ? -1 : 0;
}

/* `name` in lower case: a new reference (`name` itself if it already is: an exact str or
 * a subclass that compares as str, e.g. multidict's `istr`), or NULL with an exception. */
static PyObject *
lowered_name(PyObject *name)
{
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "header name must be str, not %.100s",
                     Py_TYPE(name)->tp_name);
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(name)) /* str.lower's rules beyond ASCII */
        return PyObject_CallMethodNoArgs(name, h_lower);
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    const Py_UCS1 *src = PyUnicode_1BYTE_DATA(name);
    Py_ssize_t i = 0;
    while (i < n && !(src[i] >= 'A' && src[i] <= 'Z'))
        i++;
    if (i == n && Py_TYPE(name)->tp_richcompare == PyUnicode_Type.tp_richcompare &&
        Py_TYPE(name)->tp_hash == PyUnicode_Type.tp_hash)
        return Py_NewRef(name);
    PyObject *out = PyUnicode_New(n, 127);
    if (out == NULL)
        return NULL;
    Py_UCS1 *dst = PyUnicode_1BYTE_DATA(out);
    for (Py_ssize_t j = 0; j < n; j++)
        dst[j] = (src[j] >= 'A' && src[j] <= 'Z') ? src[j] + 32 : src[j];
    return out;
}

/* `head` (a list, copied), then `headers.items()` with the names lower-cased: a new
 * list, or NULL with an exception. */
static PyObject *
pairs_of(PyObject *head, PyObject *headers)
{
    PyObject *out = PyList_GetSlice(head, 0, PY_SSIZE_T_MAX);
    PyObject *items = out ? PyObject_CallMethodNoArgs(headers, h_items) : NULL;
    PyObject *it = items ? PyObject_GetIter(items) : NULL;
    Py_XDECREF(items);
    if (it == NULL) {
        Py_XDECREF(out);
        return NULL;
    }
    PyObject *kv;
    while ((kv = PyIter_Next(it)) != NULL) {
        if (!PyTuple_CheckExact(kv) || PyTuple_GET_SIZE(kv) != 2) {
            PyErr_SetString(PyExc_TypeError, "headers.items() must give (name, value) pairs");
            Py_DECREF(kv);
            break;
        }
        PyObject *name = PyTuple_GET_ITEM(kv, 0);
        PyObject *lower = lowered_name(name);
        PyObject *pair = NULL;
        if (lower == name)
            pair = Py_NewRef(kv);
        else if (lower != NULL)
            pair = PyTuple_Pack(2, lower, PyTuple_GET_ITEM(kv, 1));
        Py_XDECREF(lower);
        Py_DECREF(kv);
        if (pair == NULL || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            break;
        }
        Py_DECREF(pair);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* lowered_pairs(head, headers): headers.py's `lowered_pairs_py`, compiled. */
static PyObject *
lowered_pairs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "lowered_pairs(head: list, headers)");
        return NULL;
    }
    return pairs_of(args[0], args[1]);
}
