# Packing kernels: cut a document stream into blocks, pack whole documents into blocks, and gather
# blocks into preallocated batches. The Python wrappers in fastlm/packing.py validate and allocate;
# everything here runs without the GIL.
#
# Shared conventions:
# - `tokens` is the flat token array, `offsets` (int64, n_docs + 1) delimits document i as
#   tokens[offsets[i]:offsets[i + 1]].
# - The "stream" is the documents concatenated, with `separator` appended after every document when
#   separator >= 0. Stream position of document i's first token: offsets[i] - offsets[0] + i * has_sep.
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from _types cimport token_t

# -100 is the label PyTorch's cross-entropy ignores (ignore_index); HF uses the same value.
cdef int64_t IGNORE_INDEX = -100


def count_group_blocks(const int64_t[::1] offsets, int64_t block_size, int64_t group_size,
                       int64_t has_sep, bint keep_partial):
    """Blocks produced when each group of `group_size` documents is chunked on its own."""
    cdef Py_ssize_t n_docs = offsets.shape[0] - 1, first, last
    cdef int64_t total = 0, group_len
    with nogil:
        first = 0
        while first < n_docs:
            last = min(first + group_size, n_docs)
            group_len = offsets[last] - offsets[first] + (last - first) * has_sep
            total += group_len // block_size
            if keep_partial and group_len % block_size:
                total += 1
            first = last
    return total


def fill_group_blocks(const int64_t[::1] offsets, int64_t block_size, int64_t group_size,
                      int64_t has_sep, bint keep_partial, int64_t[::1] starts, int64_t[::1] lengths):
    cdef Py_ssize_t n_docs = offsets.shape[0] - 1, first, last, b = 0
    cdef int64_t group_start, group_len, pos
    with nogil:
        first = 0
        while first < n_docs:
            last = min(first + group_size, n_docs)
            group_start = offsets[first] - offsets[0] + first * has_sep
            group_len = offsets[last] - offsets[first] + (last - first) * has_sep
            pos = 0
            while pos + block_size <= group_len:
                starts[b] = group_start + pos
                lengths[b] = block_size
                b += 1
                pos += block_size
            if keep_partial and pos < group_len:
                starts[b] = group_start + pos
                lengths[b] = group_len - pos
                b += 1
            first = last


cdef inline Py_ssize_t _doc_at(const int64_t[::1] offsets, int64_t has_sep, int64_t pos) noexcept nogil:
    """Index of the document whose stream span (separator included) contains stream position pos."""
    cdef Py_ssize_t lo = 0, hi = offsets.shape[0] - 1, mid
    # Invariant: stream_start(lo) <= pos < stream_start(hi).
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if offsets[mid] - offsets[0] + mid * has_sep <= pos:
            lo = mid
        else:
            hi = mid
    return lo


cdef inline void _copy_stream(const token_t[::1] tokens, const int64_t[::1] offsets, int64_t separator,
                              int64_t start, int64_t length, int64_t* out) noexcept nogil:
    cdef int64_t has_sep = separator >= 0
    cdef Py_ssize_t i, d, n_docs = offsets.shape[0] - 1
    cdef int64_t pos, doc_start, doc_len, k = 0, within, take
    cdef const token_t* source
    if not has_sep:
        source = &tokens[0] + offsets[0] + start if tokens.shape[0] else NULL
        for i in range(length):
            out[i] = source[i]
        return
    d = _doc_at(offsets, has_sep, start)
    pos = start
    while k < length and d < n_docs:
        doc_start = offsets[d] - offsets[0] + d
        doc_len = offsets[d + 1] - offsets[d]
        within = pos - doc_start
        take = min(doc_len - within, length - k) if within < doc_len else 0
        for i in range(take):
            out[k + i] = tokens[offsets[d] + within + i]
        k += take
        if k < length:
            out[k] = separator
            k += 1
        pos = doc_start + doc_len + 1
        d += 1


cdef inline void _finish_row(int64_t* ids, int64_t* labels, int64_t* attention, Py_ssize_t width,
                             Py_ssize_t n_real, Py_ssize_t n_context, int64_t pad_id) noexcept nogil:
    """Pad a row whose first n_real ids are filled, and derive its labels and attention mask."""
    cdef Py_ssize_t i
    for i in range(n_real, width):
        ids[i] = pad_id
    for i in range(n_context):
        labels[i] = IGNORE_INDEX
    if n_real > n_context:
        memcpy(labels + n_context, ids + n_context, (n_real - n_context) * sizeof(int64_t))
    for i in range(n_real, width):
        labels[i] = IGNORE_INDEX
    for i in range(n_real):
        attention[i] = 1
    for i in range(n_real, width):
        attention[i] = 0


