/* The compiled stream driver (decision 1100): one C call per plugin callback of a stream.
 *
 * `drive(stream, export, size, end_of_stream, is_body)` does what `HttpStream._call`,
 * `PluginHost._invoke_each` and `PluginVM.call` do together in Python, for the common
 * case only: a live stream of a live VM, nothing nested, the export already looked up.
 * Anything else (a stream skipped or replied, a VM replaced or broken, an export seen for
 * the first time, a call from inside the guest) runs `stream._call(...)`, the Python
 * reference, before anything has changed. After the callback, a trap, a local reply, a
 * reset or a failure the plugin caused goes to the same Python methods the reference
 * calls (`_after_trap`, `_settled`), so only the plain continue/pause mapping is here.
 *
 * `invoke_all(host, ctx, exports, args)` is `PluginHost._invoke_all`: the same
 * arguments to several callbacks in one activation (a stream's closing three).
 *
 * The Python objects are read through their attributes, by name, so the Python classes
 * stay the one definition of their state; tests/unit/wasm runs through both drivers.
 */

static PyObject *d_skip, *d_replied, *d_finished, *d_created, *d_generation, *d_host,
    *d_ctx, *d_host_generation, *d_vm, *d_broken, *d_depth, *d_funcs, *d_call, *d_imports,
    *d_env, *d_wasi, *d_t, *d_effective, *d_root, *d_clock, *d_armed_at,
    *d_arm_deadline, *d_ctx_address, *d_deadline_ticks, *d_id, *d_failed,
    *d_reset_requested, *d_local_reply, *d_continued, *d_settled, *d_py_call, *d_after_trap,
    *d_callback, *d_py_invoke_all,
    *d_context_create;
enum { PHASE_REQUEST_HEADERS, PHASE_RESPONSE_HEADERS, PHASE_RESPONSE_BODY };
static PyObject *d_request_headers, *d_response_headers, *d_response_code,
    *d_response_code_details, *d_response_body, *d_via_upstream, *d_data, *d_items,
    *d_phase_exports[3], *d_streams, *d_trapped, *d_finish_exports, *d_py_finish_streams;
static PyObject *d_continue, *d_stop_and_buffer, *d_wasm_trap; /* set by configure_driver */
static PyObject *d_one; /* the root context id, the second argument of context creation */
/* The exports the driver calls on every request: a VM's `calls` list holds their compiled
 * calls at these indexes (vm.py reads the order from DRIVER_EXPORTS). */
enum { N_DRIVER_EXPORTS = 7 };
static PyObject *d_driver_exports[N_DRIVER_EXPORTS], *d_calls;

static int
init_driver(void)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    INTERN(d_skip, "_skip");
    INTERN(d_replied, "_replied");
    INTERN(d_finished, "_finished");
    INTERN(d_created, "_created");
    INTERN(d_generation, "_generation");
    INTERN(d_host, "host");
    INTERN(d_ctx, "ctx");
    INTERN(d_host_generation, "generation");
    INTERN(d_vm, "vm");
    INTERN(d_broken, "broken");
    INTERN(d_depth, "depth");
    INTERN(d_funcs, "funcs");
    INTERN(d_call, "call");
    INTERN(d_imports, "_imports");
    INTERN(d_env, "env");
    INTERN(d_t, "t");
    INTERN(d_wasi, "wasi");
    INTERN(d_effective, "_effective");
    INTERN(d_root, "root");
    INTERN(d_clock, "_clock");
    INTERN(d_armed_at, "_armed_at");
    INTERN(d_arm_deadline, "_arm_deadline");
    INTERN(d_ctx_address, "_ctx_address");
    INTERN(d_deadline_ticks, "deadline_ticks");
    INTERN(d_id, "id");
    INTERN(d_failed, "failed");
    INTERN(d_reset_requested, "reset_requested");
    INTERN(d_local_reply, "local_reply");
    INTERN(d_continued, "continued");
    INTERN(d_settled, "_settled");
    INTERN(d_py_call, "_call");
    INTERN(d_after_trap, "_after_trap");
    INTERN(d_callback, "callback");
    INTERN(d_py_invoke_all, "_invoke_all");
    INTERN(d_context_create, "proxy_on_context_create");
    INTERN(d_request_headers, "request_headers");
    INTERN(d_response_headers, "response_headers");
    INTERN(d_response_code, "response_code");
    INTERN(d_response_code_details, "response_code_details");
    INTERN(d_response_body, "response_body");
    INTERN(d_via_upstream, "via_upstream");
    INTERN(d_data, "data");
    INTERN(d_items, "_items");
    INTERN(d_streams, "streams");
    INTERN(d_trapped, "trapped");
    INTERN(d_phase_exports[PHASE_REQUEST_HEADERS], "proxy_on_request_headers");
    INTERN(d_phase_exports[PHASE_RESPONSE_HEADERS], "proxy_on_response_headers");
    INTERN(d_phase_exports[PHASE_RESPONSE_BODY], "proxy_on_response_body");
    INTERN(d_calls, "calls");
    INTERN(d_driver_exports[4], "proxy_on_log");
    INTERN(d_driver_exports[5], "proxy_on_done");
    INTERN(d_driver_exports[6], "proxy_on_delete");
