"""Slow, obviously correct reference implementations that the kernels are tested against.

Plain Python over lists: no numpy tricks, no cleverness. Each function names the kernel it checks.
"""
import itertools

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


def ref_pack_blocks(tokens, offsets, block_size, remainder="drop", separator=None, stride=None,
                    group_size=None, pad_id=0):
    """Rows (input_ids, labels, attention_mask) as lists, cut from the stream one window at a time."""
    docs = documents(tokens, offsets)
    stride = stride or block_size
    groups = [docs[i:i + group_size] for i in range(0, len(docs), group_size)] if group_size else [docs]
    rows = []
    for group in groups:
        s = stream(group, separator)
        start, scored_until = 0, 0
        while True:
            window = s[start:start + block_size]
            if len(window) < block_size and (remainder == "drop" or start >= len(s) or scored_until >= len(s)):
                break
            context = max(scored_until - start, 0)
            labels = [IGNORE_INDEX] * context + window[context:]
            pad = block_size - len(window)
            rows.append((window + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, [1] * len(window) + [0] * pad))
            scored_until = start + len(window)
            if scored_until >= len(s):
                break
            start += stride
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
