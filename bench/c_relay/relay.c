/* The record relay out of the interpreter: a bench floor, not part of the product.
 *
 * bench/bare_bio_splice.py with BARE_BIO_C_RELAY=1 (built on demand by
 * bench/c_relay/build.py with the host's cc, this Python's headers and the
 * libssl that CPython's _ssl is linked against). A Relay is registered as a
 * linked connection's reader callback: the loop (uvloop) calls it directly
 * (tp_call), and on a readable event it runs, with no Python frame,
 *
 *     SSL_read_ex(src) -> SSL_write_ex(dst, the same bytes)
 *
 * on the two connections' own SSL*s (socket BIOs: OpenSSL reads and writes the
 * descriptors), a record at a time while SSL_has_pending(src) says OpenSSL
 * holds more (read-ahead on), at most MAX_READS_PER_WAKE records an event.
 *
 * Anything else goes back to Python, as TLSConnection would handle it:
 * - the connections not both on the hot path (read from the TLSConnection's
 *   own slots: state, detour, paused, eof, a read wanting a write, writes held,
 *   a write waiting on dst): `fallback()` (the connection's _on_readable);
 * - a read that ends (close_notify, FIN, socket failure, TLS error) or wants a
 *   write: `on_read_end(src, kind, reason)`;
 * - a write that did not finish (WANT_WRITE: flow control; WANT_READ) or failed:
 *   `on_write_failed(dst, kind, reason, bytes)`, and then `fallback()` if src
 *   still holds records (no poll event would say so);
 * - the bound reached with records held: `later(self)` (loop.call_soon).
 *
 * The TLSConnection's slots are read at their member offsets (CPython's
 * PyMemberDescrObject, checked to be __slots__ object members at setup), and the
 * SSL*s are the ones bare_bio_splice.py reads from CPython's PySSLSocket and
 * checks against OpenSSL (SSL_get_SSL_CTX) before a Relay is made.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define MAX_READS_PER_WAKE 16
/* A record's plaintext is at most 16 KiB: SSL_read_ex returns one at most. */
#define RECORD_MAX 16384

static unsigned char relay_buffer[RECORD_MAX];

/* The TLSConnection slots read (their offsets in the object), set by setup(). */
enum {
    S_STATE,
    S_DETOUR,
    S_PAUSED,
    S_EOF,
    S_WANT_WRITE_FOR_READ,
    S_HELD,
    S_OUT,
    S_COUNT
};
static const char *slot_names[S_COUNT] = {
    "_state", "_detour", "_paused", "_eof", "_want_write_for_read", "_held", "_out",
};
static Py_ssize_t slot_offset[S_COUNT];
static PyObject *open_state; /* tls_socket._OPEN */
static int set_up;

static PyObject *kind_zero, *kind_eof, *kind_socket, *kind_ssl, *kind_want_read,
    *kind_want_write;

typedef struct {
    PyObject_HEAD
    SSL *src;
    SSL *dst;
    PyObject *src_conn;
    PyObject *dst_conn;
    PyObject *fallback;        /* src_conn._on_readable */
    PyObject *on_read_end;     /* (src_conn, kind, reason) */
    PyObject *on_write_failed; /* (dst_conn, kind, reason, bytes) */
    PyObject *later;           /* loop.call_soon */
    unsigned long long records; /* relayed in C */
    unsigned long long handed_back;
} Relay;

static inline PyObject *
slot(PyObject *conn, int which)
{
    return *(PyObject **)((char *)conn + slot_offset[which]);
}

/* Both connections where TLSConnection._on_readable would read at once and
 * `_write_fused` write at once. */
static inline int
on_hot_path(Relay *self)
{
    PyObject *src = self->src_conn, *dst = self->dst_conn;
    return slot(src, S_STATE) == open_state && slot(src, S_DETOUR) == Py_False
           && slot(src, S_PAUSED) == Py_False && slot(src, S_EOF) == Py_False
           && slot(src, S_WANT_WRITE_FOR_READ) == Py_False && slot(src, S_HELD) == Py_False
           && slot(dst, S_STATE) == open_state && slot(dst, S_OUT) == Py_None;
}