#undef INTERN
    d_driver_exports[0] = d_context_create;
    for (int i = 0; i < 3; i++)
        d_driver_exports[1 + i] = d_phase_exports[i];
    d_one = PyLong_FromLong(1);
    return d_one == NULL ? -1 : 0;
}

/* DRIVER_EXPORTS, for the module: the names in their `calls` order. */
static PyObject *
driver_export_names(void)
{
    PyObject *names = PyTuple_New(N_DRIVER_EXPORTS);
    for (int i = 0; names != NULL && i < N_DRIVER_EXPORTS; i++)
        PyTuple_SET_ITEM(names, i, Py_NewRef(d_driver_exports[i]));
    return names;
}

/* A new reference's truth value, the reference released: 1, 0, or -1 (NULL, or raised).
 * The flags read this way are bools or None nearly always: those without a call. */
static int
truth_of(PyObject *v)
{
    if (v == NULL)
        return -1;
    int r = v == Py_True ? 1 : v == Py_False || v == Py_None ? 0 : PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* getattr as a truth value, with the call site's attribute cache. */
#define attr_true(obj, name) truth_of(GETATTR(obj, name))

/* The VM's compiled call for `export`: *call is a new reference, or NULL if the plugin
 * does not export it. Returns 0, FALLBACK (1) when the export was never looked up (the
 * Python path fills `funcs`, and `calls` for the driver's own), or -1 with an exception.
 * The driver's exports are read from the VM's `calls` list by index, not looked up by
 * name: a callback of every request. */
static int
lookup_export(PyObject *vm, PyObject *export, PyObject **call)
{
    *call = NULL;
    for (int i = 0; i < N_DRIVER_EXPORTS; i++) {
        if (export != d_driver_exports[i])
            continue;
        PyObject *calls = GETATTR(vm, d_calls);
        if (calls == NULL)
            return -1;
        PyObject *found = PyList_CheckExact(calls) && PyList_GET_SIZE(calls) == N_DRIVER_EXPORTS
                              ? PyList_GET_ITEM(calls, i)
                              : Py_False;
        int rc = found == Py_False ? 1 : 0; /* not looked up yet */
        if (rc == 0 && found != Py_None)
            *call = Py_NewRef(found);
        Py_DECREF(calls);
        return rc;
    }
    PyObject *funcs = GETATTR(vm, d_funcs);
    if (funcs == NULL)
        return -1;
    if (!PyDict_CheckExact(funcs)) {
        Py_DECREF(funcs);
        return 1;
    }
    PyObject *raw = PyDict_GetItemWithError(funcs, export); /* borrowed */
    int rc = 0;
    if (raw == NULL)
        rc = PyErr_Occurred() ? -1 : 1;
    else if (raw != Py_None && (*call = GETATTR(raw, d_call)) == NULL)
        rc = -1;
    Py_DECREF(funcs);
    return rc;
}

/* The VM is at depth 0 (nothing of it on the stack): 1, 0, or -1 with an exception. */
static int
vm_idle(PyObject *vm)
{
    PyObject *depth = GETATTR(vm, d_depth);
    if (depth == NULL)
        return -1;
    int idle = PyLong_CheckExact(depth) && PyLong_AsLong(depth) == 0;
    Py_DECREF(depth);
    return idle;
}

/* PluginVM._arm_deadline for the C clock, without Python: the store's deadline set
 * through the clock's `set_deadline`, then `_armed_at` = the ticks read before it. */
static int
arm_in_c(PyObject *vm, EpochClock *clock, unsigned long long ticks)
{
    PyObject *address = GETATTR(vm, d_ctx_address);
    PyObject *deadline = address ? GETATTR(vm, d_deadline_ticks) : NULL;
    void *context = address ? PyLong_AsVoidPtr(address) : NULL;
    unsigned long long due = deadline ? PyLong_AsUnsignedLongLong(deadline) : 0;
    Py_XDECREF(address);
    Py_XDECREF(deadline);
    if (deadline == NULL || PyErr_Occurred())
        return -1;
    clock->set_deadline(context, (uint64_t)due);
    PyObject *armed = PyLong_FromUnsignedLongLong(ticks);
    int rc = armed == NULL ? -1 : SETATTR(vm, d_armed_at, armed);
    Py_XDECREF(armed);
    return rc;
}

/* PluginVM.call's deadline arming: only when the epoch clock has ticked since. The C
 * clock (the one the compiled crossings run) is read and the deadline armed here; any
 * other clock, or none, goes to PluginVM._arm_deadline, which compares for itself. Under
 * a light load most requests find a tick since the last one: in Python, the arming cost
 * a method call and a ctypes call, about 4,500 instructions. */
static int
arm_deadline(PyObject *vm)
{
    PyObject *clock = GETATTR(vm, d_clock);
    if (clock == NULL)
        return -1;
    if (!Py_IS_TYPE(clock, &EpochClockType)) {
        Py_DECREF(clock);
        PyObject *r = PyObject_CallMethodNoArgs(vm, d_arm_deadline);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    /* Read once: the clock's thread may bump it meanwhile; a stale read only means
     * arming once more next time (the deadline keeps its +1 tick of slack). */
    unsigned long long ticks = clock_ticks(clock);
    EpochClock *c = (EpochClock *)clock;
    Py_DECREF(clock); /* the VM holds it */
    PyObject *armed = GETATTR(vm, d_armed_at);
    if (armed == NULL)
        return -1;
    long long at = PyLong_CheckExact(armed) ? PyLong_AsLongLong(armed) : -1;
    Py_DECREF(armed);
    if (at == -1 && PyErr_Occurred())
        PyErr_Clear(); /* out of range: stale, as never armed */
    if (at >= 0 && (unsigned long long)at == ticks)
        return 0;
    return arm_in_c(vm, c, ticks);
}

/* One outermost call into the guest, as PluginVM.call: deadline, depth, and a trap
 * marks the VM broken. `call` may be NULL (not exported): None. New reference or NULL. */
static PyObject *
vm_call(PyObject *vm, PyObject *call, PyObject *const *args, Py_ssize_t nargs)
{
    if (call == NULL)
        Py_RETURN_NONE;
    if (arm_deadline(vm) < 0)
        return NULL;
    if (SETATTR(vm, d_depth, d_one) < 0)
        return NULL;
    PyObject *result = PyObject_Vectorcall(call, args, (size_t)nargs, NULL);
    /* No API call may run with the call's exception pending: set it aside until the VM's
     * state is back (a pending exception can be lost inside an attribute store). */
    PyObject *t = NULL, *v = NULL, *tb = NULL;
    int trapped = result == NULL && PyErr_ExceptionMatches(d_wasm_trap);
    if (result == NULL)
        PyErr_Fetch(&t, &v, &tb);
    int rc = trapped ? SETATTR(vm, d_broken, Py_True) : 0;
    if (rc < 0)
        PyErr_Clear(); /* the depth must go back to 0 whatever happened */
    PyObject *zero = PyLong_FromLong(0);
    rc = (zero == NULL ? -1 : SETATTR(vm, d_depth, zero)) < 0 ? -1 : rc;
    Py_XDECREF(zero);
    if (result == NULL) {
        if (rc < 0)
            PyErr_Clear(); /* the call's own exception matters more */
        PyErr_Restore(t, v, tb);
    } else if (rc < 0) {
        Py_CLEAR(result);
    }
    return result;
}

/* Make `host` the running host of the shared import table, and `ctx` its effective
 * context (PluginHost._invoke_each's first lines). The table's `activate`, inline: the
 * running host changes on nearly every callback of a two-plugin chain. */
static int
enter_host(PyObject *host, PyObject *ctx)
{
    PyObject *imports = GETATTR(host, d_imports);
    if (imports == NULL)
        return -1;
    PyObject *env = GETATTR(imports, d_env);
    PyObject *t = env ? GETATTR(env, d_t) : NULL;
    int rc = t == NULL ? -1 : 0;
    if (rc == 0 && t != host) {
        PyObject *wasi = GETATTR(imports, d_wasi);
        rc = wasi == NULL || SETATTR(env, d_t, host) < 0 || SETATTR(wasi, d_t, host) < 0
                 ? -1 : 0;
        Py_XDECREF(wasi);
    }
    Py_XDECREF(t);
    Py_XDECREF(env);
    Py_DECREF(imports);
    if (rc == 0)
        rc = SETATTR(host, d_effective, ctx);
    return rc;
}

/* The effective context goes back to the root, keeping any exception set. */
static int
leave_host(PyObject *host)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyObject *root = GETATTR(host, d_root);
    int rc = root ? SETATTR(host, d_effective, root) : -1;
    Py_XDECREF(root);
    if (t != NULL) {
        if (rc < 0)
            PyErr_Clear();
        PyErr_Restore(t, v, tb);
        return -1;
    }
    return rc;
}

/* A trap's exception names its callback (`WasmTrap.callback`), as _invoke_each does. */
static void
name_trap(PyObject *export)
{
    if (!PyErr_ExceptionMatches(d_wasm_trap))
        return;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && PyObject_SetAttr(v, d_callback, export) < 0)
        PyErr_Clear();
    PyErr_Restore(t, v, tb);
}

