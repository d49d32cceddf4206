# Python lists of token ids -> int64 arrays: the boundary with HF batches (datasets.map batches, collator
# features). Python ints must be unboxed one by one, so this needs the GIL by nature; it still runs
# several times faster than numpy's generic conversion of nested lists.
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLong
from libc.stdint cimport int64_t


def copy_int_lists(list rows, int64_t[::1] out, const int64_t[::1] dest):
    """Copy row r (a list of ints) to out[dest[r]:dest[r] + len(row)]; the caller sizes out and dest."""
    cdef Py_ssize_t r, i, n, start
    cdef object row
    if dest.shape[0] != PyList_GET_SIZE(rows):
        raise ValueError(f"{PyList_GET_SIZE(rows)} rows but {dest.shape[0]} destinations")
    for r in range(PyList_GET_SIZE(rows)):
        row = <object> PyList_GET_ITEM(rows, r)
        if type(row) is not list:
            raise TypeError(f"row {r} is a {type(row).__name__}, expected a list of ints")
        n = PyList_GET_SIZE(row)
        start = dest[r]
        if start < 0 or start + n > out.shape[0]:
            raise ValueError(f"row {r} ({n} ids) does not fit at {start} in {out.shape[0]} slots")
        for i in range(n):
            out[start + i] = PyLong_AsLongLong(<object> PyList_GET_ITEM(row, i))
