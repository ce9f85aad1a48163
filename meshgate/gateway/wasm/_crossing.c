/* meshgate's compiled wasm crossings: calls into a plugin and host-function trampolines.
 *
 * Why this exists (docs/decisions/1000-compiled-crossings.md): under load the sidecar's
 * plugged requests spent most of their extra CPU in Python around ~40 crossings per
 * request (14 callbacks, ~25 host calls). Through ctypes each crossing builds argument
 * objects, runs a generated Python wrapper and, for host calls, a Python trampoline.
 * Here a crossing is one C function: arguments go straight into wasmtime's raw value
 * array, and a host call becomes one vectorcall of the Python host function.
 *
 * This file links against nothing but Python: wasmtime's entry points come in as
 * addresses taken from the wasmtime package's own loaded library (see _rawcall.py), so
 * the version pinned in pyproject.toml is the one called.
 *
 * Value signatures are strings of "i" (i32, crossing as an unsigned Python int) and
 * "I" (i64, signed), as in _rawcall.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* wasmtime_val_raw_t: a 16-byte union; only the integer members are used here. */
typedef union {
    int32_t i32;
    int64_t i64;
    uint8_t bytes[16];
} raw_val;

typedef void *(*call_unchecked_fn)(void *ctx, const void *func, raw_val *vals,
                                   size_t n, void **trap);

#define MAX_VALS 16

static int
parse_signature(const char *sig, Py_ssize_t len, char *out)
{
    if (len > MAX_VALS) {
        PyErr_SetString(PyExc_ValueError, "signature longer than 16 values");
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        if (sig[i] != 'i' && sig[i] != 'I') {
            PyErr_Format(PyExc_ValueError, "bad value type %c in signature", sig[i]);
            return -1;
        }
        out[i] = sig[i];
    }
    return 0;
}

static int
store_arg(raw_val *slot, char kind, PyObject *arg)
{
    if (kind == 'i') {
        unsigned long v = PyLong_AsUnsignedLongMask(arg);
        if (v == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        slot->i64 = 0;
        slot->i32 = (int32_t)(uint32_t)v;
    } else {
        long long v = PyLong_AsLongLong(arg);
        if (v == -1 && PyErr_Occurred())
            return -1;
        slot->i64 = (int64_t)v;
    }
    return 0;
}

static PyObject *
load_result(const raw_val *slot, char kind)
{
    if (kind == 'i')
        return PyLong_FromUnsignedLong((uint32_t)slot->i32);
    return PyLong_FromLongLong(slot->i64);
}

/* Set on this thread while a WasmCall that keeps the GIL runs the guest: host functions
 * the guest calls meanwhile know the GIL is theirs, without PyGILState_Ensure/Release
 * (about 80 instructions a host call). Saved and restored around nested calls.
 * Initial-exec: an access is one thread-pointer-relative load, not a __tls_get_addr call
 * (about 80 of those a plugged request); the four bytes come from the static TLS space
 * the C library keeps for modules loaded later. */
static _Thread_local int gil_held_by_call __attribute__((tls_model("initial-exec")));

/* ---- WasmCall: one exported function, called through wasmtime_func_call_unchecked ---- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    call_unchecked_fn call;
    void *ctx;
    const void *func;      /* wasmtime_func_t, owned by `keep` */
    void **trap;           /* the caller's trap slot, owned by `keep` */
    PyObject *keep;        /* keeps func struct and trap slot alive */
    PyObject *on_failure;  /* on_failure(error_address) raises the trap or error */
    int hold_gil;          /* the epoch clock needs no GIL: keep it across the call */
    Py_ssize_t nparams;
    Py_ssize_t nresults;
    Py_ssize_t nvals;
    char params[MAX_VALS];
    char result;
    raw_val vals[MAX_VALS];
} WasmCall;

