# Python lists of token ids -> int64 arrays: the boundary with HF batches (datasets.map batches, collator
# features). Python ints must be unboxed one by one, so this needs the GIL by nature; it still runs
# several times faster than numpy's generic conversion of nested lists.
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLong
from libc.stdint cimport int64_t


def copy_int_lists(list rows, int64_t[::1] out, const int64_t[::1] dest):
    """Copy row r (a list of ints) to out[dest[r]:dest[r] + len(row)]; the caller sizes out and dest.

    An id that is not an int (a float would be truncated) is a TypeError; a missing id (None, an Arrow
    null) or one outside int64 is a ValueError. Both name the row and position.
    """
    cdef Py_ssize_t r, i = 0, n, start
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
        # One try per row, not per id: the loop stays a plain C loop.
        try:
            for i in range(n):
                out[start + i] = PyLong_AsLongLong(<object> PyList_GET_ITEM(row, i))
        except OverflowError:
            raise ValueError(f"row {r}, position {i}: {row[i]} does not fit in int64") from None
        except TypeError:
            if row[i] is None:
                raise ValueError(f"row {r}, position {i} is None (a missing id)") from None
            raise TypeError(f"row {r}, position {i} is a {type(row[i]).__name__}, expected an int id") from None