/* The stream's VM is the one it started with, and not broken (HttpStream._alive): 1, 0,
 * or -1. */
static int
stream_alive(PyObject *stream, PyObject *host, PyObject *vm)
{
    PyObject *mine = GETATTR(stream, d_generation);
    PyObject *now = mine ? GETATTR(host, d_host_generation) : NULL;
    int r = now ? PyObject_RichCompareBool(mine, now, Py_EQ) : -1;
    Py_XDECREF(mine);
    Py_XDECREF(now);
    if (r <= 0)
        return r;
    r = attr_true(vm, d_broken);
    return r < 0 ? -1 : !r;
}

/* The stream's preconditions for the compiled path: 1 (take it), 0 (fall back), -1. */
static int
stream_ready(PyObject *stream, PyObject *host, PyObject *vm)
{
    int r;
    if ((r = attr_true(stream, d_skip)) != 0 || (r = attr_true(stream, d_replied)) != 0 ||
        (r = attr_true(stream, d_finished)) != 0)
        return r < 0 ? -1 : 0;
    if ((r = stream_alive(stream, host, vm)) <= 0)
        return r;
    return vm_idle(vm);
}

/* The pending exception, normalised, with its traceback attached: a new reference (NULL
 * if none), the error indicator cleared. */
static PyObject *
take_exception(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && tb != NULL)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}