static PyObject *
WasmCall_vectorcall(PyObject *self_obj, PyObject *const *args, size_t nargsf, PyObject *kw)
{
    WasmCall *self = (WasmCall *)self_obj;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kw != NULL && PyTuple_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "wasm calls take no keyword arguments");
        return NULL;
    }
    if (nargs != self->nparams) {
        PyErr_Format(PyExc_TypeError, "wasm function takes %zd arguments, got %zd",
                     self->nparams, nargs);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        if (store_arg(&self->vals[i], self->params[i], args[i]) < 0)
            return NULL;
    void *error;
    if (self->hold_gil) {
        int outer = gil_held_by_call;
        gil_held_by_call = 1;
        error = self->call(self->ctx, self->func, self->vals, (size_t)self->nvals, self->trap);
        gil_held_by_call = outer;
    } else {
        /* Released as ctypes does: an epoch clock that is a Python thread must be able
         * to run to interrupt a callback that never returns. */
        int outer = gil_held_by_call;
        gil_held_by_call = 0; /* even inside a call that keeps it: released here */
        Py_BEGIN_ALLOW_THREADS
        error = self->call(self->ctx, self->func, self->vals, (size_t)self->nvals,
                           self->trap);
        Py_END_ALLOW_THREADS
        gil_held_by_call = outer;
    }
    if (error != NULL || *self->trap != NULL) {
        PyObject *addr = PyLong_FromVoidPtr(error);
        if (addr == NULL)
            return NULL;
        PyObject *r = PyObject_CallOneArg(self->on_failure, addr);
        Py_DECREF(addr);
        Py_XDECREF(r);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "wasm call failed without an exception");
        return NULL;
    }
    if (!self->nresults)
        Py_RETURN_NONE;
    return load_result(&self->vals[0], self->result);
}

