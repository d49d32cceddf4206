# Blending kernel: which source each sample of a weighted mixture comes from. The Python wrapper
# (fastlm/blending.py) validates, normalises the weights and allocates; the loop runs without the GIL.
#
# The rule is Megatron-LM's build_blending_indices (BlendedDataset): sample i goes to the source whose
# error weight * max(i, 1) - samples drawn so far is largest, the first such source on ties. The
# arithmetic is the same double expression, so the order equals Megatron's bit for bit. The state at a
# position is only the per-source counts there, which is what makes a blend resumable from any position.
# Up to FEW sources the counts live in registers (_blend_few); more go through _argmax_error.
from libc.math cimport INFINITY
from libc.stdint cimport int16_t, int64_t
from libc.stdlib cimport calloc, free

cdef enum:
    FEW = 8  # at most this many sources have their counts kept in registers


cdef inline void _blend_few(const double* weights, Py_ssize_t n_sources, int64_t start, double* drawn,
                            int16_t* source, int64_t* sample, Py_ssize_t n, Py_ssize_t few) noexcept nogil:
    """The blend over at most `few` (<= FEW) sources with every count in a register: called with a
    constant `few`, the loops below have a constant trip count, so the compiler unrolls them and keeps
    the arrays in registers. A missing source has weight 0 and an infinite count (error -inf, never
    chosen). The loop-carried chain is then a few subtractions, compares and selects, not a store and a
    reload of the chosen count."""
    cdef double w[FEW]
    cdef double d[FEW]
    cdef double x, e, top, chosen
    cdef Py_ssize_t j, s, best
    for s in range(few):
        w[s] = weights[s] if s < n_sources else 0.0
        d[s] = drawn[s] if s < n_sources else INFINITY
    for j in range(n):
        x = <double> (start + j)
        if x < 1.0:
            x = 1.0
        # A strict > keeps the first source on ties, as one scan in order does.
        best = 0
        top = w[0] * x - d[0]
        chosen = d[0]
        for s in range(1, few):
            e = w[s] * x - d[s]
            best = s if e > top else best
            chosen = d[s] if e > top else chosen
            top = e if e > top else top
        source[j] = <int16_t> best
        sample[j] = <int64_t> chosen
        for s in range(few):
            d[s] = d[s] + 1.0 if s == best else d[s]
    for s in range(n_sources):
        drawn[s] = d[s]


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
    cdef double x
    # Counts as doubles: exact below 2**53, and the loop then converts nothing.
    cdef double* drawn = <double*> calloc(2 * n_sources, sizeof(double))
    if drawn == NULL:
        raise MemoryError()
    cdef double* errors = drawn + n_sources
    for s in range(n_sources):
        drawn[s] = <double> counts[s]
    with nogil:
        # Two constant sizes: four registers suffice for most mixtures and run twice as fast as eight.
        if n_sources <= 4:
            _blend_few(&weights[0], n_sources, start, drawn, &source[0] if n else NULL,
                       &sample[0] if n else NULL, n, 4)
        elif n_sources <= FEW:
            _blend_few(&weights[0], n_sources, start, drawn, &source[0] if n else NULL,
                       &sample[0] if n else NULL, n, FEW)
        else:
            for j in range(n):
                x = <double> (start + j)
                if x < 1.0:
                    x = 1.0
                best = _argmax_error(&weights[0], drawn, errors, n_sources, x)
                source[j] = <int16_t> best
                sample[j] = <int64_t> drawn[best]
                drawn[best] += 1.0
    for s in range(n_sources):
        counts[s] = <int64_t> drawn[s]
    free(drawn)
