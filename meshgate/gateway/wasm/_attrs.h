/* Attribute access by name, remembered per call site (decision 1100).
 *
 * The driver and the fast paths read the host's Python objects through their attributes,
 * about 30 times a callback. `PyObject_GetAttr` looks the name up in the type and then
 * in the instance each time. For a class with `__slots__`, the name resolves to a member
 * descriptor at a fixed offset in the object: each call site remembers that offset with
 * the type and the type's version tag, and reads or writes the slot directly while both
 * still match. Anything else (another type, a class changed since, a plain attribute in
 * a `__dict__`, an unset slot) takes the generic path, so the Python classes decide.
 *
 * Every call site has its own cache (`GETATTR`/`SETATTR` declare it), so a helper used
 * for several types must take the cache from its caller.
 */
#include <structmember.h>

typedef struct {
    PyObject *name;       /* the name resolved (borrowed: the call site's interned name) */
    PyTypeObject *type;   /* strong reference; NULL until resolved */
    unsigned int version; /* the type's tp_version_tag when resolved */
    Py_ssize_t offset;    /* of an object member; 0: the generic path */
} attr_cache;

/* attr_slot's resolution, when the call site's cache does not match: kept out of line,
 * so that the check every access makes is inlined at its call site. */
static __attribute__((noinline)) PyObject **
attr_resolve(PyObject *obj, PyObject *name, attr_cache *c)
{
    PyTypeObject *tp = Py_TYPE(obj);
    PyObject *descr = _PyType_Lookup(tp, name); /* borrowed; assigns a version tag */
    Py_ssize_t offset = 0;
    /* Only where Python itself would end at the member: the generic attribute protocol
     * (no __getattribute__/__setattr__ of the class's own) and a slot member. */
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
        tp->tp_getattro == PyObject_GenericGetAttr &&
        tp->tp_setattro == PyObject_GenericSetAttr) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY))
            offset = member->offset;
    }
    if (!PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG) || tp->tp_version_tag == 0)
        return NULL; /* nothing to key a cache on: generic path, resolve again next time */
    Py_INCREF(tp);
    Py_XSETREF(c->type, tp);
    c->name = name;
    c->version = tp->tp_version_tag;
    c->offset = offset;
    return offset ? (PyObject **)((char *)obj + offset) : NULL;
}

/* The slot `name` lives in, in `obj`, or NULL for the generic path. Must not run with an
 * exception pending (the type lookup may clear it). A class that changes gets version
 * tag 0, which no cache holds: the tag alone guards the offset, as it guards CPython's
 * own specialised slot reads (LOAD_ATTR_SLOT). */
static inline __attribute__((always_inline)) PyObject **
attr_slot(PyObject *obj, PyObject *name, attr_cache *c)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (tp == c->type && tp->tp_version_tag == c->version && name == c->name)
        return c->offset ? (PyObject **)((char *)obj + c->offset) : NULL;
    return attr_resolve(obj, name, c);
}

static inline __attribute__((always_inline)) PyObject *
cached_getattr(PyObject *obj, PyObject *name, attr_cache *c)
{
    PyObject **slot = attr_slot(obj, name, c);
    if (slot != NULL && *slot != NULL)
        return Py_NewRef(*slot);
    return PyObject_GetAttr(obj, name); /* also the AttributeError of an unset slot */
}

static inline __attribute__((always_inline)) int
cached_setattr(PyObject *obj, PyObject *name, PyObject *value, attr_cache *c)
{
    PyObject **slot = attr_slot(obj, name, c);
    if (slot == NULL)
        return PyObject_SetAttr(obj, name, value);
    Py_XSETREF(*slot, Py_NewRef(value));
    return 0;
}

#define GETATTR(obj, name) \
    ({ static attr_cache cache_; cached_getattr((obj), (name), &cache_); })
#define SETATTR(obj, name, value) \
    ({ static attr_cache cache_; cached_setattr((obj), (name), (value), &cache_); })