static PyObject *
WasmCall_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"call", "ctx", "func", "trap", "params", "results", "keep",
                            "on_failure", "hold_gil", NULL};
    unsigned long long call, ctx, func, trap;
    const char *params, *results;
    Py_ssize_t plen, rlen;
    PyObject *keep, *on_failure;
    int hold_gil = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKKKs#s#OO|p", names, &call, &ctx, &func,
                                     &trap, &params, &plen, &results, &rlen, &keep,
                                     &on_failure, &hold_gil))
        return NULL;
    if (rlen > 1) {
        PyErr_SetString(PyExc_ValueError, "at most one result");
        return NULL;
    }
    WasmCall *self = (WasmCall *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (parse_signature(params, plen, self->params) < 0 ||
        parse_signature(results, rlen, &self->result) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->vectorcall = WasmCall_vectorcall;
    self->call = (call_unchecked_fn)(uintptr_t)call;
    self->ctx = (void *)(uintptr_t)ctx;
    self->func = (const void *)(uintptr_t)func;
    self->trap = (void **)(uintptr_t)trap;
    self->hold_gil = hold_gil;
    self->nparams = plen;
    self->nresults = rlen;
    self->nvals = plen > rlen ? plen : (rlen ? rlen : 1);
    memset(self->vals, 0, sizeof self->vals);
    Py_INCREF(keep);
    self->keep = keep;
    Py_INCREF(on_failure);
    self->on_failure = on_failure;
    return (PyObject *)self;
}

static int
WasmCall_traverse(WasmCall *self, visitproc visit, void *arg)
{
    Py_VISIT(self->keep);
    Py_VISIT(self->on_failure);
    return 0;
}

static int
WasmCall_clear(WasmCall *self)
{
    Py_CLEAR(self->keep);
    Py_CLEAR(self->on_failure);
    return 0;
}

static void
WasmCall_dealloc(WasmCall *self)
{
    PyObject_GC_UnTrack(self);
    WasmCall_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject WasmCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meshgate.gateway.wasm._crossing.WasmCall",
    .tp_doc = "WasmCall(call, ctx, func, trap, params, results, keep, on_failure, "
              "hold_gil=False)\n"
              "An exported wasm function; calling it crosses into the guest.",
    .tp_basicsize = sizeof(WasmCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(WasmCall, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = WasmCall_new,
    .tp_traverse = (traverseproc)WasmCall_traverse,
    .tp_clear = (inquiry)WasmCall_clear,
    .tp_dealloc = (destructor)WasmCall_dealloc,
};

/* ---- HostFunction: a Python host function behind wasmtime's unchecked callback ---- */

typedef struct {
    PyObject_HEAD
    PyObject *fn;
    PyObject *on_error;  /* on_error(fn, exc) -> (trap_address, status) */
    PyObject *state;     /* for a fast path: the ProxyWasmImports whose .t is the host */
    int fast;            /* FAST_* or FAST_NONE */
    Py_ssize_t nparams;
    Py_ssize_t nresults;
    char params[MAX_VALS];
    char result;
} HostFunction;

#include "_attrs.h"
#include "_epoch.h"
#include "_fastpaths.h"
#include "_driver.h"
#include "_streams.h"
#include "_phases.h"
#include "_chain.h"

#define RELEASE_GIL(taken, state) \
    do {                              \
        if (taken)                    \
            PyGILState_Release(state); \
    } while (0)

/* wasmtime_func_unchecked_callback_t; env is the HostFunction, kept alive by the
 * linker's owner on the Python side (HostFunctionTable). */
static void *
host_trampoline(void *env, void *caller, raw_val *vals, size_t n)
{
    (void)caller;
    (void)n;
    HostFunction *h = (HostFunction *)env;
    void *trap = NULL;
    /* Taken only when the caller released it (the ctypes crossings, a Python clock). */
    int take_gil = !gil_held_by_call;
    PyGILState_STATE gil = take_gil ? PyGILState_Ensure() : PyGILState_UNLOCKED;
    PyObject *argv[MAX_VALS];
    Py_ssize_t built = 0;
    PyObject *r = NULL;
    if (h->fast != FAST_NONE) {
        int handled = run_fast_path(h, vals);
        if (handled > 0) {
            RELEASE_GIL(take_gil, gil);
            return NULL;
        }
        if (handled < 0)
            goto error;
    }
    for (; built < h->nparams; built++) {
        argv[built] = load_result(&vals[built], h->params[built]);
        if (argv[built] == NULL)
            goto failed;
    }
    r = PyObject_Vectorcall(h->fn, argv, (size_t)h->nparams, NULL);
failed:
    for (Py_ssize_t i = 0; i < built; i++)
        Py_DECREF(argv[i]);
    if (r != NULL) {
        if (h->nresults) {
            raw_val out;
            memset(&out, 0, sizeof out);
            if (store_arg(&out, h->result, r) < 0) {
                Py_DECREF(r);
                r = NULL;
                goto error;
            }
            vals[0] = out;
        }
        Py_DECREF(r);
        RELEASE_GIL(take_gil, gil);
        return NULL;
    }
error: ;
    /* Rare: decide in Python (bad guest pointer -> status, trap, or a logged host bug). */
    PyObject *exc = take_exception();
    if (exc == NULL) {
        exc = Py_None;
        Py_INCREF(exc);
    }
    PyObject *decision = PyObject_CallFunctionObjArgs(h->on_error, h->fn, exc, NULL);
    Py_XDECREF(exc);
    unsigned long long trap_addr = 0;
    long long status = 0;
    if (decision == NULL || !PyArg_ParseTuple(decision, "KL", &trap_addr, &status)) {
        PyErr_WriteUnraisable(h->fn);
        status = 10; /* INTERNAL_FAILURE */
    }
    Py_XDECREF(decision);
    if (trap_addr) {
        trap = (void *)(uintptr_t)trap_addr;
    } else if (h->nresults) {
        raw_val out;
        memset(&out, 0, sizeof out);
        if (h->result == 'i')
            out.i32 = (int32_t)(uint32_t)status;
        else
            out.i64 = status;
        vals[0] = out;
    }
    RELEASE_GIL(take_gil, gil);
    return trap;
}

static PyObject *
HostFunction_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"fn", "params", "results", "on_error", "fast", "state", NULL};
    PyObject *fn, *on_error, *state = Py_None;
    const char *params, *results;
    Py_ssize_t plen, rlen;
    int fast = FAST_NONE;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Os#s#O|iO", names, &fn, &params, &plen,
                                     &results, &rlen, &on_error, &fast, &state))
        return NULL;
    if (fast < FAST_NONE || fast >= FAST_COUNT || (fast != FAST_NONE && state == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "unknown fast path, or one without state");
        return NULL;
    }
    if (rlen > 1) {
        PyErr_SetString(PyExc_ValueError, "at most one result");
        return NULL;
    }
    HostFunction *self = (HostFunction *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (parse_signature(params, plen, self->params) < 0 ||
        parse_signature(results, rlen, &self->result) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->nparams = plen;
    self->nresults = rlen;
    self->fast = fast;
    Py_INCREF(state);
    self->state = state;
    Py_INCREF(fn);
    self->fn = fn;
    Py_INCREF(on_error);
    self->on_error = on_error;
    return (PyObject *)self;
}

static int
HostFunction_traverse(HostFunction *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fn);
    Py_VISIT(self->on_error);
    Py_VISIT(self->state);
    return 0;
}

static int
HostFunction_clear(HostFunction *self)
{
    Py_CLEAR(self->fn);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->state);
    return 0;
}

