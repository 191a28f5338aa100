/* The scheduler's two walks over a step's decode rows, in C (engine.decode_walks).
 *
 * Every step walks every running request twice: once to schedule its decode row
 * (Scheduler._schedule_decodes) and once to apply the token it sampled
 * (Scheduler._update_decodes). A simulation of a production trace makes millions of such
 * rows; in Python each costs ~0.7 us, here a fraction of that. Only the common rows are
 * handled here, the way the Python walks handle them, attribute by attribute (a row whose
 * slot needs a block calls the KV-cache manager for it); every other row (blocks short, so
 * someone is preempted; a stop rule to check; several tokens) is handed back to Python
 * through a callback, in its place in the walk, so the order of every side effect is the
 * Python walks'. Built and loaded through ctypes.PyDLL (the GIL held, exceptions raised).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Request attribute names, interned once. */
static PyObject *s_prompt, *s_output, *s_computed, *s_block_ids, *s_request_id, *s_status,
    *s_first_stop;

static int intern_names(void)
{
    if (s_first_stop)
        return 0;
    s_prompt = PyUnicode_InternFromString("prompt_token_ids");
    s_output = PyUnicode_InternFromString("output_token_ids");
    s_computed = PyUnicode_InternFromString("num_computed_tokens");
    s_block_ids = PyUnicode_InternFromString("block_ids");
    s_request_id = PyUnicode_InternFromString("request_id");
    s_status = PyUnicode_InternFromString("status");
    s_first_stop = PyUnicode_InternFromString("first_stop_output_len");
    return s_prompt && s_output && s_computed && s_block_ids && s_request_id && s_status
        && s_first_stop ? 0 : -1;
}

/* An int attribute of `obj` as a Py_ssize_t; -1 with an exception on failure. */
static Py_ssize_t int_attr(PyObject *obj, PyObject *name, PyObject **value)
{
    *value = PyObject_GetAttr(obj, name);
    if (!*value)
        return -1;
    return PyLong_AsSsize_t(*value);
}

/* One request's decode row, or its hand-back (see xy_schedule_decodes); 0 on success. */
static int schedule_one(PyObject *request, Py_ssize_t block_size, PyObject *columns[4],
                        PyObject *others, PyObject *allocate_slots, PyObject *preempting,
                        Py_ssize_t *token_budget)
{
    int status = -1;
    PyObject *prompt = NULL, *output = NULL, *computed = NULL, *block_ids = NULL,
             *request_id = NULL, *token = NULL, *pair = NULL, *taken = NULL, *one = NULL,
             *allocated = NULL;
    Py_ssize_t num_computed, num_prompt, num_output, num_behind, num_blocks;

    if (!(prompt = PyObject_GetAttr(request, s_prompt))
        || !(output = PyObject_GetAttr(request, s_output)))
        goto done;
    num_computed = int_attr(request, s_computed, &computed);
    if (num_computed == -1 && PyErr_Occurred())
        goto done;
    if ((num_prompt = PyObject_Length(prompt)) < 0 || (num_output = PyObject_Length(output)) < 0)
        goto done;
    num_behind = num_prompt + num_output - num_computed;
    if (num_behind != 1) {
        if (num_behind > 1) {  /* the second pass's: (request, how far behind) */
            PyObject *behind = PyLong_FromSsize_t(num_behind);
            if (!behind || !(pair = PyTuple_Pack(2, request, behind))) {
                Py_XDECREF(behind);
                goto done;
            }
            Py_DECREF(behind);
            if (PyList_Append(others, pair) < 0)
                goto done;
        }
        status = 0;
        goto done;
    }
    if (!(block_ids = PyObject_GetAttr(request, s_block_ids))
        || (num_blocks = PyObject_Length(block_ids)) < 0)
        goto done;
    if (num_computed >= num_blocks * block_size) {  /* its slot needs a block */
        if (!(one = PyLong_FromLong(1))
            || !(allocated = PyObject_CallFunctionObjArgs(allocate_slots, request, one, NULL)))
            goto done;
        int ok = PyObject_IsTrue(allocated);
        if (ok < 0)
            goto done;
        if (!ok) {  /* short of blocks: Python's path, preempting */
            if (!(taken = PyObject_CallOneArg(preempting, request)))
                goto done;
            Py_ssize_t n = PyLong_AsSsize_t(taken);
            if (n == -1 && PyErr_Occurred())
                goto done;
            *token_budget -= n;
            status = 0;
            goto done;
        }
        Py_DECREF(block_ids);  /* (replaced by the allocation) */
        if (!(block_ids = PyObject_GetAttr(request, s_block_ids)))
            goto done;
    }
    /* the row, its last token */
    if (!(request_id = PyObject_GetAttr(request, s_request_id)))
        goto done;
    token = num_output ? PySequence_GetItem(output, num_output - 1)
                       : PySequence_GetItem(prompt, num_prompt - 1);
    if (!token || PyList_Append(columns[0], request_id) < 0
        || PyList_Append(columns[1], computed) < 0 || PyList_Append(columns[2], token) < 0
        || PyList_Append(columns[3], block_ids) < 0)
        goto done;
    *token_budget -= 1;
    status = 0;
done:
    Py_XDECREF(prompt);
    Py_XDECREF(output);
    Py_XDECREF(computed);
    Py_XDECREF(block_ids);
    Py_XDECREF(request_id);
    Py_XDECREF(token);
    Py_XDECREF(pair);
    Py_XDECREF(taken);
    Py_XDECREF(one);
    Py_XDECREF(allocated);
    return status;
}