/* After the callback: a failure, reset or local reply the plugin caused goes to
 * `_settled`; otherwise the action maps to CONTINUE, STOP_AND_BUFFER or None (paused). */
static PyObject *
map_action(PyObject *stream, PyObject *ctx, PyObject *action, int end_of_stream,
           int is_body)
{
    int r;
    if ((r = attr_true(ctx, d_failed)) != 0 || (r = attr_true(ctx, d_reset_requested)) != 0)
        return r < 0 ? NULL : PyObject_CallMethodNoArgs(stream, d_settled);
    PyObject *reply = GETATTR(ctx, d_local_reply);
    if (reply == NULL)
        return NULL;
    Py_DECREF(reply);
    if (reply != Py_None)
        return PyObject_CallMethodNoArgs(stream, d_settled);
    if ((r = PyObject_Not(action)) != 0) /* None or 0 (Action.CONTINUE) */
        return r < 0 ? NULL : Py_NewRef(d_continue);
    if ((r = attr_true(ctx, d_continued)) != 0) {
        if (r < 0 || SETATTR(ctx, d_continued, Py_False) < 0)
            return NULL;
        return Py_NewRef(d_continue);
    }
    if (is_body && !end_of_stream)
        return Py_NewRef(d_stop_and_buffer);
    Py_RETURN_NONE;
}

