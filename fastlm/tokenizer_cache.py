"""The user's cache of what prepare derives from a tokenizer, so it is derived once per tokenizer, not per run.

`fastlm prepare --tokenizer DIR` needs a tokenizer's JSON, vocabulary size, special ids, fingerprint,
template and saved files, and a tiktoken encoding built from its merges. Deriving them imports
transformers (seconds) and builds tiktoken's ranks (~0.4 s for GPT-2); both are kept in
``<cache root>/encoders/`` (the root: $FASTLM_CACHE, else $XDG_CACHE_HOME/fastlm, else ~/.cache/fastlm)::

    tokenizer-<sha256>/     info.json, backend.json (the tokenizers JSON) and saved/ (save_pretrained
                            output), keyed by the contents of the
                            tokenizer's files and the transformers/tokenizers versions
    tiktoken-<sha256>.npz   the tiktoken ranks of a tokenizer JSON, written once they gave the
                            tokenizer's own ids (fastlm.encoding.choose_encoder)

Nothing here is a pickle: JSON, the tokenizer's own files, and integer/string arrays loaded with
allow_pickle=False. Entries are written atomically; a cache that cannot be written (a read-only home)
or an unreadable entry only costs the time of deriving them again.
"""
import functools
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fastlm.cache import base_dir
from fastlm.writes import failed_write

_FORMAT = 1
_FACTS = ("name", "vocab_size", "special_ids", "fingerprint", "template", "template_error")
# Files in a tokenizer directory that are never part of the tokenizer: model weights can be gigabytes.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz")


def encoders_dir():
    """Beside the runner's prepared stores, in fastlm's user cache."""
    return base_dir() / "encoders"


class TokenizerInfo(NamedTuple):
    """What prepare needs of a tokenizer; ``save(directory)`` writes it in save_pretrained form."""

    name: str
    tokenizer_json: str
    vocab_size: int
    special_ids: dict
    fingerprint: str
    template: list  # [prefix ids, suffix ids] of add_special_tokens, or None
    template_error: str
    save: object


def describe(tok):
    """The TokenizerInfo of a loaded transformers fast tokenizer."""
    from fastlm.tokenizer import special_ids

    # Kept in memory for the same tokenizer object while its JSON and special tokens stay the same: the
    # fingerprint alone costs a quarter second for GPT-2, as much as encoding a million tokens.
    key = json.dumps(special_ids(tok), sort_keys=True)
    return _describe(tok, tok.backend_tokenizer.to_str(), key)


@functools.lru_cache(maxsize=4)
def _describe(tok, tokenizer_json, special_ids_key):
    from fastlm import tokenizer as tokenizer_lib

    try:
        template, template_error = list(tokenizer_lib.template_ids(tok)), None
    except ValueError as error:
        template, template_error = None, str(error)
    return TokenizerInfo(
        tok.name_or_path or type(tok).__name__, tokenizer_json, tokenizer_lib.vocab_size(tok),
        json.loads(special_ids_key), tokenizer_lib.fingerprint(tok), template, template_error, tok.save_pretrained,
    )


def tokenizer_info(spec):
    """The TokenizerInfo of ``spec`` (what fastlm.tokenizer.load_tokenizer accepts). Local tokenizer files
    are described once and the description cached; objects and hub names are loaded every time."""
    from fastlm.tokenizer import load_tokenizer

    key = _files_key(spec)
    entry = None if key is None else encoders_dir() / f"tokenizer-{key}"
    if entry is not None:
        cached = _read_info(entry)
        if cached is not None:
            return cached
        shutil.rmtree(entry, ignore_errors=True)  # unreadable (or absent): written again below
    info = describe(load_tokenizer(spec))
    if entry is not None and _write_info(entry, info):
        return _read_info(entry) or info  # every run saves the same files into its store
    return info


def _read_info(entry):
    try:
        facts = json.loads((entry / "info.json").read_text(encoding="utf-8"))
        tokenizer_json = (entry / "backend.json").read_text(encoding="utf-8")
        fields = {name: facts[name] for name in _FACTS}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if facts.get("tokenizer_json_sha256") != _sha256(tokenizer_json.encode("utf-8")):
        return None
    return TokenizerInfo(tokenizer_json=tokenizer_json, save=lambda directory: shutil.copytree(entry / "saved", directory), **fields)


