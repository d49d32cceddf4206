"""Encoding for `fastlm prepare`: batches of documents -> token ids, in input order.

Two encoders give the same ids: the Hugging Face fast tokenizer (any tokenizer), and for byte-level BPE
(GPT-2, RoBERTa, a trained one) tiktoken built from the tokenizer's own vocabulary and merges, several
times faster. Prepare checks tiktoken against the Hugging Face tokenizer on a sample of the corpus
before trusting it (`choose_encoder`).

One encoder encodes one stream of batches; prepare runs one per worker process (fastlm.prepare), since
reading, decoding and counting bytes around the encoder would otherwise share one core under the GIL.
"""
import functools
import itertools
import operator
import warnings
from typing import NamedTuple

import numpy as np

ENCODERS = ("auto", "tiktoken", "hf")
# Characters of the corpus's first batch encoded by both encoders before tiktoken is trusted: enough to
# meet most of a corpus's scripts and symbols, a small fraction of the time of any real corpus.
_VERIFY_CHARS = 1 << 18
# Corners of GPT-2's pre-tokenizer split where two regex engines could disagree, checked on every run
# besides the corpus sample.
_PROBES = [
    "Hello world\r\nCRLF line\r\n",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷 and combining e\u0301 a\u0308\u0323 \u0915\u094d\u0937",
    "separators\u2028line\u2029para\u0085nel\u000bvt\u000cff\u00a0nbsp\u3000ideographic\u200bzwsp",
    "   leading\t\ttabs  and   runs     \n\n\n   " + " " * 300 + "x" + "\t" * 70 + "\n",
    "it's we'll I'd they're you've I'm IT'S 'quoted' don''t",
    "1234567 3.14159 ½ ① ٣ 1e10 $100,000.00 #hash @at",
    "日本語のテキスト 中文字符 한국어 텍스트 Ελληνικά русский עברית العربية",
    "\ufffd replacement \ufffd\ufffd and <html> &amp; {json: [1, 2]} a_b-c/d\\e",
]


class Batch(NamedTuple):
    """Documents encoded together. A document too long for one batch comes in pieces: ``continues``
    says texts[0] goes on with the previous batch's last document, ``open`` that the last text's
    document goes on in the next batch; ``where`` names the open document for error messages."""

    texts: list
    continues: bool = False
    open: bool = False
    where: str = ""


class HFEncoder:
    """The Hugging Face fast tokenizer, from its JSON (the user's tokenizer object is never modified)."""

    name = "hf"

    def __init__(self, tokenizer_json, dtype):
        self.tokenizer_json = tokenizer_json
        self.dtype = np.dtype(dtype)
        self._backend_tokenizer = None

    def __getstate__(self):
        # A worker process started without fork rebuilds the Rust tokenizer from the JSON.
        return {**self.__dict__, "_backend_tokenizer": None}

    def _backend(self):
        if self._backend_tokenizer is None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(self.tokenizer_json)
            # A saved tokenizer.json may carry truncation/padding settings: they must not cut documents.
            backend.no_truncation()
            backend.no_padding()
            self._backend_tokenizer = backend
        return self._backend_tokenizer

    def __call__(self, texts):
        """(ids of all texts back to back, length of each): the content only, no special tokens."""
        encodings = self._backend().encode_batch_fast(texts, add_special_tokens=False)
        ids = list(map(operator.attrgetter("ids"), encodings))
        lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, count=int(lengths.sum()))
        return tokens, lengths


