# Masked-LM masking kernels. The Python wrapper (fastlm/masking.py) validates, builds the per-vocabulary
# tables and allocates; everything here runs without the GIL, drawing from a numpy bit generator.
#
# Vocabulary of terms:
# - an *eligible* token has attention 1 and eligible[id] set (specials are cleared in that table);
# - a *unit* is what gets selected: one eligible token, or with whole-word masking a word (an eligible
#   token flagged as a word start, or following an ineligible one, plus the eligible non-start tokens after
#   it). Word starts come from a per-vocabulary table (word_start[id]) or, when the caller knows each
#   position's word (offsets, word ids), from a per-position table (word_start_at[row, i]), which wins;
# - every selected token becomes a target (label = its id) and is then replaced: u < mask_threshold ->
#   mask id, u < random_threshold -> a uniform draw from `pool` (the non-special ids), else kept.
#
# Draw order is part of the contract (golden hashes and tests/reference.py pin it). Draws are next_uint32
# (PCG64 yields two per 64-bit step) unless stated; probabilities arrive as thresholds p * 2**32.
# - bernoulli: Bernoulli trials over the batch's units (row-major) by geometric skipping: the count of
#   unselected units before the next selected one (the gap) is drawn by inversion, so a batch costs one
#   draw per *selected* unit instead of one per token. gap(u) for a 32-bit u is the largest k with
#   u < gap_table[k] (gap_table[k] = round((1 - p)**k * 2**32), k < K); gap_guess[u >> 22] is where the
#   search starts. If u < gap_table[K] the gap is K plus a gap from a fresh next_uint32 (memorylessness).
#   One next_uint64 at each selected unit's start: its low 32 bits give the next gap, its high 32 bits
#   the replacement draw of that unit's first token; the batch's first gap comes from one next_uint32.
#   Further tokens of a selected word draw next_uint32 for their replacement; a token that becomes a
#   random id draws once more (bounded). Token-level rows first list their eligible positions, so the
#   gaps jump through that list; whole-word rows walk token by token.
# - exact: round(p * units) units per row by selection sampling (Knuth's algorithm S): at each unit start
#   one bounded draw in [0, units left), selected if below the count still to choose; replacement as above.
# - span: budget round(p * eligible tokens); until the budget is reached: a span length (truncated
#   geometric, drawn by coins), a start unit (bounded draw), the span's units selected; then the row's
#   replacement draws in token order.
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.math cimport floor
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from _bitgen cimport bitgen_t
from _types cimport token_t

# -100 is the label PyTorch's cross-entropy ignores (ignore_index); HF uses the same value.
cdef int64_t IGNORE_INDEX = -100

cdef enum:
    _BERNOULLI = 0
    _EXACT = 1
    _SPAN = 2

BERNOULLI, EXACT, SPAN = _BERNOULLI, _EXACT, _SPAN


cdef struct Plan:
    const uint8_t* eligible
    const uint8_t* word_start      # NULL: every eligible token is its own unit
    const int64_t* pool            # NULL: the pool is every id in [0, vocab) except `excluded`
    const int64_t* excluded        # sorted
    Py_ssize_t n_excluded
    uint32_t pool_size
    int64_t mask_id
    int mode
    double p
    const uint64_t* gap_table      # K + 1 entries; K = 0 means p = 0 (never select)
    const int64_t* gap_guess       # 1024 entries: the gap of the largest u in each bucket of u >> 22
    Py_ssize_t gap_k
    uint64_t mask_threshold
    uint64_t random_threshold
    uint64_t span_threshold
    int64_t span_max


cdef inline bint _coin(bitgen_t* rng, uint64_t threshold) noexcept nogil:
    return rng.next_uint32(rng.state) < threshold


# "Never again in this batch": the gap for p = 0, and the cap of gaps accumulated past the table.
cdef Py_ssize_t NEVER = <Py_ssize_t> 1 << 62