/* HttpStream._call, compiled: `args` is its argument vector, self first. */
static PyObject *
drive_args(PyObject *const *args)
{
    if (d_wasm_trap == NULL)
        return PyObject_VectorcallMethod(d_py_call, args, 5, NULL);
    PyObject *stream = args[0], *export = args[1], *size = args[2], *eos = args[3];
    int is_body = PyObject_IsTrue(args[4]);
    int end_of_stream = eos == Py_None ? 0 : PyObject_IsTrue(eos);
    if (is_body < 0 || end_of_stream < 0)
        return NULL;
    PyObject *host = NULL, *vm = NULL, *ctx = NULL, *call = NULL, *create = NULL;
    PyObject *ctx_id = NULL, *result = NULL, *action = NULL;
    int ready = -1, created = 1;
    if ((host = GETATTR(stream, d_host)) == NULL ||
        (vm = GETATTR(host, d_vm)) == NULL)
        goto done;
    ready = stream_ready(stream, host, vm);
    if (ready > 0) {
        created = attr_true(stream, d_created);
        int rc = created < 0 ? -1 : lookup_export(vm, export, &call);
        if (rc == 0 && !created)
            rc = lookup_export(vm, d_context_create, &create);
        ready = rc < 0 ? -1 : rc == 0;
    }
    if (ready == 0)
        action = PyObject_VectorcallMethod(d_py_call, args, 5, NULL);
    if (ready <= 0)
        goto done;
    if ((ctx = GETATTR(stream, d_ctx)) == NULL ||
        (ctx_id = GETATTR(ctx, d_id)) == NULL ||
        (!created && SETATTR(stream, d_created, Py_True) < 0) ||
        enter_host(host, ctx) < 0)
        goto done;
    /* From here the stream has changed: a trap goes to the Python failure methods. */
    PyObject *trapped = export;
    if (!created) {
        PyObject *cargs[2] = {ctx_id, d_one};
        result = vm_call(vm, create, cargs, 2);
        trapped = result == NULL ? d_context_create : export;
    }
    if (created || result != NULL) {
        Py_XDECREF(result);
        PyObject *cargs[3] = {ctx_id, size, end_of_stream ? Py_True : Py_False};
        result = vm_call(vm, call, cargs, eos == Py_None ? 2 : 3);
    }
    if (leave_host(host) < 0 && result != NULL)
        Py_CLEAR(result);
    if (result != NULL) {
        action = map_action(stream, ctx, result, end_of_stream, is_body);
    } else if (PyErr_ExceptionMatches(d_wasm_trap)) {
        PyObject *v = take_exception();
        action = PyObject_CallMethodObjArgs(stream, d_after_trap, trapped,
                                            v ? v : Py_None, NULL);
        Py_XDECREF(v);
    }
done:
    Py_XDECREF(host);
    Py_XDECREF(vm);
    Py_XDECREF(ctx);
    Py_XDECREF(call);
    Py_XDECREF(create);
    Py_XDECREF(ctx_id);
    Py_XDECREF(result);
    return action;
}

/* drive(stream, export, size, end_of_stream, is_body): HttpStream._call, compiled. */
static PyObject *
drive(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "drive(stream, export, size, end_of_stream, is_body)");
        return NULL;
    }
    return drive_args(args);
}

