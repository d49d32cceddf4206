"""Load or train the fast tokenizer a token store is made with, and describe it for meta.json.

transformers and tokenizers are imported inside the functions: `import fastlm` stays light.
"""
import functools
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

# The one special token a trained byte-level BPE gets: GPT-2's, used as eos, bos and unk.
TRAINED_SPECIAL_TOKEN = "<|endoftext|>"
# A byte-level BPE needs its 256 byte tokens plus that special token.
MIN_TRAINED_VOCAB = 257
# The BPE trainer reserves memory in proportion to the requested size before it reads the corpus
# (1e9 asks for ~70 GB and aborts the whole process); real vocabularies stay far below this.
MAX_TRAINED_VOCAB = 1 << 22


def check_trained_vocab_size(vocab_size, flag="--vocab-size", error=ValueError):
    """Raise ``error`` (a ValueError) unless a byte-level BPE can be trained to vocab_size; ``flag`` names
    the option in the message."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not (
        MIN_TRAINED_VOCAB <= vocab_size <= MAX_TRAINED_VOCAB
    ):
        raise error(f"{flag} must be an integer in [{MIN_TRAINED_VOCAB}, {MAX_TRAINED_VOCAB}] for a trained "
                         f"byte-level BPE (256 byte tokens + {TRAINED_SPECIAL_TOKEN} at least), got {vocab_size!r}")


def load_tokenizer(spec):
    """A transformers fast tokenizer from ``spec``.

    ``spec`` may be a tokenizer object (transformers fast tokenizer or ``tokenizers.Tokenizer``),
    a save_pretrained directory or hub name (AutoTokenizer), a ``tokenizer.json`` file, a BPE
    ``vocab.json`` (``merges.txt`` beside it), a directory holding only vocab.json + merges.txt, a
    WordPiece ``vocab.txt``, or a ``(vocab.json, merges.txt)`` pair.
    """
    from transformers import PreTrainedTokenizerFast

    if isinstance(spec, PreTrainedTokenizerFast):
        return spec
    if type(spec).__module__.startswith("tokenizers") and hasattr(spec, "encode_batch"):
        return PreTrainedTokenizerFast(tokenizer_object=spec)
    if hasattr(spec, "encode") and hasattr(spec, "get_vocab"):
        raise TypeError(
            f"{type(spec).__name__} is a slow (pure Python) tokenizer; fastlm needs a fast one "
            "(use AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"a tokenizer given as files must be (vocab.json, merges.txt), got {spec!r}")
        return _readable(spec[0], lambda: _bpe_from_files(Path(spec[0]), Path(spec[1])))
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"cannot make a tokenizer from {type(spec).__name__}")
    path = Path(spec)
    if path.is_dir() and not (path / "tokenizer_config.json").exists() and not (path / "tokenizer.json").exists():
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return _readable(path, lambda: _bpe_from_files(path / "vocab.json", path / "merges.txt"))
        if (path / "vocab.txt").is_file():
            return _readable(path, lambda: _wordpiece_from_file(path / "vocab.txt"))
    if path.is_file():
        if path.name.endswith(".json") and path.name != "vocab.json":
            return _readable(path, lambda: PreTrainedTokenizerFast(tokenizer_file=str(path)))
        if path.suffix == ".json":
            merges = path.with_name("merges.txt")
            if not merges.is_file():
                raise FileNotFoundError(f"BPE vocabulary {path} needs merges.txt beside it ({merges} is missing)")
            return _readable(path, lambda: _bpe_from_files(path, merges))
        if path.suffix == ".txt":
            return _readable(path, lambda: _wordpiece_from_file(path))
        raise ValueError(f"{path}: not a tokenizer file (expected tokenizer.json, vocab.json or vocab.txt)")
    from transformers import AutoTokenizer

    if path.is_dir():
        tokenizer = _readable(path, lambda: AutoTokenizer.from_pretrained(str(path), use_fast=True))
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise TypeError(f"{path} only holds a slow tokenizer; fastlm needs a fast one")
        return tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec), use_fast=True)
    except OSError as error:
        raise OSError(
            f"could not load tokenizer {spec!r}: not a local directory or file, and the hub lookup "
            f"failed ({error}). Offline? Use a local path or a cached name."
        ) from error
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{spec!r} only has a slow tokenizer; fastlm needs a fast one")
    return tokenizer


def _readable(path, load):
    """load(), with a broken tokenizer file reported as a one-line ValueError naming ``path``: the Rust
    tokenizers library raises a bare Exception ("key must be a string at line 1 column 2") and
    transformers a JSONDecodeError or a multi-line ValueError, none of which names the file."""
    try:
        return load()
    except (OSError, ImportError):
        raise
    except Exception as error:
        detail = " ".join(str(error).split())
        raise ValueError(f"{path}: not a readable tokenizer ({type(error).__name__}: {detail})") from None


def _bpe_from_files(vocab, merges):
    with open(vocab, encoding="utf-8") as f:
        entries = json.load(f)
    # RoBERTa's vocabulary (fairseq id order) carries <s>/<mask>; GPT-2's has only <|endoftext|>.
    if "<s>" in entries and "<mask>" in entries:
        from transformers import RobertaTokenizerFast as cls
    else:
        from transformers import GPT2TokenizerFast as cls
    # vocab=/merges= paths: transformers 5's vocab_file= keyword silently builds an empty tokenizer.
    return cls(vocab=str(vocab), merges=str(merges))


def _wordpiece_from_file(vocab):
    from transformers import BertTokenizerFast

    # The file name does not say whether the vocabulary is cased: a cased one has words starting
    # with A-Z (an uncased one may still hold a stray non-ASCII capital such as "ℝ").
    with open(vocab, encoding="utf-8") as f:
        lowercase = not any("A" <= line[:1] <= "Z" for line in f if not line.startswith("["))
    return BertTokenizerFast(vocab=str(vocab), do_lower_case=lowercase)


def train_bpe_tokenizer(batches, vocab_size):
    """Train a byte-level BPE on an iterator of lists of texts; returns a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    check_trained_vocab_size(vocab_size)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(batches, vocab_size=vocab_size, special_tokens=[TRAINED_SPECIAL_TOKEN], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token=TRAINED_SPECIAL_TOKEN,
        bos_token=TRAINED_SPECIAL_TOKEN,
        unk_token=TRAINED_SPECIAL_TOKEN,
    )