/* What SSL_get_error `err` is, as a kind and OpenSSL's reason (or None). */
static PyObject *
classify(int err, PyObject **reason)
{
    *reason = Py_None;
    switch (err) {
    case SSL_ERROR_ZERO_RETURN:
        return kind_zero;
    case SSL_ERROR_WANT_READ:
        return kind_want_read;
    case SSL_ERROR_WANT_WRITE:
        return kind_want_write;
    case SSL_ERROR_SYSCALL:
        return kind_socket;
    default: {
        unsigned long e = ERR_peek_last_error();
        if (ERR_GET_LIB(e) == ERR_LIB_SSL
            && ERR_GET_REASON(e) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
            return kind_eof;
        }
        const char *text = e ? ERR_reason_error_string(e) : NULL;
        if (text != NULL) {
            *reason = PyUnicode_FromString(text);
            if (*reason == NULL) {
                PyErr_Clear();
                *reason = Py_None;
            }
        }
        return kind_ssl;
    }
    }
}

static PyObject *
relay_call(Relay *self, PyObject *args, PyObject *kwargs)
{
    if (!on_hot_path(self)) {
        self->handed_back++;
        return PyObject_CallNoArgs(self->fallback);
    }
    SSL *src = self->src, *dst = self->dst;
    int wanted_read = 0;
    for (int i = 0; i < MAX_READS_PER_WAKE; i++) {
        size_t n = 0;
        ERR_clear_error();
        int r = SSL_read_ex(src, relay_buffer, sizeof relay_buffer, &n);
        if (r <= 0) {
            int err = SSL_get_error(src, r);
            if (err == SSL_ERROR_WANT_READ) {
                /* A post-handshake message taken (AUTO_RETRY is cleared): read on
                 * once if OpenSSL holds more, which no poll event would say. */
                if (!wanted_read && SSL_has_pending(src)) {
                    wanted_read = 1;
                    continue;
                }
                Py_RETURN_NONE;
            }
            PyObject *reason;
            PyObject *kind = classify(err, &reason);
            ERR_clear_error();
            self->handed_back++;
            PyObject *res = PyObject_CallFunctionObjArgs(
                self->on_read_end, self->src_conn, kind, reason, NULL);
            if (reason != Py_None) {
                Py_DECREF(reason);
            }
            return res;
        }
        wanted_read = 0;
        size_t written = 0;
        int w = SSL_write_ex(dst, relay_buffer, n, &written);
        if (w <= 0) {
            PyObject *reason;
            PyObject *kind = classify(SSL_get_error(dst, w), &reason);
            ERR_clear_error();
            self->handed_back++;
            PyObject *data = PyBytes_FromStringAndSize((const char *)relay_buffer, n);
            PyObject *res = NULL;
            if (data != NULL) {
                res = PyObject_CallFunctionObjArgs(
                    self->on_write_failed, self->dst_conn, kind, reason, data, NULL);
                Py_DECREF(data);
            }
            if (reason != Py_None) {
                Py_DECREF(reason);
            }
            if (res == NULL) {
                return NULL;
            }
            Py_DECREF(res);
            if (SSL_has_pending(src)) {
                return PyObject_CallNoArgs(self->fallback);
            }
            Py_RETURN_NONE;
        }
        self->records++;
        if (!SSL_has_pending(src)) {
            Py_RETURN_NONE;
        }
    }
    return PyObject_CallOneArg(self->later, (PyObject *)self);
}

static PyObject *
relay_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"src_conn", "dst_conn", "src_ssl", "dst_ssl", "fallback",
                             "on_read_end", "on_write_failed", "later", NULL};
    PyObject *src_conn, *dst_conn, *fallback, *on_read_end, *on_write_failed, *later;
    unsigned long long src_ssl, dst_ssl;
    if (!set_up) {
        PyErr_SetString(PyExc_RuntimeError, "call _c_relay.setup(TLSConnection, _OPEN) first");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOKKOOOO", kwlist, &src_conn, &dst_conn,
                                     &src_ssl, &dst_ssl, &fallback, &on_read_end,
                                     &on_write_failed, &later)) {
        return NULL;
    }
    if (!src_ssl || !dst_ssl) {
        PyErr_SetString(PyExc_ValueError, "an SSL pointer is NULL");
        return NULL;
    }
    Relay *self = (Relay *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->src = (SSL *)(uintptr_t)src_ssl;
    self->dst = (SSL *)(uintptr_t)dst_ssl;
    self->src_conn = Py_NewRef(src_conn);
    self->dst_conn = Py_NewRef(dst_conn);
    self->fallback = Py_NewRef(fallback);
    self->on_read_end = Py_NewRef(on_read_end);
    self->on_write_failed = Py_NewRef(on_write_failed);
    self->later = Py_NewRef(later);
    return (PyObject *)self;
}