/* How many headers a map holds (len(map), without a Python frame for a LiveHeaderMap's
 * __len__); -1 with an exception. */
static Py_ssize_t
map_length(PyObject *map)
{
    if (!is_live(map)) {
        PyObject *items = GETATTR(map, d_items);
        Py_ssize_t n = items ? PyObject_Length(items) : -1;
        Py_XDECREF(items);
        return n;
    }
    PyObject *pseudo = GETATTR(map, s_pseudo);
    PyObject *headers = pseudo ? GETATTR(map, s_headers) : NULL;
    Py_ssize_t a = headers ? PyObject_Length(pseudo) : -1;
    Py_ssize_t b = a < 0 ? -1 : PyObject_Length(headers);
    Py_XDECREF(pseudo);
    Py_XDECREF(headers);
    return b < 0 ? -1 : a + b;
}

/* One stream's context takes what the phase shows it (HttpStream.begin_*'s first lines);
 * `*size` is what the callback gets as its size argument. 0 or -1. */
static int
show_phase(PyObject *ctx, long phase, PyObject *payload, PyObject *code, PyObject **size)
{
    int rc;
    if (phase == PHASE_RESPONSE_BODY) {
        rc = SETATTR(ctx, d_response_body, payload);
        PyObject *data = rc < 0 ? NULL : GETATTR(payload, d_data);
        *size = data ? PyLong_FromSsize_t(PyObject_Length(data)) : NULL;
        Py_XDECREF(data);
        return *size == NULL ? -1 : 0;
    }
    if (phase == PHASE_REQUEST_HEADERS)
        rc = SETATTR(ctx, d_request_headers, payload);
    else
        rc = SETATTR(ctx, d_response_headers, payload) < 0 ||
             SETATTR(ctx, d_response_code, code) < 0 ||
             SETATTR(ctx, d_response_code_details, d_via_upstream) < 0 ? -1 : 0;
    /* The count after the plugins before this one: they may have added or removed. */
    Py_ssize_t n = rc < 0 ? -1 : map_length(payload);
    *size = n < 0 ? NULL : PyLong_FromSsize_t(n);
    return *size == NULL ? -1 : 0;
}

/* streams[start:] through one phase, as drive_phase below: a new reference (None, or
 * the (index, action) of the first stream that did not continue), or NULL. */
static PyObject *
drive_streams(PyObject *streams, Py_ssize_t start, long phase, PyObject *payload, PyObject *eos,
              PyObject *code)
{
    PyObject *export = d_phase_exports[phase];
    PyObject *is_body = phase == PHASE_RESPONSE_BODY ? Py_True : Py_False;
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(streams); i++) {
        PyObject *stream = PyList_GET_ITEM(streams, i);
        Py_INCREF(stream);
        PyObject *size = NULL, *action = NULL;
        PyObject *ctx = GETATTR(stream, d_ctx);
        if (ctx != NULL && show_phase(ctx, phase, payload, code, &size) == 0) {
            PyObject *dargs[5] = {stream, export, size, eos, is_body};
            action = drive_args(dargs);
        }
        Py_XDECREF(ctx);
        Py_XDECREF(size);
        Py_DECREF(stream);
        if (action == NULL)
            return NULL;
        if (action == d_continue) {
            Py_DECREF(action);
            continue;
        }
        return Py_BuildValue("(nN)", i, action);
    }
    Py_RETURN_NONE;
}

/* drive_phase(streams, start, phase, payload, end_of_stream, code): stream.drive_phase_py,
 * compiled. */
static PyObject *
drive_phase(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "drive_phase(streams: list, start, phase, payload, end_of_stream, code)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    long phase = PyLong_AsLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (phase < PHASE_REQUEST_HEADERS || phase > PHASE_RESPONSE_BODY) {
        PyErr_Format(PyExc_ValueError, "unknown phase %ld", phase);
        return NULL;
    }
    return drive_streams(args[0], start, phase, args[3], args[4], args[5]);
}

/* PluginHost._invoke_all, compiled: `args` is its argument vector, self first, with
 * the exports and the callbacks' arguments as tuples. */