def vocab_size(tokenizer):
    """Ids run below this: the largest id + 1 (sparse vocabularies such as RoBERTa's have gaps)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def padding_id(specials):
    """The id to pad blocks with, from {name: id} special ids: pad, else eos (GPT-2 has no pad), else 0
    (never a target either way: padding gets label -100 and attention 0)."""
    for name in ("pad", "eos"):
        if specials.get(name) is not None:
            return int(specials[name])
    return 0


def special_ids(tokenizer):
    """{eos, bos, pad, mask, cls, sep, unk} -> id or None."""
    return {
        name: getattr(tokenizer, f"{name}_token_id", None)
        for name in ("eos", "bos", "pad", "mask", "cls", "sep", "unk")
    }


def fingerprint(tokenizer):
    """sha256 of the token -> id table: equal fingerprints mean interchangeable ids."""
    table = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(table.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2, RoBERTa, fastlm's trained tokenizer): what makes a tokenizer one, and the
# tiktoken encoding that reproduces it.

# The pre-tokenizer's split of GPT-2 (tokenizers' ByteLevel(use_regex=True) uses exactly this).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same split with possessive quantifiers, which tiktoken's regex engine runs faster (tiktoken's own
# GPT-2 encoding uses it: tiktoken_ext/openai_public.py, r50k_pat_str).
_TIKTOKEN_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_TIKTOKEN_MIN_VERSION = (0, 11)  # encode_to_numpy honours allowed special tokens from 0.11 on


def _byte_alphabet():
    """GPT-2's byte -> printable character table (the characters byte-level vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {byte: chr(byte if byte in printable else next(shifted)) for byte in range(256)}


def _backend_json(tokenizer):
    """The tokenizers JSON of a fast tokenizer, or of tokenizer.json text, as a dict."""
    if isinstance(tokenizer, str):
        return json.loads(tokenizer)
    return json.loads(tokenizer.backend_tokenizer.to_str())


def byte_level_bpe_problem(tokenizer):
    """Why ``tokenizer`` (a fast tokenizer or tokenizer.json text) is not a byte-level BPE that splits
    text like GPT-2, or None when it is.

    Such a tokenizer encodes every piece of GPT2_SPLIT_PATTERN on its own: tiktoken can reproduce it, and
    a long document can be cut at whitespace that follows a non-space and encoded in parts.
    """
    if isinstance(tokenizer, str):
        return _json_problem(tokenizer)
    return _byte_level_problem(_backend_json(tokenizer))


@functools.lru_cache(maxsize=4)
def _json_problem(tokenizer_json):
    # Parsing GPT-2's JSON takes ~50 ms: prepare asks once per run, the runner twice in a row.
    return _byte_level_problem(json.loads(tokenizer_json))


def _byte_level_problem(spec):
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"it is a {model.get('type')} tokenizer, not a byte-level BPE"
    if spec.get("normalizer") is not None:
        return f"it normalizes text first ({spec['normalizer'].get('type')})"
    if not _splits_like_gpt2(spec.get("pre_tokenizer")):
        return "its pre-tokenizer is not GPT-2's byte-level split"
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "its BPE model uses dropout, byte fallback or subword prefixes/suffixes"
    # An added token that swallows the whitespace after it would change the ids of the text behind it.
    if any(token.get("rstrip") for token in spec.get("added_tokens", [])):
        return "an added token strips the whitespace after it (rstrip)"
    return None


