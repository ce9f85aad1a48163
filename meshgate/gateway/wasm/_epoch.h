/* The epoch clock as a C thread (decision 1500).
 *
 * The per-callback CPU deadline is an epoch count: something must bump the engine's epoch
 * while wasm runs. A Python thread can only do that while it holds the GIL, so every call
 * into wasm had to release the GIL, and every host function the guest called had to take
 * it back: about 1,000 instructions a crossing, 13,000 a request of the rate-limit + auth
 * pair. This thread never touches Python: it calls `wasmtime_engine_increment_epoch`
 * every `interval_s` and counts its bumps in `ticks`, so the compiled calls keep the GIL
 * (`WasmCall` with `hold_gil`).
 */
#include <errno.h>
#include <pthread.h>
#include <time.h>

typedef void (*increment_epoch_fn)(void *engine);
typedef void (*set_deadline_fn)(void *context, uint64_t ticks);

typedef struct {
    PyObject_HEAD
    increment_epoch_fn increment;
    set_deadline_fn set_deadline; /* wasmtime_context_set_epoch_deadline */
    void *engine;          /* wasm_engine_t, owned by `keep` */
    PyObject *keep;        /* the wasmtime.Engine: it must outlive the thread */
    long long interval_ns;
    unsigned long long ticks; /* written by the thread, read with __atomic loads */
    pthread_mutex_t lock;
    pthread_cond_t wake;   /* signalled by stop() */
    pthread_t thread;
    int running;
    int stopping;
} EpochClock;

static void
add_ns(struct timespec *t, long long ns)
{
    t->tv_sec += (time_t)(ns / 1000000000LL);
    t->tv_nsec += (long)(ns % 1000000000LL);
    if (t->tv_nsec >= 1000000000L) {
        t->tv_sec += 1;
        t->tv_nsec -= 1000000000L;
    }
}

static void *
epoch_thread(void *arg)
{
    EpochClock *c = (EpochClock *)arg;
    struct timespec next;
    pthread_mutex_lock(&c->lock);
    while (!c->stopping) {
        /* From now, not from the last tick: after a stall (the process stopped, the
         * machine overloaded) the clock does not catch up in a burst of ticks that would
         * interrupt a callback that has hardly run. */
        clock_gettime(CLOCK_MONOTONIC, &next);
        add_ns(&next, c->interval_ns);
        int rc = 0;
        while (!c->stopping && rc != ETIMEDOUT)
            rc = pthread_cond_timedwait(&c->wake, &c->lock, &next);
        if (c->stopping)
            break;
        c->increment(c->engine);
        __atomic_add_fetch(&c->ticks, 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

static PyObject *
EpochClock_start(EpochClock *c, PyObject *unused)
{
    (void)unused;
    if (c->running)
        Py_RETURN_NONE;
    c->stopping = 0;
    int rc = pthread_create(&c->thread, NULL, epoch_thread, c);
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    c->running = 1;
    Py_RETURN_NONE;
}

static void
stop_clock(EpochClock *c)
{
    if (!c->running)
        return;
    pthread_mutex_lock(&c->lock);
    c->stopping = 1;
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->lock);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(c->thread, NULL);
    Py_END_ALLOW_THREADS
    c->running = 0;
}

static PyObject *
EpochClock_stop(EpochClock *c, PyObject *unused)
{
    (void)unused;
    stop_clock(c);
    Py_RETURN_NONE;
}

static PyObject *
EpochClock_ticks(EpochClock *c, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&c->ticks, __ATOMIC_RELAXED));
}

static PyObject *
EpochClock_running(EpochClock *c, void *closure)
{
    (void)closure;
    return PyBool_FromLong(c->running);
}

static PyObject *
EpochClock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"increment", "engine", "keep", "interval_s", "set_deadline",
                            NULL};
    unsigned long long increment, engine, set_deadline;
    PyObject *keep;
    double interval_s;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKOdK", names, &increment, &engine, &keep,
                                     &interval_s, &set_deadline))
        return NULL;
    if (!(interval_s >= 1e-4 && interval_s <= 60.0)) {
        PyErr_SetString(PyExc_ValueError, "interval_s must be within [0.0001, 60]");
        return NULL;
    }
    EpochClock *c = (EpochClock *)type->tp_alloc(type, 0);
    if (c == NULL)
        return NULL;
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&c->wake, &attr);
    pthread_condattr_destroy(&attr);
    pthread_mutex_init(&c->lock, NULL);
    c->increment = (increment_epoch_fn)(uintptr_t)increment;
    c->set_deadline = (set_deadline_fn)(uintptr_t)set_deadline;
    c->engine = (void *)(uintptr_t)engine;
    c->keep = Py_NewRef(keep);
    c->interval_ns = (long long)(interval_s * 1e9);
    return (PyObject *)c;
}

static void
EpochClock_dealloc(EpochClock *c)
{
    stop_clock(c); /* before the engine it bumps can go */
    pthread_cond_destroy(&c->wake);
    pthread_mutex_destroy(&c->lock);
    Py_CLEAR(c->keep);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef EpochClock_methods[] = {
    {"start", (PyCFunction)EpochClock_start, METH_NOARGS, "Start the thread (idempotent)."},
    {"stop", (PyCFunction)EpochClock_stop, METH_NOARGS,
     "Stop the thread and wait for it (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef EpochClock_getset[] = {
    {"ticks", (getter)EpochClock_ticks, NULL, "How many times the epoch was bumped.", NULL},
    {"running", (getter)EpochClock_running, NULL, "Whether the thread runs.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EpochClockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meshgate.gateway.wasm._crossing.EpochClock",
    .tp_doc = "EpochClock(increment, engine, keep, interval_s, set_deadline)\n"
              "A C thread calling increment(engine) every interval_s; set_deadline is "
              "how the driver arms a store's deadline without Python.",
    .tp_basicsize = sizeof(EpochClock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = EpochClock_new,
    .tp_dealloc = (destructor)EpochClock_dealloc,
    .tp_methods = EpochClock_methods,
    .tp_getset = EpochClock_getset,
};

/* The clock's ticks without a Python object: the driver arms deadlines by it. */
static inline unsigned long long
clock_ticks(PyObject *clock)
{
    return __atomic_load_n(&((EpochClock *)clock)->ticks, __ATOMIC_RELAXED);
}