def gather_stream(const token_t[::1] tokens, const int64_t[::1] offsets, int64_t separator,
                  const int64_t[::1] starts, const int64_t[::1] lengths, const int64_t[::1] context,
                  const int64_t[::1] indices, int64_t pad_id,
                  int64_t[:, ::1] input_ids, int64_t[:, ::1] labels, int64_t[:, ::1] attention_mask):
    """Materialise stream blocks `indices` into rows; padding gets pad_id, label -100, attention 0."""
    cdef Py_ssize_t r, width = input_ids.shape[1]
    cdef int64_t b
    if indices.shape[0] == 0:
        return
    with nogil:
        for r in range(indices.shape[0]):
            b = indices[r]
            _copy_stream(tokens, offsets, separator, starts[b], lengths[b], &input_ids[r, 0])
            _finish_row(&input_ids[r, 0], &labels[r, 0], &attention_mask[r, 0], width,
                        lengths[b], context[b], pad_id)


# --- Document packing (best-fit decreasing) ---------------------------------------------------------

def count_pieces(const int64_t[::1] offsets, int64_t block_size, bint split_overlong):
    """Pieces the documents become: overlong ones split into block_size pieces or truncated to one."""
    cdef Py_ssize_t i
    cdef int64_t n = 0, length
    with nogil:
        for i in range(offsets.shape[0] - 1):
            length = offsets[i + 1] - offsets[i]
            if length <= 0:
                continue
            if split_overlong:
                n += (length + block_size - 1) // block_size
            else:
                n += 1
    return n


def fill_pieces(const int64_t[::1] offsets, int64_t block_size, bint split_overlong,
                int64_t[::1] piece_starts, int64_t[::1] piece_lengths):
    cdef Py_ssize_t i, p = 0
    cdef int64_t length, pos
    with nogil:
        for i in range(offsets.shape[0] - 1):
            length = offsets[i + 1] - offsets[i]
            if length <= 0:
                continue
            if not split_overlong:
                piece_starts[p] = offsets[i]
                piece_lengths[p] = min(length, block_size)
                p += 1
                continue
            pos = 0
            while pos < length:
                piece_starts[p] = offsets[i] + pos
                piece_lengths[p] = min(block_size, length - pos)
                p += 1
                pos += block_size


cdef inline void _tree_set(uint8_t* tree, Py_ssize_t leaves, Py_ssize_t cap, bint present) noexcept nogil:
    # A segment tree of "some open block has exactly this remaining capacity" flags, so best fit
    # (the smallest capacity >= the piece) is one O(log block_size) descent.
    cdef Py_ssize_t node = leaves + cap
    tree[node] = present
    node //= 2
    while node >= 1:
        tree[node] = tree[2 * node] | tree[2 * node + 1]
        node //= 2


cdef inline Py_ssize_t _tree_first_at_least(const uint8_t* tree, Py_ssize_t leaves,
                                            Py_ssize_t lo) noexcept nogil:
    """Smallest capacity >= lo with an open block, or -1."""
    cdef Py_ssize_t node = leaves + lo
    if tree[node]:
        return lo
    # Climb until a right sibling subtree holds a flag, then descend to its leftmost flag.
    while node > 1:
        if node % 2 == 0 and tree[node + 1]:
            node += 1
            while node < leaves:
                node = 2 * node if tree[2 * node] else 2 * node + 1
            return node - leaves
        node //= 2
    return -1