static PyObject *
invoke_all_args(PyObject *const *args)
{
    PyObject *host = args[0], *ctx = args[1], *exports = args[2], *cargs = args[3];
    Py_ssize_t n = PyTuple_GET_SIZE(exports);
    if (n > 8 || d_wasm_trap == NULL)
        return PyObject_VectorcallMethod(d_py_invoke_all, args, 4, NULL);
    PyObject *calls[8] = {NULL}, *vm = NULL, *result = NULL;
    int ready = -1;
    Py_ssize_t looked = 0;
    if ((vm = GETATTR(host, d_vm)) == NULL || (ready = vm_idle(vm)) <= 0)
        goto checked;
    for (; looked < n; looked++) {
        int rc = lookup_export(vm, PyTuple_GET_ITEM(exports, looked), &calls[looked]);
        if (rc != 0) {
            ready = rc < 0 ? -1 : 0;
            break;
        }
    }
checked:
    if (ready == 0)
        result = PyObject_VectorcallMethod(d_py_invoke_all, args, 4, NULL);
    if (ready <= 0)
        goto done;
    if (enter_host(host, ctx) < 0)
        goto done;
    result = Py_NewRef(Py_None);
    PyObject *const *items = &PyTuple_GET_ITEM(cargs, 0);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_DECREF(result);
        result = vm_call(vm, calls[i], items, PyTuple_GET_SIZE(cargs));
        if (result == NULL) {
            name_trap(PyTuple_GET_ITEM(exports, i));
            break;
        }
    }
    if (leave_host(host) < 0)
        Py_CLEAR(result);
done:
    for (Py_ssize_t i = 0; i < looked; i++)
        Py_XDECREF(calls[i]);
    Py_XDECREF(vm);
    return result;
}

/* invoke_all(host, ctx, exports, args): PluginHost._invoke_all, compiled. */
static PyObject *
invoke_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_CheckExact(args[2]) || !PyTuple_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "invoke_all(host, ctx, exports: tuple, args: tuple)");
        return NULL;
    }
    return invoke_all_args(args);
}

/* A trap in a closing row: PluginHost.trapped(callback, exc), as HttpStream.finish. */
static int
closing_trap(PyObject *host)
{
    PyObject *v = take_exception();
    PyObject *callback = v ? PyObject_GetAttr(v, d_callback) : NULL;
    PyObject *r = callback ? PyObject_CallMethodObjArgs(host, d_trapped, callback, v, NULL)
                           : NULL;
    Py_XDECREF(r);
    Py_XDECREF(callback);
    Py_XDECREF(v);
    return r == NULL ? -1 : 0;
}

/* HttpStream.finish for one stream: 0, or -1 with an exception. */
static int
finish_one(PyObject *stream)
{
    int r = attr_true(stream, d_finished);
    if (r != 0)
        return r < 0 ? -1 : 0;
    if (SETATTR(stream, d_finished, Py_True) < 0)
        return -1;
    PyObject *host = GETATTR(stream, d_host);
    PyObject *ctx = host ? GETATTR(stream, d_ctx) : NULL;
    PyObject *ctx_id = ctx ? GETATTR(ctx, d_id) : NULL;
    PyObject *open = ctx_id ? GETATTR(host, d_streams) : NULL;
    PyObject *vm = open ? GETATTR(host, d_vm) : NULL;
    int rc = vm == NULL ? -1 : 0;
    /* host.streams.pop(ctx.id, None) */
    if (rc == 0 && PyObject_DelItem(open, ctx_id) < 0) {
        if (PyErr_ExceptionMatches(PyExc_KeyError))
            PyErr_Clear();
        else
            rc = -1;
    }
    if (rc == 0 && (r = attr_true(stream, d_created)) > 0)
        r = stream_alive(stream, host, vm);
    if (rc == 0 && r < 0)
        rc = -1;
    if (rc == 0 && r > 0) {
        PyObject *cargs = PyTuple_Pack(1, ctx_id);
        PyObject *args[4] = {host, ctx, d_finish_exports, cargs};
        PyObject *result = cargs ? invoke_all_args(args) : NULL;
        if (result == NULL && cargs != NULL && PyErr_ExceptionMatches(d_wasm_trap))
            rc = closing_trap(host);
        else
            rc = result == NULL ? -1 : 0;
        Py_XDECREF(result);
        Py_XDECREF(cargs);
    }
    Py_XDECREF(vm);
    Py_XDECREF(open);
    Py_XDECREF(ctx_id);
    Py_XDECREF(ctx);
    Py_XDECREF(host);
    return rc;
}