def _write_info(entry, info):
    """Write the entry atomically; False when the cache cannot be written."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            info.save(tmp / "saved")
            (tmp / "backend.json").write_text(info.tokenizer_json, encoding="utf-8")
            facts = {name: getattr(info, name) for name in _FACTS}
            facts["tokenizer_json_sha256"] = _sha256(info.tokenizer_json.encode("utf-8"))
            (tmp / "info.json").write_text(json.dumps(facts, indent=2, sort_keys=True), encoding="utf-8")
            os.rename(tmp, entry)
        except Exception as error:
            shutil.rmtree(tmp, ignore_errors=True)
            # tokenizers (Rust) reports a full disk as a bare Exception: "... (os error 28)".
            if not isinstance(error, OSError) and failed_write(error, tmp) is None:
                raise
            return entry.is_dir()  # another run may have written it first
    except OSError:
        return False
    return True


def _files_key(spec):
    """sha256 of the tokenizer files ``spec`` names (and of what reads them), or None when it names no
    local files (a tokenizer object, a hub name)."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        files, kind = [Path(spec[0]), Path(spec[1])], "pair"
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).is_file():
        path = Path(spec)
        merges = [path.with_name("merges.txt")] if path.name == "vocab.json" else []
        files, kind = [path, *merges], f"file:{path.name}"
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir():
        files = sorted(f for f in Path(spec).iterdir() if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES))
        kind = "directory"
    else:
        return None
    try:
        contents = [[file.name, _sha256(file.read_bytes())] for file in files if file.is_file()]
    except OSError:
        return None
    versions = {name: _version(name) for name in ("transformers", "tokenizers")}
    key = {"format": _FORMAT, "kind": kind, "files": contents, "versions": versions}
    return _sha256(json.dumps(key, sort_keys=True).encode("utf-8"))


# --- tiktoken encodings --------------------------------------------------------------------------------


def load_tiktoken(tokenizer_json, extra_special_tokens):
    """The cached fastlm.tokenizer.TiktokenBPE of this tokenizer JSON, or None."""
    path = _tiktoken_path(tokenizer_json, extra_special_tokens)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            blob, ends = arrays["rank_bytes"].tobytes(), arrays["rank_ends"]
            specials = dict(zip(arrays["special_tokens"].tolist(), arrays["special_ranks"].tolist()))
            ids, pattern = arrays["ids"], str(arrays["pattern"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    import tiktoken

    from fastlm.tokenizer import TiktokenBPE

    starts = np.concatenate([[0], ends[:-1]]).tolist()
    ranks = {blob[start:end]: rank for rank, (start, end) in enumerate(zip(starts, ends.tolist()))}
    return TiktokenBPE(tiktoken.Encoding("fastlm-byte-level-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                         special_tokens=specials), ids)


def store_tiktoken(tokenizer_json, extra_special_tokens, bpe):
    """Cache a TiktokenBPE that gave the tokenizer's ids; silently nothing when the cache is not writable."""
    path = _tiktoken_path(tokenizer_json, extra_special_tokens)
    if path.is_file():
        return
    state = bpe.encoding.__getstate__()  # tiktoken's own serialisation: pattern, ranks, special tokens
    ranked = sorted(state["mergeable_ranks"].items(), key=lambda item: item[1])
    if [rank for _, rank in ranked] != list(range(len(ranked))):
        return  # ranks with gaps cannot be stored as a list; never the case for fastlm's encodings
    specials = state["special_tokens"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, rank_bytes=np.frombuffer(b"".join(token for token, _ in ranked), np.uint8),
                     rank_ends=np.cumsum([len(token) for token, _ in ranked], dtype=np.int64),
                     special_tokens=np.array(list(specials), dtype=str),
                     special_ranks=np.array(list(specials.values()), np.int64),
                     ids=np.asarray(bpe.ids, np.int64), pattern=np.array(state["pat_str"]))
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def _tiktoken_path(tokenizer_json, extra_special_tokens):
    key = json.dumps({"format": _FORMAT, "tiktoken": _version("tiktoken"), "extra": list(extra_special_tokens)})
    return encoders_dir() / f"tiktoken-{_sha256(key.encode('utf-8') + tokenizer_json.encode('utf-8'))}.npz"


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
