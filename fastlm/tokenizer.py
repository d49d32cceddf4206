"""Load or train the fast tokenizer a token store is made with, and describe it for meta.json.

transformers and tokenizers are imported inside the functions: `import fastlm` stays light.
"""
import hashlib
import json
from pathlib import Path

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
