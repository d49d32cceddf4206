"""Slow, obviously correct reference implementations that the kernels are tested against.

Plain Python over lists: no numpy tricks, no cleverness. Each function names the kernel it checks.
"""
import itertools
import math

IGNORE_INDEX = -100


# --- packing (fastlm.packing) -------------------------------------------------------------------------

def seed_group_texts(examples, block_size=128):
    """The tutorial's group_texts exactly as the seed notebook has it (`sum(lists, [])`)."""
    concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {
        k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
        for k, t in concatenated_examples.items()
    }
    result["labels"] = result["input_ids"].copy()
    return result


def chain_group_texts(examples, block_size=128):
    """HF's current run_clm.py group_texts (itertools.chain), the fast pure-Python baseline."""
    concatenated_examples = {k: list(itertools.chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {
        k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
        for k, t in concatenated_examples.items()
    }
    result["labels"] = result["input_ids"].copy()
    return result


def documents(tokens, offsets):
    return [[int(t) for t in tokens[offsets[i]:offsets[i + 1]]] for i in range(len(offsets) - 1)]


def stream(docs, separator=None):
    out = []
    for doc in docs:
        out += doc
        if separator is not None:
            out.append(separator)
    return out


def ref_windows(tokens, offsets, block_size, remainder="drop", separator=None, stride=None, group_size=None):
    """The blocks pack_blocks cuts, unpadded: (tokens of the window, how many lead tokens are context)."""
    docs = documents(tokens, offsets)
    stride = stride or block_size
    groups = [docs[i:i + group_size] for i in range(0, len(docs), group_size)] if group_size else [docs]
    windows = []
    for group in groups:
        s = stream(group, separator)
        start, scored_until = 0, 0
        while True:
            window = s[start:start + block_size]
            if len(window) < block_size and (remainder == "drop" or start >= len(s) or scored_until >= len(s)):
                break
            windows.append((window, max(scored_until - start, 0)))
            scored_until = start + len(window)
            if scored_until >= len(s):
                break
            start += stride
    return windows


def ref_pack_blocks(tokens, offsets, block_size, remainder="drop", separator=None, stride=None,
                    group_size=None, pad_id=0):
    """Rows (input_ids, labels, attention_mask) as lists, cut from the stream one window at a time."""
    rows = []
    for window, context in ref_windows(tokens, offsets, block_size, remainder, separator, stride, group_size):
        labels = [IGNORE_INDEX] * context + window[context:]
        pad = block_size - len(window)
        rows.append((window + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, [1] * len(window) + [0] * pad))
    return rows


def ref_pieces(tokens, offsets, block_size, overlong="split"):
    """The pieces pack_documents places: whole documents, overlong ones split or truncated."""
    pieces = []
    for doc in documents(tokens, offsets):
        if not doc:
            continue
        if overlong == "truncate":
            pieces.append(doc[:block_size])
        else:
            pieces += [doc[i:i + block_size] for i in range(0, len(doc), block_size)]
    return pieces


def ref_document_units(tokens, offsets, block_size, overlong="split", separator=None):
    """The units the break modes place: each non-empty document (with its separator), overlong ones split
    into block_size pieces, truncated to the first block_size tokens, or kept whole."""
    units = []
    for doc in documents(tokens, offsets):
        unit = stream([doc], separator)
        if not unit:
            continue
        if overlong == "split":
            units += [unit[i:i + block_size] for i in range(0, len(unit), block_size)]
        elif overlong == "truncate":
            units.append(unit[:block_size])
        else:
            units.append(unit)
    return units


def ref_break_mode(units, block_size, break_mode):
    """fairseq's TokenBlockDataset rule as lists of the units in each block: "eos" one unit per block;
    "complete" adds the next unit to the current block if it fits or the block is empty, else starts a
    new one."""
    if break_mode == "eos":
        return [[unit] for unit in units]
    blocks = []
    for unit in units:
        if blocks and sum(map(len, blocks[-1])) + len(unit) <= block_size:
            blocks[-1].append(unit)
        else:
            blocks.append([unit])
    return blocks


def ref_one_document_per_block(offsets, block_size):
    """The runner's --line_by_line layout, restated: every non-empty document alone in a block, truncated
    to block_size. Returns (segment starts, segment lengths, tokens dropped)."""
    starts, lengths, dropped = [], [], 0
    for i in range(len(offsets) - 1):
        length = int(offsets[i + 1]) - int(offsets[i])
        if length > 0:
            starts.append(int(offsets[i]))
            lengths.append(min(length, block_size))
            dropped += length - lengths[-1]
    return starts, lengths, dropped


def ref_best_fit_decreasing(lengths, block_size):
    """Block count of best-fit decreasing, by scanning every open block for each piece."""
    capacities = []
    for length in sorted(lengths, reverse=True):
        fits = [i for i, cap in enumerate(capacities) if cap >= length]
        if fits:
            best = min(fits, key=lambda i: capacities[i])
            capacities[best] -= length
        else:
            capacities.append(block_size - length)
    return len(capacities)


def ref_packed_row(segments, block_size, pad_id):
    """One gathered pack_documents block from its segments (token lists, in order): input_ids, labels
    (-100 at each segment start and on padding), attention_mask, position_ids (restarting per segment)."""
    ids, labels, positions = [], [], []
    for segment in segments:
        ids += segment
        labels += [IGNORE_INDEX] + segment[1:]
        positions += list(range(len(segment)))
    pad = block_size - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, [1] * len(ids) + [0] * pad, positions + [0] * pad


def ref_flattened(rows):
    """DataCollatorWithFlattening's layout of the real tokens of gathered rows (input_ids, labels,
    attention_mask, position_ids lists): one row of them, with cu_seq_lens and the longest sequence."""
    flat = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels, attention, positions in rows:
        for i in range(len(ids)):
            if attention[i]:
                flat["input_ids"].append(ids[i])
                flat["labels"].append(labels[i])
                flat["position_ids"].append(positions[i])
    starts = [i for i, position in enumerate(flat["position_ids"]) if position == 0]
    cu_seq_lens = starts + [len(flat["input_ids"])]
    lengths = [b - a for a, b in zip(cu_seq_lens[:-1], cu_seq_lens[1:])]
    return flat, cu_seq_lens, max(lengths, default=0)


# --- collators (fastlm.collators) ---------------------------------------------------------------------

def ref_pad(rows, pad_id):
    """Right padding as tokenizer.pad does it: (padded rows, attention rows)."""
    width = max(map(len, rows), default=0)
    return ([row + [pad_id] * (width - len(row)) for row in rows],
            [[1] * len(row) + [0] * (width - len(row)) for row in rows])


def ref_clm_labels(padded, attention):
    """Causal-LM labels: the ids, -100 where attention is 0."""
    return [[t if a else IGNORE_INDEX for t, a in zip(row, mask)] for row, mask in zip(padded, attention)]


# --- masking (fastlm.masking) -------------------------------------------------------------------------

class RefBits:
    """numpy PCG64's next_uint64 / next_uint32 (the 32-bit halves are buffered, low half first)."""

    def __init__(self, bit_generator):
        self.bit_generator = bit_generator
        self.buffered = None

    def u64(self):
        return int(self.bit_generator.random_raw())

    def u32(self):
        if self.buffered is not None:
            value, self.buffered = self.buffered, None
            return value
        value = self.u64()
        self.buffered = value >> 32
        return value & 0xFFFFFFFF

    def below(self, n):
        """Lemire's bounded draw in [0, n) over 32-bit draws."""
        m = self.u32() * n
        if (m & 0xFFFFFFFF) < n:
            reject_below = (2**32 - n) % n
            while (m & 0xFFFFFFFF) < reject_below:
                m = self.u32() * n
        return m >> 32


def ref_units(row, attention_row, eligible, word_starts, starts_row=None):
    """Token positions of each maskable unit: eligible tokens, grouped into words when word_starts (per id)
    or starts_row (per position, which wins) is set."""
    units, previous_ok = [], False
    for i, token in enumerate(row):
        ok = (attention_row is None or attention_row[i] != 0) and eligible[token]
        if ok:
            if starts_row is not None:
                starts_word = starts_row[i]
            else:
                starts_word = word_starts is None or word_starts[token]
            if not previous_ok or starts_word:
                units.append([i])
            else:
                units[-1].append(i)
        previous_ok = ok
    return units


def ref_mask(rows, attention, bits, *, eligible, word_starts, pool, mask_id, mode, p, mask_replace_prob,
             random_replace_prob, span_p=None, span_max=None, word_starts_at=None):
    """The masking kernel's documented algorithm and draw order (see csrc/_masking.pyx), one unit at a time.

    rows: list of lists of ids; attention: list of lists or None; eligible / word_starts: per-id flags
    (word_starts None for token-level); word_starts_at: per-position flags (list of lists) or None;
    mode: "bernoulli", "exact" or "span". Returns (ids, labels) lists.
    """
    mask_threshold = round(mask_replace_prob * 2**32)
    random_threshold = round(min(1.0, mask_replace_prob + random_replace_prob) * 2**32)
    # P(gap >= k) = round((1 - p)**k * 2**32) / 2**32, tabulated to its first 0 or to 4096 entries;
    # past the table the gap restarts from a fresh draw (the geometric is memoryless).
    table = [2**32]
    while p > 0 and table[-1] > 0 and len(table) <= 4096:
        table.append(round((1.0 - p) ** len(table) * 2**32))

    def gap(u):
        if p == 0:
            return 1 << 62
        extra = 0
        while u < table[-1]:
            extra += len(table) - 1
            u = bits.u32()
        return extra + max(k for k in range(len(table)) if u < table[k])

    def replacement(token, u):
        if mask_threshold <= u < random_threshold:
            return pool[bits.below(len(pool))]
        return mask_id if u < mask_threshold else token

    def span_length():
        threshold = round(span_p * 2**32)
        while True:
            length = 1
            while length <= span_max and not bits.u32() < threshold:
                length += 1
            if length <= span_max:
                return length

    out_rows, label_rows = [], []
    skip = gap(bits.u32()) if mode == "bernoulli" and rows and rows[0] else None
    for r, row in enumerate(rows):
        units = ref_units(row, None if attention is None else attention[r], eligible, word_starts,
                          None if word_starts_at is None else word_starts_at[r])
        out, labels = list(row), [IGNORE_INDEX] * len(row)
        if mode == "bernoulli":
            for unit in units:
                if skip > 0:
                    skip -= 1
                    continue
                draw = bits.u64()
                skip = gap(draw & 0xFFFFFFFF)
                for k, i in enumerate(unit):
                    labels[i] = row[i]
                    out[i] = replacement(row[i], draw >> 32 if k == 0 else bits.u32())
        elif mode == "exact":
            units_left = len(units)
            to_choose = math.floor(p * units_left + 0.5)
            for unit in units:
                selected = bits.below(units_left) < to_choose
                units_left -= 1
                to_choose -= selected
                if selected:
                    for i in unit:
                        labels[i] = row[i]
                        out[i] = replacement(row[i], bits.u32())
        else:
            budget = math.floor(p * sum(len(u) for u in units) + 0.5)
            selected = set()
            while len(selected) < budget:
                length = span_length()
                first = bits.below(len(units))
                for unit in units[first:first + length]:
                    selected.update(unit)
            for i in sorted(selected):
                labels[i] = row[i]
                out[i] = replacement(row[i], bits.u32())
        out_rows.append(out)
        label_rows.append(labels)
    return out_rows, label_rows


# --- document boundaries (fastlm.prepare's chunked text reader) ---------------------------------------

def ref_lines(text):
    """Lines ending at "\\n" (kept); the last one may lack it."""
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def ref_line_documents(text, keep_blank=False, keep_linebreaks=True):
    """doc_boundary="line": every line with some non-whitespace text (every line with keep_blank), as
    written (without its "\n" when not keep_linebreaks)."""
    lines = ref_lines(text) if keep_linebreaks else [line.removesuffix("\n") for line in ref_lines(text)]
    return [line for line in lines if keep_blank or line.strip()]


def ref_file_documents(text, keep_blank=False):
    """doc_boundary="file": the whole text, unless it is empty or (without keep_blank) only whitespace."""
    return [text] if text.strip() or (keep_blank and text) else []


def ref_paragraph_documents(text):
    """doc_boundary="paragraph": runs of non-blank lines, joined as written."""
    docs, current = [], []
    for line in ref_lines(text):
        if line.strip():
            current.append(line)
        elif current:
            docs.append("".join(current))
            current = []
    if current:
        docs.append("".join(current))
    return docs


# --- mixtures (fastlm.blending) -----------------------------------------------------------------------

def ref_blending_index(weights, n_samples, start=0, counts=None):
    """Megatron-LM's build_blending_indices for normalised `weights`: position i goes to the source with
    the largest weights[s] * max(i, 1) - counts[s], the first one on ties. Returns (sources, samples,
    counts after)."""
    counts = list(counts) if counts is not None else [0] * len(weights)
    sources, samples = [], []
    for i in range(start, start + n_samples):
        errors = [w * float(max(i, 1)) - float(c) for w, c in zip(weights, counts)]
        best = errors.index(max(errors))
        sources.append(best)
        samples.append(counts[best])
        counts[best] += 1
    return sources, samples, counts


def ref_nanogpt_tokens(docs, eot):
    """nanoGPT's train.bin: every document's ids, then the end-of-text id unless the document ends with it."""
    out = []
    for doc in docs:
        out.extend(doc)
        if not doc or doc[-1] != eot:
            out.append(eot)
    return out