class TiktokenEncoder:
    """tiktoken built from a byte-level BPE's vocabulary and merges: one tiktoken call per batch.

    The batch's texts are joined with SEPARATOR, a special token, which tiktoken never merges across, so
    each text is encoded exactly as on its own; the ranks are split at the separator's rank and mapped
    to the vocabulary's ids. Texts that hold one of the tokenizer's added tokens (<|endoftext|>, <mask>,
    ...) or the separator itself go to the Hugging Face tokenizer, which has its own rules for them
    (lstrip, normalized, single_word).
    """

    name = "tiktoken"
    # Its first character occurs nowhere else in it, so occurrences never overlap and counting them in
    # the joined batch tells whether some text holds one.
    SEPARATOR = "\U0010fffe fastlm document end \U0010ffff"

    def __init__(self, tokenizer_json, dtype):
        self.built = _tiktoken_bpe(tokenizer_json, self.SEPARATOR)
        bpe = self.built.bpe
        self.encoding = bpe.encoding
        self.dtype = np.dtype(dtype)
        self.ids = bpe.ids.astype(self.dtype)
        self.separator_rank = len(bpe.ids)
        self.added_tokens = sorted(bpe.encoding.special_tokens_set - {self.SEPARATOR})
        self.hf = HFEncoder(tokenizer_json, dtype)

    def __call__(self, texts):
        if not texts:
            return np.empty(0, self.dtype), np.empty(0, np.int64)
        joined = self.SEPARATOR.join(texts)
        if joined.count(self.SEPARATOR) != len(texts) - 1 or any(token in joined for token in self.added_tokens):
            return self._split_by_encoder(texts)
        return self._encode_joined(joined)

    def _encode_joined(self, joined):
        ranks = self.encoding.encode_to_numpy(joined, allowed_special=frozenset([self.SEPARATOR]), disallowed_special=())
        is_separator = ranks == self.separator_rank
        ends = np.append(np.flatnonzero(is_separator), ranks.shape[0])
        lengths = np.diff(ends, prepend=-1) - 1
        return self.ids[ranks[~is_separator]], lengths

    def _split_by_encoder(self, texts):
        literals = [self.SEPARATOR, *self.added_tokens]
        to_hf = [any(literal in text for literal in literals) for text in texts]
        parts = []
        for use_hf, run in itertools.groupby(zip(to_hf, texts), key=operator.itemgetter(0)):
            run = [text for _, text in run]
            parts.append(self.hf(run) if use_hf else self._encode_joined(self.SEPARATOR.join(run)))
        return np.concatenate([tokens for tokens, _ in parts]), np.concatenate([lengths for _, lengths in parts])


class _Built:
    """A TiktokenBPE, and whether it has given the tokenizer's ids (choose_encoder)."""

    def __init__(self, bpe, checked):
        self.bpe = bpe
        self.checked = checked


@functools.lru_cache(maxsize=2)
def _tiktoken_bpe(tokenizer_json, separator):
    """The _Built encoding: from the user's cache, where it went once checked, else built (~0.4 s for
    GPT-2). Kept in memory too for the runner, which prepares a training and an evaluation store in a row."""
    from fastlm.tokenizer import tiktoken_encoding
    from fastlm.tokenizer_cache import load_tiktoken

    cached = load_tiktoken(tokenizer_json, [separator])
    return _Built(cached, True) if cached is not None else _Built(tiktoken_encoding(tokenizer_json, [separator]), False)