static void
HostFunction_dealloc(HostFunction *self)
{
    PyObject_GC_UnTrack(self);
    HostFunction_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
HostFunction_env(HostFunction *self, PyObject *unused)
{
    return PyLong_FromVoidPtr(self);
}

static PyMethodDef HostFunction_methods[] = {
    {"env", (PyCFunction)HostFunction_env, METH_NOARGS,
     "The env pointer to register with the trampoline (valid while this object lives)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HostFunctionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meshgate.gateway.wasm._crossing.HostFunction",
    .tp_doc = "HostFunction(fn, params, results, on_error)\n"
              "A Python host function as wasmtime's unchecked callback (TRAMPOLINE, env()).",
    .tp_basicsize = sizeof(HostFunction),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = HostFunction_new,
    .tp_traverse = (traverseproc)HostFunction_traverse,
    .tp_clear = (inquiry)HostFunction_clear,
    .tp_dealloc = (destructor)HostFunction_dealloc,
    .tp_methods = HostFunction_methods,
};

static PyMethodDef crossing_methods[] = {
    {"configure", (PyCFunction)configure, METH_O,
     "configure(GuestMemoryError): the exception a bad guest pointer raises; fast paths "
     "stay off until it is set."},
    {"configure_properties", (PyCFunction)configure_properties, METH_O,
     "configure_properties(get_property): what the compiled proxy_get_property calls."},
    {"configure_driver", (PyCFunction)(void (*)(void))configure_driver, METH_FASTCALL,
     "configure_driver(CONTINUE, STOP_AND_BUFFER, WasmTrap, finish_exports, "
     "finish_streams_py): the driver stays on the Python path until it is called."},
    {"drive", (PyCFunction)(void (*)(void))drive, METH_FASTCALL,
     "drive(stream, export, size, end_of_stream, is_body): HttpStream._call, compiled."},
    {"drive_phase", (PyCFunction)(void (*)(void))drive_phase, METH_FASTCALL,
     "drive_phase(streams, start, phase, payload, end_of_stream, code): "
     "stream.drive_phase_py, compiled."},
    {"finish_streams", (PyCFunction)finish_streams, METH_O,
     "finish_streams(streams): stream.finish_streams_py, compiled."},
    {"finish_across", (PyCFunction)finish_across, METH_O,
     "finish_across(stream_lists): stream.finish_across_py, compiled."},
    {"open_streams", (PyCFunction)(void (*)(void))open_streams, METH_FASTCALL,
     "open_streams(hosts, info): stream.open_streams_py, compiled."},
    {"configure_streams", (PyCFunction)(void (*)(void))configure_streams, METH_FASTCALL,
     "configure_streams(ctx_template, stream_template): what open_streams copies."},
    {"invoke_all", (PyCFunction)(void (*)(void))invoke_all, METH_FASTCALL,
     "invoke_all(host, ctx, exports, args): PluginHost._invoke_all, compiled."},
    {"headers_phase", (PyCFunction)(void (*)(void))headers_phase, METH_FASTCALL,
     "headers_phase(streams, phase, pseudo, headers, end_of_stream, code, watched): "
     "phases.headers_phase_py, compiled."},
    {"body_phase", (PyCFunction)(void (*)(void))body_phase, METH_FASTCALL,
     "body_phase(streams, body): phases.body_phase_py, compiled."},
    {"stream_info", (PyCFunction)(void (*)(void))stream_info, METH_FASTCALL,
     "stream_info(request_id, traceparent, tracestate, span, connection, route_name, "
     "cluster_name): phases.stream_info_py, compiled."},
    {"configure_phases", (PyCFunction)(void (*)(void))configure_phases, METH_FASTCALL,
     "configure_phases(map_template, buffer_template, info_template): what the compiled "
     "phases copy; the map's type is the LiveHeaderMap the fast paths edit in place."},
    {"compile_chain", (PyCFunction)(void (*)(void))compile_chain, METH_FASTCALL,
     "compile_chain(template, start): PluginChain's compiled start and phases, as "
     "{name: descriptor} for the class to take; `start` is its reference's function."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef crossing_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "meshgate.gateway.wasm._crossing",
    .m_doc = "Compiled crossings between Python and wasm (calls and host trampolines).",
    .m_size = -1,
    .m_methods = crossing_methods,
};

PyMODINIT_FUNC
PyInit__crossing(void)
{
    if (PyType_Ready(&WasmCallType) < 0 || PyType_Ready(&HostFunctionType) < 0 ||
        PyType_Ready(&EpochClockType) < 0)
        return NULL;
    if (init_fast_paths() < 0 || init_driver() < 0 ||
        init_streams() < 0 || init_phases() < 0 || init_chain() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&crossing_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "WasmCall", (PyObject *)&WasmCallType) < 0 ||
        PyModule_AddObjectRef(m, "HostFunction", (PyObject *)&HostFunctionType) < 0 ||
        PyModule_AddObjectRef(m, "EpochClock", (PyObject *)&EpochClockType) < 0 ||
        PyModule_AddObject(m, "TRAMPOLINE", PyLong_FromVoidPtr((void *)host_trampoline)) < 0 ||
        PyModule_AddObject(m, "DRIVER_EXPORTS", driver_export_names()) < 0 ||
        add_fast_path_names(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