static int
relay_traverse(Relay *self, visitproc visit, void *arg)
{
    Py_VISIT(self->src_conn);
    Py_VISIT(self->dst_conn);
    Py_VISIT(self->fallback);
    Py_VISIT(self->on_read_end);
    Py_VISIT(self->on_write_failed);
    Py_VISIT(self->later);
    return 0;
}

static int
relay_clear(Relay *self)
{
    Py_CLEAR(self->src_conn);
    Py_CLEAR(self->dst_conn);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->on_read_end);
    Py_CLEAR(self->on_write_failed);
    Py_CLEAR(self->later);
    return 0;
}

static void
relay_dealloc(Relay *self)
{
    PyObject_GC_UnTrack(self);
    relay_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef relay_members[] = {
    {"records", T_ULONGLONG, offsetof(Relay, records), READONLY, "records relayed in C"},
    {"handed_back", T_ULONGLONG, offsetof(Relay, handed_back), READONLY,
     "events and failures handed to Python"},
    {NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_c_relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A linked connection's reader: SSL_read -> the peer's SSL_write in C.",
    .tp_new = relay_new,
    .tp_call = (ternaryfunc)relay_call,
    .tp_traverse = (traverseproc)relay_traverse,
    .tp_clear = (inquiry)relay_clear,
    .tp_dealloc = (destructor)relay_dealloc,
    .tp_members = relay_members,
};

/* setup(TLSConnection, _OPEN): the slots' offsets, each checked to be an object
 * member of __slots__ (a PyMemberDescrObject of type T_OBJECT_EX). */
static PyObject *
relay_setup(PyObject *module, PyObject *args)
{
    PyObject *cls, *open;
    if (!PyArg_ParseTuple(args, "O!O", &PyType_Type, &cls, &open)) {
        return NULL;
    }
    for (int i = 0; i < S_COUNT; i++) {
        PyObject *descr = PyObject_GetAttrString(cls, slot_names[i]);
        if (descr == NULL) {
            return NULL;
        }
        if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)
            || ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
            PyErr_Format(PyExc_TypeError, "%R.%s is not an object slot", cls, slot_names[i]);
            Py_DECREF(descr);
            return NULL;
        }
        slot_offset[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
    }
    Py_XSETREF(open_state, Py_NewRef(open));
    set_up = 1;
    Py_RETURN_NONE;
}

/* The OpenSSL this module was built against and the one loaded (major.minor). */
static PyObject *
relay_openssl_versions(PyObject *module, PyObject *unused)
{
    return Py_BuildValue("(kk)", (unsigned long)OPENSSL_VERSION_NUMBER,
                         (unsigned long)OpenSSL_version_num());
}

static PyMethodDef module_methods[] = {
    {"setup", relay_setup, METH_VARARGS, "setup(TLSConnection, _OPEN)"},
    {"openssl_versions", relay_openssl_versions, METH_NOARGS,
     "(built against, loaded) OPENSSL_VERSION_NUMBERs"},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_c_relay", "The bench's record relay in C.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__c_relay(void)
{
    if (PyType_Ready(&RelayType) < 0) {
        return NULL;
    }
    kind_zero = PyUnicode_InternFromString("zero");
    kind_eof = PyUnicode_InternFromString("eof");
    kind_socket = PyUnicode_InternFromString("socket");
    kind_ssl = PyUnicode_InternFromString("ssl");
    kind_want_read = PyUnicode_InternFromString("want_read");
    kind_want_write = PyUnicode_InternFromString("want_write");
    if (!kind_zero || !kind_eof || !kind_socket || !kind_ssl || !kind_want_read
        || !kind_want_write) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