cdef inline Py_ssize_t _gap(bitgen_t* rng, const Plan* plan, uint32_t u) noexcept nogil:
    """Geometric(p) failures before the next success, by table inversion of the 32-bit draw u."""
    cdef Py_ssize_t gap = 0, k
    if plan.gap_k == 0:
        return NEVER
    while u < plan.gap_table[plan.gap_k]:
        gap += plan.gap_k
        if gap >= NEVER:
            return NEVER
        u = rng.next_uint32(rng.state)
    k = plan.gap_guess[u >> 22]
    while u < plan.gap_table[k + 1]:
        k += 1
    return gap + k


cdef inline uint32_t _below(bitgen_t* rng, uint32_t n) noexcept nogil:
    """Uniform in [0, n), n >= 1, by Lemire's multiply-shift with rejection (no modulo bias)."""
    cdef uint64_t m = <uint64_t> rng.next_uint32(rng.state) * n
    cdef uint32_t low = <uint32_t> m, reject_below
    if low < n:
        reject_below = (<uint32_t> 0 - n) % n
        while low < reject_below:
            m = <uint64_t> rng.next_uint32(rng.state) * n
            low = <uint32_t> m
    return <uint32_t> (m >> 32)


cdef inline int64_t _pool_id(const Plan* plan, int64_t index) noexcept nogil:
    """The index-th id of the pool: a table lookup, or for a few exclusions (the specials) a walk past
    them, which keeps a 50k-entry table out of the cache the token streams use."""
    cdef Py_ssize_t j
    if plan.pool != NULL:
        return plan.pool[index]
    for j in range(plan.n_excluded):
        if plan.excluded[j] > index:
            break
        index += 1
    return index


cdef inline int64_t _replacement(bitgen_t* rng, const Plan* plan, int64_t token, uint32_t u) noexcept nogil:
    if plan.mask_threshold <= u < plan.random_threshold:
        return _pool_id(plan, _below(rng, plan.pool_size))
    # Mask or keep as a select rather than a branch: the 80/20 split would mispredict often.
    return plan.mask_id if u < plan.mask_threshold else token


cdef inline bint _eligible(token_t token, const uint8_t* attention, Py_ssize_t i,
                           const Plan* plan) noexcept nogil:
    return (attention == NULL or attention[i] != 0) and plan.eligible[token] != 0


cdef inline bint _starts_unit(token_t token, Py_ssize_t i, bint previous_eligible, const Plan* plan,
                              const uint8_t* starts_row) noexcept nogil:
    if not previous_eligible:
        return True
    if starts_row != NULL:
        return starts_row[i] != 0
    return plan.word_start == NULL or plan.word_start[token] != 0


cdef inline Py_ssize_t _units(const token_t* ids, const uint8_t* attention, const uint8_t* starts_row,
                              Py_ssize_t length, const Plan* plan, Py_ssize_t* unit_start, Py_ssize_t* unit_end,
                              Py_ssize_t* n_tokens) noexcept nogil:
    """Count a row's units (and eligible tokens); record their token ranges when unit_start is given."""
    cdef Py_ssize_t i, n_units = 0, n_eligible = 0
    cdef bint ok, previous_ok = False
    for i in range(length):
        ok = _eligible(ids[i], attention, i, plan)
        if ok:
            n_eligible += 1
            if _starts_unit(ids[i], i, previous_ok, plan, starts_row):
                if unit_start != NULL:
                    unit_start[n_units] = i
                n_units += 1
            if unit_end != NULL:
                unit_end[n_units - 1] = i + 1
        previous_ok = ok
    n_tokens[0] = n_eligible
    return n_units


