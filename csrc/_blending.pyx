# Blending kernel: which source each sample of a weighted mixture comes from. The Python wrapper
# (fastlm/blending.py) validates, normalises the weights and allocates; the loop runs without the GIL.
#
# The rule is Megatron-LM's build_blending_indices (BlendedDataset): sample i goes to the source whose
# error weight * max(i, 1) - samples drawn so far is largest, the first such source on ties. The
# arithmetic is the same double expression, so the order equals Megatron's bit for bit. The state at a
# position is only the per-source counts there, which is what makes a blend resumable from any position.
from libc.stdint cimport int16_t, int64_t
from libc.stdlib cimport free, malloc

# Below this many sources one branch-free scan is quickest; from it on, the three passes of
# _argmax_error (whose vector loop and independent maxima pay off only over many sources).
cdef Py_ssize_t _FEW_SOURCES = 8


cdef inline Py_ssize_t _scan_argmax(const double* weights, const double* drawn, Py_ssize_t n_sources,
                                    double x) noexcept nogil:
    """The first source with the largest weights[s] * x - drawn[s], by one scan (few sources)."""
    cdef Py_ssize_t s, best = 0
    cdef double error, top = weights[0] * x - drawn[0]
    for s in range(1, n_sources):
        error = weights[s] * x - drawn[s]
        # Conditional moves, not a branch: with few sources the winner alternates unpredictably.
        best = s if error > top else best
        top = error if error > top else top
    return best


cdef inline Py_ssize_t _argmax_error(const double* weights, const double* drawn, double* errors,
                                     Py_ssize_t n_sources, double x) noexcept nogil:
    """The first source with the largest weights[s] * x - drawn[s].

    Three plain passes instead of one scan with a data-dependent branch: the errors (a loop the compiler
    vectorises), their maximum over four independent accumulators (`e > m ? e : m` is one maxsd, exact,
    and the errors are never NaN), then the first source whose error equals it, which is the source a
    scan with a strict > keeps.
    """
    cdef Py_ssize_t s
    cdef double top0, top1, top2, top3, e
    for s in range(n_sources):
        errors[s] = weights[s] * x - drawn[s]
    top0 = top1 = top2 = top3 = errors[0]
    s = 0
    while s + 4 <= n_sources:
        e = errors[s]
        top0 = e if e > top0 else top0
        e = errors[s + 1]
        top1 = e if e > top1 else top1
        e = errors[s + 2]
        top2 = e if e > top2 else top2
        e = errors[s + 3]
        top3 = e if e > top3 else top3
        s += 4
    while s < n_sources:
        e = errors[s]
        top0 = e if e > top0 else top0
        s += 1
    top0 = top1 if top1 > top0 else top0
    top0 = top2 if top2 > top0 else top0
    top0 = top3 if top3 > top0 else top0
    s = 0
    while errors[s] != top0:
        s += 1
    return s


def fill_blending_index(const double[::1] weights, int64_t start, int64_t[::1] counts,
                        int16_t[::1] source, int64_t[::1] sample):
    """Fill source[j] and sample[j] (that source's sample number) for blend positions start + j.

    counts[s] holds source s's samples drawn before `start` and is advanced to the counts after the
    last position filled.
    """
    cdef Py_ssize_t n_sources = weights.shape[0], n = source.shape[0], j, s, best
    cdef double x, error, best_error
    # Counts as doubles: exact below 2**53, and the loop then converts nothing.
    cdef double* drawn = <double*> malloc(2 * n_sources * sizeof(double))
    cdef double* errors = drawn + n_sources
    if drawn == NULL:
        raise MemoryError()
    for s in range(n_sources):
        drawn[s] = <double> counts[s]
    with nogil:
        for j in range(n):
            x = <double> (start + j)
            if x < 1.0:
                x = 1.0
            if n_sources < _FEW_SOURCES:
                best = _scan_argmax(&weights[0], drawn, n_sources, x)
            else:
                best = _argmax_error(&weights[0], drawn, errors, n_sources, x)
            source[j] = <int16_t> best
            sample[j] = <int64_t> drawn[best]
            drawn[best] += 1.0
    for s in range(n_sources):
        counts[s] = <int64_t> drawn[s]
    free(drawn)