def best_fit_decreasing(const int64_t[::1] piece_lengths, int64_t block_size, int64_t[::1] piece_block):
    """Assign each piece a block id by best-fit decreasing; returns the number of blocks.

    Pieces are visited longest first (a counting sort over lengths), each going to the open block whose
    remaining capacity fits it most tightly, or to a new block.

    Work memory is O(pieces + longest piece), never O(block_size): capacities are tracked up to the
    longest piece only. That loses nothing, because at most one open block (the newest) can have more
    room than the longest piece: a block is opened only when every open block has less room than the
    piece at hand, and rooms only shrink. So the top bucket holds that one block, its room kept aside.
    """
    cdef Py_ssize_t n = piece_lengths.shape[0], p, i, leaves = 1
    cdef int64_t length, n_blocks = 0, cap, block, longest = 0, newest_cap = 0
    if n == 0:
        return 0
    with nogil:
        for p in range(n):
            longest = max(longest, piece_lengths[p])
    while leaves < longest + 1:
        leaves *= 2
    cdef int64_t* bucket_start = <int64_t*> malloc((longest + 2) * sizeof(int64_t))
    cdef int64_t* order = <int64_t*> malloc((n + 1) * sizeof(int64_t))
    # Open blocks with the same remaining capacity form a stack: head per capacity, next per block.
    cdef int64_t* head = <int64_t*> malloc((longest + 1) * sizeof(int64_t))
    cdef int64_t* next_block = <int64_t*> malloc((n + 1) * sizeof(int64_t))
    cdef uint8_t* tree = <uint8_t*> malloc(2 * leaves)
    if not (bucket_start and order and head and next_block and tree):
        free(bucket_start); free(order); free(head); free(next_block); free(tree)
        raise MemoryError("best_fit_decreasing: cannot allocate its work arrays")
    with nogil:
        memset(bucket_start, 0, (longest + 2) * sizeof(int64_t))
        for p in range(n):
            bucket_start[longest - piece_lengths[p] + 1] += 1
        for i in range(1, longest + 2):
            bucket_start[i] += bucket_start[i - 1]
        for p in range(n):
            order[bucket_start[longest - piece_lengths[p]]] = p
            bucket_start[longest - piece_lengths[p]] += 1
        for i in range(longest + 1):
            head[i] = -1
        memset(tree, 0, 2 * leaves)
        for i in range(n):
            p = order[i]
            length = piece_lengths[p]
            cap = _tree_first_at_least(tree, leaves, length)
            if cap < 0:
                block = n_blocks
                n_blocks += 1
                cap = block_size
            else:
                block = head[cap]
                head[cap] = next_block[block]
                if head[cap] < 0:
                    _tree_set(tree, leaves, cap, False)
                if block == n_blocks - 1:
                    cap = newest_cap  # exact, also when its bucket is the clamped top one
            piece_block[p] = block
            cap -= length
            if block == n_blocks - 1:
                newest_cap = cap
            if cap > 0:
                cap = min(cap, longest)
                next_block[block] = head[cap]
                head[cap] = block
                _tree_set(tree, leaves, cap, True)
    free(bucket_start); free(order); free(head); free(next_block); free(tree)
    return n_blocks


def next_fit(const int64_t[::1] piece_lengths, int64_t block_size, int64_t[::1] piece_block):
    """Assign pieces to blocks in input order (fairseq's "complete" break mode); returns the block count.

    A piece joins the current block if it fits there, or if the block is empty (a piece longer than
    block_size gets a block of its own); otherwise it starts the next block.
    """
    cdef Py_ssize_t p, n = piece_lengths.shape[0]
    cdef int64_t block = 0, filled = 0
    if n == 0:
        return 0
    with nogil:
        for p in range(n):
            if filled > 0 and filled + piece_lengths[p] > block_size:
                block += 1
                filled = 0
            filled += piece_lengths[p]
            piece_block[p] = block
    return block + 1


def gather_packed(const token_t[::1] tokens, const int64_t[::1] block_offsets,
                  const int64_t[::1] seg_starts, const int64_t[::1] seg_lengths,
                  const int64_t[::1] indices, int64_t pad_id,
                  int64_t[:, ::1] input_ids, int64_t[:, ::1] labels, int64_t[:, ::1] attention_mask,
                  int64_t[:, ::1] position_ids):
    """Materialise packed blocks: positions restart and the loss is masked at every segment start."""
    cdef Py_ssize_t r, s, i, col, width = input_ids.shape[1]
    cdef int64_t b
    with nogil:
        for r in range(indices.shape[0]):
            b = indices[r]
            col = 0
            for s in range(block_offsets[b], block_offsets[b + 1]):
                for i in range(seg_lengths[s]):
                    input_ids[r, col] = tokens[seg_starts[s] + i]
                    # The first token of a segment would be predicted from another document's last token.
                    labels[r, col] = input_ids[r, col] if i > 0 else IGNORE_INDEX
                    attention_mask[r, col] = 1
                    position_ids[r, col] = i
                    col += 1
            while col < width:
                input_ids[r, col] = pad_id
                labels[r, col] = IGNORE_INDEX
                attention_mask[r, col] = 0
                position_ids[r, col] = 0
                col += 1