cdef inline void _bernoulli_tokens_row(const token_t* ids, const uint8_t* attention, Py_ssize_t length,
                                       const Plan* plan, bitgen_t* rng, Py_ssize_t* skip_io,
                                       Py_ssize_t* eligible_at, int64_t* out, int64_t* labels) noexcept nogil:
    """Token-level Bernoulli: list the eligible positions branch-free, then jump gap by gap through them
    (no per-token branch left to mispredict between selections)."""
    cdef Py_ssize_t i, n = 0, e = skip_io[0]
    cdef uint64_t draw
    cdef int64_t token
    # Two loops rather than _eligible's short-circuit, so both stay free of data-dependent branches.
    if attention == NULL:
        for i in range(length):
            out[i] = ids[i]
            labels[i] = IGNORE_INDEX
            eligible_at[n] = i
            n += plan.eligible[ids[i]]
    else:
        for i in range(length):
            out[i] = ids[i]
            labels[i] = IGNORE_INDEX
            eligible_at[n] = i
            n += plan.eligible[ids[i]] & (attention[i] != 0)
    while e < n:
        i = eligible_at[e]
        draw = rng.next_uint64(rng.state)
        e += 1 + _gap(rng, plan, <uint32_t> draw)
        token = ids[i]
        labels[i] = token
        out[i] = _replacement(rng, plan, token, <uint32_t> (draw >> 32))
    skip_io[0] = e - n


cdef inline void _bernoulli_row(const token_t* ids, const uint8_t* attention, const uint8_t* starts_row,
                                Py_ssize_t length, const Plan* plan, bitgen_t* rng, Py_ssize_t* skip_io,
                                int64_t* out, int64_t* labels) noexcept nogil:
    """Whole-word Bernoulli selection by geometric skipping; skip_io carries the running gap across rows."""
    cdef Py_ssize_t i, skip = skip_io[0]
    cdef bint ok, previous_ok = False
    cdef uint64_t draw
    cdef int64_t token
    for i in range(length):
        out[i] = ids[i]
        labels[i] = IGNORE_INDEX
    i = 0
    while True:
        # Walk to the word where the gap runs out: one well-predicted branch per token.
        while i < length:
            ok = _eligible(ids[i], attention, i, plan)
            if ok and _starts_unit(ids[i], i, previous_ok, plan, starts_row):
                if skip == 0:
                    break
                skip -= 1
            previous_ok = ok
            i += 1
        if i >= length:
            break
        draw = rng.next_uint64(rng.state)
        skip = _gap(rng, plan, <uint32_t> draw)
        token = ids[i]
        labels[i] = token
        out[i] = _replacement(rng, plan, token, <uint32_t> (draw >> 32))
        previous_ok = True
        i += 1
        # The rest of a selected word: eligible tokens that do not start a unit.
        while i < length and _eligible(ids[i], attention, i, plan) and not _starts_unit(ids[i], i, True, plan,
                                                                                       starts_row):
            token = ids[i]
            labels[i] = token
            out[i] = _replacement(rng, plan, token, rng.next_uint32(rng.state))
            i += 1
    skip_io[0] = skip


cdef inline void _exact_row(const token_t* ids, const uint8_t* attention, const uint8_t* starts_row,
                            Py_ssize_t length, const Plan* plan, bitgen_t* rng, int64_t* out,
                            int64_t* labels) noexcept nogil:
    """Exactly round(p x units) units by selection sampling, in one pass after a counting pass."""
    cdef Py_ssize_t i, n_tokens, units_left, to_choose
    cdef bint ok, previous_ok = False, selected = False
    cdef int64_t token
    units_left = _units(ids, attention, starts_row, length, plan, NULL, NULL, &n_tokens)
    to_choose = <Py_ssize_t> floor(plan.p * units_left + 0.5)
    for i in range(length):
        token = ids[i]
        ok = _eligible(ids[i], attention, i, plan)
        if not ok:
            selected = False
        elif _starts_unit(ids[i], i, previous_ok, plan, starts_row):
            selected = _below(rng, <uint32_t> units_left) < to_choose
            units_left -= 1
            to_choose -= selected
        previous_ok = ok
        if selected:
            labels[i] = token
            out[i] = _replacement(rng, plan, token, rng.next_uint32(rng.state))
        else:
            labels[i] = IGNORE_INDEX
            out[i] = token