/* finish_one, keeping an error the reference keeps in `*errors` (made on the first): 0,
 * or -1 for one that must propagate. */
static int
finish_keeping(PyObject *stream, PyObject **errors)
{
    Py_INCREF(stream);
    int rc = finish_one(stream);
    Py_DECREF(stream);
    if (rc == 0)
        return 0;
    /* As the reference: the error is kept, and the other streams still finish. */
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *v = take_exception();
    if (*errors == NULL)
        *errors = PyList_New(0);
    rc = *errors == NULL || v == NULL ? -1 : PyList_Append(*errors, v);
    Py_XDECREF(v);
    return rc;
}

/* finish_streams(streams): stream.finish_streams_py, compiled. */
static PyObject *
finish_streams(PyObject *module, PyObject *streams)
{
    if (!PyList_CheckExact(streams)) {
        PyErr_SetString(PyExc_TypeError, "finish_streams(streams: list)");
        return NULL;
    }
    if (d_wasm_trap == NULL)
        return PyObject_CallOneArg(d_py_finish_streams, streams);
    PyObject *errors = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(streams); i++) {
        if (finish_keeping(PyList_GET_ITEM(streams, i), &errors) < 0) {
            Py_XDECREF(errors);
            return NULL;
        }
    }
    return errors != NULL ? errors : Py_NewRef(Py_None);
}

/* finish_across(stream_lists): stream.finish_across_py, compiled. The closing batch's
 * order without the list the reference builds of it. */
static PyObject *
finish_across(PyObject *module, PyObject *lists)
{
    Py_ssize_t width = 0;
    for (Py_ssize_t j = 0; PyList_CheckExact(lists) && j < PyList_GET_SIZE(lists); j++) {
        PyObject *streams = PyList_GET_ITEM(lists, j);
        if (!PyList_CheckExact(streams)) {
            width = -1;
            break;
        }
        width = Py_MAX(width, PyList_GET_SIZE(streams));
    }
    if (!PyList_CheckExact(lists) || width < 0) {
        PyErr_SetString(PyExc_TypeError, "finish_across(stream_lists: list of lists)");
        return NULL;
    }
    if (d_wasm_trap == NULL) { /* stream.py configures the driver when it imports it */
        PyErr_SetString(PyExc_RuntimeError, "the compiled driver is not configured");
        return NULL;
    }
    PyObject *errors = NULL;
    for (Py_ssize_t i = 0; i < width; i++)
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(lists); j++) {
            /* A stream's finish may run Python (a trap's log): sizes are read again. */
            PyObject *streams = Py_NewRef(PyList_GET_ITEM(lists, j));
            int rc = i < PyList_GET_SIZE(streams)
                         ? finish_keeping(PyList_GET_ITEM(streams, i), &errors) : 0;
            Py_DECREF(streams);
            if (rc < 0) {
                Py_XDECREF(errors);
                return NULL;
            }
        }
    return errors != NULL ? errors : Py_NewRef(Py_None);
}

static PyObject *
configure_driver(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyExceptionClass_Check(args[2]) || !PyTuple_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "configure_driver(CONTINUE, STOP_AND_BUFFER, "
                        "WasmTrap, finish_exports: tuple, finish_streams_py)");
        return NULL;
    }
    Py_XSETREF(d_finish_exports, Py_NewRef(args[3]));
    Py_XSETREF(d_py_finish_streams, Py_NewRef(args[4]));
    Py_XSETREF(d_continue, Py_NewRef(args[0]));
    Py_XSETREF(d_stop_and_buffer, Py_NewRef(args[1]));
    Py_XSETREF(d_wasm_trap, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}