def choose_encoder(requested, tokenizer_json, dtype, sample, byte_level_problem):
    """(encoder, why): the encoder ``requested`` ("auto", "tiktoken" or "hf") resolves to, and why it
    is not tiktoken (None when it is).

    tiktoken is used only where it gives the Hugging Face tokenizer's ids on ``sample`` (texts from the
    corpus) and on _PROBES; once it has, it is kept in the user's cache (fastlm.tokenizer_cache) and later
    runs with the same tokenizer use it unchecked. "auto" falls back to the Hugging Face tokenizer, with a warning when the
    tokenizer is a byte-level BPE that should have worked; "tiktoken" raises ValueError instead.
    """
    hf = HFEncoder(tokenizer_json, dtype)
    if requested == "hf":
        return hf, "encoder='hf' was requested"
    if byte_level_problem is not None:
        why = f"not a byte-level BPE with GPT-2's split: {byte_level_problem}"
        if requested == "tiktoken":
            raise ValueError(f"encoder='tiktoken' cannot encode with this tokenizer: {why}")
        return hf, why
    try:
        fast = TiktokenEncoder(tokenizer_json, dtype)
    except ImportError as error:
        why = f"tiktoken is not available ({error}); pip install 'tiktoken>=0.11' (in fastlm[hf])"
    except ValueError as error:
        why = str(error)
    else:
        # Checked once per tokenizer, on the corners of the split and the first corpus's sample: building
        # the Hugging Face tokenizer and encoding with it costs more than encoding a small corpus.
        why = None if fast.built.checked else _first_difference(fast, hf, [*_PROBES, *sample])
        if why is None:
            from fastlm.tokenizer_cache import store_tiktoken

            store_tiktoken(tokenizer_json, [fast.SEPARATOR], fast.built.bpe)
            fast.built.checked = True
            return fast, None
    if requested == "tiktoken":
        raise ValueError(f"encoder='tiktoken' cannot encode with this tokenizer: {why}")
    warnings.warn(f"fastlm prepare: {why}; encoding with the Hugging Face tokenizer instead (slower)", stacklevel=3)
    return hf, why


def verification_sample(texts):
    """The leading texts of a batch, about _VERIFY_CHARS characters in all."""
    sizes = np.cumsum(np.fromiter(map(len, texts), np.int64, count=len(texts)))
    return texts[: int(np.searchsorted(sizes, _VERIFY_CHARS)) + 1]


def _first_difference(fast, hf, texts):
    fast_tokens, fast_lengths = fast(texts)
    hf_tokens, hf_lengths = hf(texts)
    if np.array_equal(fast_lengths, hf_lengths) and np.array_equal(fast_tokens, hf_tokens):
        return None
    fast_docs = np.split(fast_tokens, np.cumsum(fast_lengths)[:-1])
    hf_docs = np.split(hf_tokens, np.cumsum(hf_lengths)[:-1])
    i = next(i for i, (a, b) in enumerate(zip(fast_docs, hf_docs)) if not np.array_equal(a, b))
    return f"tiktoken's ids differ from the tokenizer's on {texts[i][:80]!r}"


def encode_batches(batches, encoder, *, prefix=(), suffix=()):
    """For each Batch, in input order: (tokens, lengths, doc_bytes, open).

    lengths and doc_bytes (UTF-8 bytes of the text) are per text; ``prefix``/``suffix`` ids (bos, eos,
    the tokenizer's template) go around every document, not around the pieces of a long one.
    """
    prefix = np.asarray(prefix, encoder.dtype)
    suffix = np.asarray(suffix, prefix.dtype)
    for batch in batches:
        if not batch.texts:
            continue
        tokens, lengths = encoder(batch.texts)
        doc_bytes = np.fromiter(map(len, map(str.encode, batch.texts)), np.int64, count=len(batch.texts))
        tokens, lengths = _frame(tokens, lengths, prefix, suffix, batch.continues, batch.open)
        yield tokens, lengths, doc_bytes, batch.open


def _frame(tokens, lengths, prefix, suffix, continues, open_):
    """Put prefix before and suffix after every text, except before a text that continues a document
    and after one whose document goes on; vectorised over the batch."""
    n = lengths.shape[0]
    before = np.full(n, prefix.shape[0], np.int64)
    after = np.full(n, suffix.shape[0], np.int64)
    if n and continues:
        before[0] = 0
    if n and open_:
        after[-1] = 0
    if not (before.any() or after.any()):
        return tokens, lengths
    lengths = lengths + before + after
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]), tokens.dtype)
    content = np.ones(out.shape[0], bool)
    framed_starts = starts[before > 0]
    for k, token in enumerate(prefix):
        out[framed_starts + k] = token
        content[framed_starts + k] = False
    framed_ends = ends[after > 0] - suffix.shape[0]
    for k, token in enumerate(suffix):
        out[framed_ends + k] = token
        content[framed_ends + k] = False
    out[content] = tokens
    return out, lengths