def _splits_like_gpt2(pre_tokenizer):
    if pre_tokenizer is None:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space")
    if pre_tokenizer.get("type") != "Sequence" or len(pre_tokenizer.get("pretokenizers", [])) != 2:
        return False
    split, byte_level = pre_tokenizer["pretokenizers"]
    return (
        split.get("type") == "Split"
        and split.get("pattern") == {"Regex": GPT2_SPLIT_PATTERN}
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("use_regex", True)
        and not byte_level.get("add_prefix_space")
    )


class TiktokenBPE(NamedTuple):
    """A tiktoken encoding of a byte-level BPE, and ``ids[rank]``: the tokenizer's id of each tiktoken rank.

    tiktoken's ranks are merge priorities (the 256 bytes, then one rank per merge, then the added
    tokens as special tokens); vocabularies number their tokens otherwise (RoBERTa renumbers GPT-2's),
    so ids are ``bpe.ids[bpe.encoding.encode_ordinary(text)]``.
    """

    encoding: object
    ids: object


def tiktoken_encoding(tokenizer, extra_special_tokens=()):
    """The TiktokenBPE of a byte-level BPE (a fast tokenizer or tokenizer.json text), built offline from
    its own vocabulary and merges. ``extra_special_tokens`` get tiktoken ranks after all of the
    tokenizer's own (past the end of ``ids``). Raises ValueError naming why when tiktoken cannot
    reproduce the tokenizer, ImportError when tiktoken is missing or too old.
    """
    import numpy as np
    import tiktoken

    version = tuple(int(part) for part in tiktoken.__version__.split(".")[:2])
    if version < _TIKTOKEN_MIN_VERSION:
        raise ImportError(f"tiktoken {tiktoken.__version__} is too old; fastlm needs tiktoken>=0.11 (pip install -U tiktoken)")
    spec = _backend_json(tokenizer)
    problem = _byte_level_problem(spec)
    if problem:
        raise ValueError(f"tiktoken cannot reproduce this tokenizer: {problem}")
    alphabet = _byte_alphabet()
    # str.translate + latin-1 turns a token written in the byte alphabet into its bytes at C speed; any
    # other character becomes U+FFFF, which latin-1 refuses.
    to_bytes = {code: "\uffff" for code in range(256)}
    to_bytes.update({ord(char): chr(byte) for byte, char in alphabet.items()})
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    ranks = {bytes([byte]): byte for byte in range(256)}
    rank_tokens = [alphabet[byte] for byte in range(256)]
    for merge in merges:
        merged = "".join(merge.split(" ") if isinstance(merge, str) else merge)
        try:
            merged_bytes = merged.translate(to_bytes).encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"tiktoken cannot reproduce this tokenizer: merge {merge!r} is not written in the byte alphabet") from None
        # Two merges with the same result: BPE reaches it by the earlier (higher-priority) one first.
        if merged_bytes not in ranks:
            ranks[merged_bytes] = len(rank_tokens)
            rank_tokens.append(merged)
    missing = [token for token in rank_tokens if token not in vocab]
    if missing:
        raise ValueError(f"tiktoken cannot reproduce this tokenizer: {missing[0]!r} (a byte or a merge's result) is not in its vocabulary")
    added = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
    ids = np.array([vocab[token] for token in rank_tokens] + list(added.values()), np.int64)
    special = {content: len(rank_tokens) + i for i, content in enumerate(added)}
    special.update({content: len(ids) + i for i, content in enumerate(extra_special_tokens)})
    encoding = tiktoken.Encoding("fastlm-byte-level-bpe", pat_str=_TIKTOKEN_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    return TiktokenBPE(encoding, ids)


def template_ids(tokenizer):
    """(prefix, suffix): the ids a fast tokenizer's template puts around every single text with
    add_special_tokens=True, e.g. ([101], [102]) for BERT's [CLS] ... [SEP], ([], []) for GPT-2.
    ValueError when they depend on the text (fastlm adds them around documents it encodes in pieces)."""
    found = set()
    for probe in ("Hello world", "a", "12 + 3"):
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe, add_special_tokens=True)["input_ids"]
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
        if not starts:
            found.add(None)
            continue
        found.add((tuple(full[: starts[0]]), tuple(full[starts[0] + len(plain) :])))
    if len(found) != 1 or None in found:
        raise ValueError("add_special_tokens: this tokenizer's template is not the same ids around every text")
    prefix, suffix = found.pop()
    return list(prefix), list(suffix)