/* Scheduler._schedule_decodes' walk over `running` (a list) within `token_budget`: the decode
 * rows appended to `columns` (a 4-tuple of lists: request ids, positions, tokens, block
 * tables), (request, tokens behind) of requests further behind to `others`. A row whose slot
 * needs a block gets it from `allocate_slots(request, 1)` (KVCacheManager's), and where that
 * fails is handed to `preempting(request)`, which returns the budget it took. A callback may
 * shorten `running` (a preemption pops its tail): the walk reads its length afresh at each
 * request, as a list iterator does. Returns the budget left, or NULL with an exception. */
PyObject *xy_schedule_decodes(PyObject *running, Py_ssize_t token_budget, Py_ssize_t block_size,
                              PyObject *columns, PyObject *others, PyObject *allocate_slots,
                              PyObject *preempting)
{
    if (intern_names() < 0)
        return NULL;
    if (!PyList_Check(running) || !PyTuple_Check(columns) || PyTuple_GET_SIZE(columns) != 4
        || !PyList_Check(others)) {
        PyErr_SetString(PyExc_TypeError, "xy_schedule_decodes: bad arguments");
        return NULL;
    }
    PyObject *cols[4];
    for (int c = 0; c < 4; c++) {
        cols[c] = PyTuple_GET_ITEM(columns, c);
        if (!PyList_Check(cols[c])) {
            PyErr_SetString(PyExc_TypeError, "xy_schedule_decodes: columns must be lists");
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(running) && token_budget > 0; i++) {
        PyObject *request = PyList_GET_ITEM(running, i);
        Py_INCREF(request);  /* (a callback may take it off the list) */
        int failed = schedule_one(request, block_size, cols, others, allocate_slots, preempting,
                                  &token_budget);
        Py_DECREF(request);
        if (failed)
            return NULL;
    }
    return PyLong_FromSsize_t(token_budget);
}

/* One decode row's update, or its hand-back (see xy_update_decodes); 0 on success. */
static int update_one(PyObject *request_id, PyObject *requests, PyObject *running,
                      PyObject *all_sampled, Py_ssize_t block_size, PyObject *cache_full_blocks,
                      int finished_only, PyObject *token_updates, PyObject *general)
{
    int status = -1;
    PyObject *request_status = NULL, *sampled = NULL, *output = NULL, *first_stop = NULL,
             *computed = NULL, *next = NULL, *row = NULL, *result = NULL;
    PyObject *request = PyDict_GetItemWithError(requests, request_id);  /* borrowed */
    if (!request)
        return PyErr_Occurred() ? -1 : 0;  /* finished meanwhile */
    Py_INCREF(request);
    if (!(request_status = PyObject_GetAttr(request, s_status)))
        goto done;
    if (request_status != running) {
        status = 0;
        goto done;
    }
    if (!(sampled = PyObject_GetItem(all_sampled, request_id))
        || !(output = PyObject_GetAttr(request, s_output)))
        goto done;
    Py_ssize_t first_stop_len = int_attr(request, s_first_stop, &first_stop);
    if (first_stop_len == -1 && PyErr_Occurred())
        goto done;
    if (!PyTuple_CheckExact(sampled) || PyTuple_GET_SIZE(sampled) != 1
        || !PyList_CheckExact(output) || PyList_GET_SIZE(output) + 1 >= first_stop_len) {
        /* several tokens, or a stop rule to check: Python's general row */
        result = PyObject_CallOneArg(general, request_id);
        status = result ? 0 : -1;
        goto done;
    }
    Py_ssize_t num_computed = int_attr(request, s_computed, &computed);
    if (num_computed == -1 && PyErr_Occurred())
        goto done;
    num_computed += 1;
    if (!(next = PyLong_FromSsize_t(num_computed))
        || PyObject_SetAttr(request, s_computed, next) < 0
        || PyList_Append(output, PyTuple_GET_ITEM(sampled, 0)) < 0)
        goto done;
    if (block_size && num_computed % block_size == 0) {  /* its token filled a block */
        if (!(result = PyObject_CallOneArg(cache_full_blocks, request)))
            goto done;
    }
    if (!finished_only) {
        if (!(row = PyTuple_Pack(4, request_id, sampled, Py_None, Py_None))
            || PyList_Append(token_updates, row) < 0)
            goto done;
    }
    status = 0;
done:
    Py_DECREF(request);
    Py_XDECREF(request_status);
    Py_XDECREF(sampled);
    Py_XDECREF(output);
    Py_XDECREF(first_stop);
    Py_XDECREF(computed);
    Py_XDECREF(next);
    Py_XDECREF(row);
    Py_XDECREF(result);
    return status;
}

/* Scheduler._update_decodes' walk over the decode rows' `request_ids` (a sequence): each request
 * of `requests` (a dict) whose status is `running` and that sampled one token (`all_sampled`,
 * a mapping to tuples) short of its first stop length gets it appended and its computed
 * tokens advanced; `cache_full_blocks(request)` where that token fills a block (block_size 0:
 * no prefix caching); its row (id, tokens, None, None) appended to `token_updates` unless
 * `finished_only`. Every other running row is `general(request_id)`'s. Returns None, or NULL
 * with an exception. */
PyObject *xy_update_decodes(PyObject *request_ids, PyObject *requests, PyObject *running,
                            PyObject *all_sampled, Py_ssize_t block_size,
                            PyObject *cache_full_blocks, int finished_only,
                            PyObject *token_updates, PyObject *general)
{
    if (intern_names() < 0)
        return NULL;
    if (!PyDict_Check(requests) || !PyList_Check(token_updates)) {
        PyErr_SetString(PyExc_TypeError, "xy_update_decodes: bad arguments");
        return NULL;
    }
    PyObject *ids = PySequence_Fast(request_ids, "xy_update_decodes: request ids");
    if (!ids)
        return NULL;
    int failed = 0;
    for (Py_ssize_t i = 0; !failed && i < PySequence_Fast_GET_SIZE(ids); i++) {
        PyObject *request_id = PySequence_Fast_GET_ITEM(ids, i);
        Py_INCREF(request_id);
        failed = update_one(request_id, requests, running, all_sampled, block_size,
                            cache_full_blocks, finished_only, token_updates, general);
        Py_DECREF(request_id);
    }
    Py_DECREF(ids);
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}