cdef inline int64_t _span_length(bitgen_t* rng, const Plan* plan) noexcept nogil:
    """Geometric(span p) length truncated at span_max: lengths past the maximum are redrawn (SpanBERT)."""
    cdef int64_t length
    while True:
        length = 1
        while length <= plan.span_max and not _coin(rng, plan.span_threshold):
            length += 1
        if length <= plan.span_max:
            return length


cdef inline void _span_row(const token_t* ids, const uint8_t* attention, const uint8_t* starts_row,
                           Py_ssize_t length, const Plan* plan, bitgen_t* rng, Py_ssize_t* unit_start,
                           Py_ssize_t* unit_end, uint8_t* selected, int64_t* out, int64_t* labels) noexcept nogil:
    cdef Py_ssize_t i, u, first, last, n_tokens, n_units, budget, masked = 0
    cdef int64_t token
    n_units = _units(ids, attention, starts_row, length, plan, unit_start, unit_end, &n_tokens)
    budget = <Py_ssize_t> floor(plan.p * n_tokens + 0.5)
    for i in range(length):
        selected[i] = 0
    # Terminates: budget <= eligible tokens and every unit can be hit by a span start.
    while masked < budget:
        last = _span_length(rng, plan)
        first = _below(rng, <uint32_t> n_units)
        last = min(first + last, n_units)
        for u in range(first, last):
            for i in range(unit_start[u], unit_end[u]):
                if not selected[i]:
                    selected[i] = 1
                    masked += 1
    for i in range(length):
        token = ids[i]
        if selected[i]:
            labels[i] = token
            out[i] = _replacement(rng, plan, token, rng.next_uint32(rng.state))
        else:
            labels[i] = IGNORE_INDEX
            out[i] = token


cdef bitgen_t* _bitgen_of(object bit_generator) except NULL:
    return <bitgen_t*> PyCapsule_GetPointer(bit_generator.capsule, "BitGenerator")


def first_out_of_range(const token_t[:, ::1] input_ids, int64_t vocab_size):
    """Flat index of the first id outside [0, vocab_size), or -1 (checked before anything is written)."""
    cdef Py_ssize_t r, i, rows = input_ids.shape[0], length = input_ids.shape[1]
    cdef Py_ssize_t found = -1
    with nogil:
        for r in range(rows):
            for i in range(length):
                # The unsigned cast sends negative ids of signed dtypes past vocab_size too.
                if <uint64_t> input_ids[r, i] >= <uint64_t> vocab_size:
                    found = r * length + i
                    break
            if found >= 0:
                break
    return found


def mask_batch(const token_t[:, ::1] input_ids, const uint8_t[:, ::1] attention,
               const uint8_t[::1] eligible, const uint8_t[::1] word_start, const uint8_t[:, ::1] word_start_at,
               const int64_t[::1] pool,
               const int64_t[::1] excluded, int64_t pool_size,
               int64_t mask_id, int mode, double p, const uint64_t[::1] gap_table, const int64_t[::1] gap_guess,
               uint64_t mask_threshold, uint64_t random_threshold,
               uint64_t span_threshold, int64_t span_max, object bit_generator,
               int64_t[:, ::1] out_ids, int64_t[:, ::1] labels):
    """Mask rows of `input_ids` into `out_ids` / `labels` (both (B, L) int64, preallocated).

    `gap_table` / `gap_guess` drive Bernoulli selection (see the header; fastlm.masking builds them).

    `attention` and `word_start_at` (uint8, same shape as the ids) and `word_start` (uint8 per vocabulary id)
    may be None; `word_start_at` wins over `word_start`. The caller has
    checked every id < len(eligible), the shapes, and that the pool (`pool`, or [0, len(eligible)) minus
    the sorted `excluded`: pool_size ids either way) is non-empty when random replacement can
    happen.
    """
    cdef Py_ssize_t r, rows = input_ids.shape[0], length = input_ids.shape[1], skip = 0
    cdef Plan plan
    cdef bitgen_t* rng = _bitgen_of(bit_generator)
    cdef const uint8_t* attention_row = NULL
    cdef const uint8_t* starts_row = NULL
    cdef Py_ssize_t* unit_start = NULL
    cdef Py_ssize_t* unit_end = NULL
    cdef uint8_t* selected = NULL
    if rows == 0 or length == 0:
        return
    plan.eligible = &eligible[0]
    plan.word_start = NULL if word_start is None else &word_start[0]
    plan.pool = NULL if pool.shape[0] == 0 else &pool[0]
    plan.excluded = NULL if excluded.shape[0] == 0 else &excluded[0]
    plan.n_excluded = excluded.shape[0]
    plan.pool_size = <uint32_t> pool_size
    plan.mask_id = mask_id
    plan.mode = mode
    plan.p = p
    plan.gap_table = &gap_table[0]
    plan.gap_guess = &gap_guess[0]
    plan.gap_k = gap_table.shape[0] - 1
    plan.mask_threshold = mask_threshold
    plan.random_threshold = random_threshold
    plan.span_threshold = span_threshold
    plan.span_max = span_max
    cdef bint has_attention = attention is not None
    cdef bint has_starts_at = word_start_at is not None
    cdef bint token_units = word_start is None and not has_starts_at
    # Work rows: unit starts (span) or eligible positions (token-level Bernoulli); span also needs the
    # unit ends and a selected flag per token.
    cdef bint span_mode = mode == _SPAN
    if span_mode or (mode == _BERNOULLI and token_units):
        unit_start = <Py_ssize_t*> malloc(length * sizeof(Py_ssize_t))
        if span_mode:
            unit_end = <Py_ssize_t*> malloc(length * sizeof(Py_ssize_t))
            selected = <uint8_t*> malloc(length)
        if not unit_start or (span_mode and not (unit_end and selected)):
            free(unit_start); free(unit_end); free(selected)
            raise MemoryError("mask_batch: cannot allocate its work rows")
    with bit_generator.lock, nogil:
        if mode == _BERNOULLI:
            skip = _gap(rng, &plan, rng.next_uint32(rng.state))
        for r in range(rows):
            if has_attention:
                attention_row = &attention[r, 0]
            if has_starts_at:
                starts_row = &word_start_at[r, 0]
            if mode == _SPAN:
                _span_row(&input_ids[r, 0], attention_row, starts_row, length, &plan, rng, unit_start, unit_end,
                          selected, &out_ids[r, 0], &labels[r, 0])
            elif mode == _EXACT:
                _exact_row(&input_ids[r, 0], attention_row, starts_row, length, &plan, rng, &out_ids[r, 0],
                           &labels[r, 0])
            elif token_units:
                _bernoulli_tokens_row(&input_ids[r, 0], attention_row, length, &plan, rng, &skip, unit_start,
                                      &out_ids[r, 0], &labels[r, 0])
            else:
                _bernoulli_row(&input_ids[r, 0], attention_row, starts_row, length, &plan, rng, &skip,
                               &out_ids[r, 0], &labels[r, 0])
    free(unit_start); free(unit_end); free(selected)


def span_lengths(object bit_generator, uint64_t span_threshold, int64_t span_max, int64_t[::1] out):
    """Draw len(out) span lengths exactly as span masking does (for the distribution tests)."""
    cdef Plan plan
    cdef Py_ssize_t i
    cdef bitgen_t* rng = _bitgen_of(bit_generator)
    plan.span_threshold = span_threshold
    plan.span_max = span_max
    with bit_generator.lock, nogil:
        for i in range(out.shape[0]):
            out[i] = _span_length(rng, &plan)
