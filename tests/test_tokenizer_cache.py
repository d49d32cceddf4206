"""fastlm.tokenizer_cache: what prepare derives from a tokenizer is derived once, kept without pickles,
and a later `fastlm prepare` loads neither transformers nor the datasets/torch stack."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastlm import tokenizer_cache
from fastlm.encoding import TiktokenEncoder, choose_encoder
from tests.data import fixture_path, wikitext_lines

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI, then prints which heavy modules it imported.
CLI_IMPORTS = """
import sys
from fastlm.cli import main
code = main(sys.argv[1:])
print("IMPORTED", [name for name in ("transformers", "datasets", "torch", "pyarrow") if name in sys.modules])
sys.exit(code)
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FASTLM_CACHE", str(root))
    return root / "encoders"


@pytest.fixture
def gpt2_copy(tmp_path):
    """The GPT-2 vocab.json + merges.txt in a directory of their own, so a test may change it."""
    return Path(shutil.copytree(fixture_path("tokenizers", "gpt2"), tmp_path / "gpt2"))


def _prepare(args, env):
    result = subprocess.run([sys.executable, "-c", CLI_IMPORTS, "prepare", *map(str, args), "--no-progress"],
                            env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.split("IMPORTED ")[1].replace("'", '"'))


def test_the_second_run_imports_no_transformers_and_writes_the_same_store(tmp_path, cache, gpt2_copy):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(wikitext_lines("valid")[:200]), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert "transformers" in _prepare([corpus, "-o", tmp_path / "first", "--tokenizer", gpt2_copy], env)
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["tiktoken", "tokenizer"]
    assert _prepare([corpus, "-o", tmp_path / "second", "--tokenizer", gpt2_copy, "--num-proc", "2"], env) == []
    for file in sorted((tmp_path / "first").rglob("*")):
        if file.is_file() and file.name != "meta.json":
            assert file.read_bytes() == (tmp_path / "second" / file.relative_to(tmp_path / "first")).read_bytes()
    first, second = (json.loads((tmp_path / name / "meta.json").read_text()) for name in ("first", "second"))
    for key in ("checksums", "special_ids", "tokenizer_fingerprint", "vocab_size", "tokenizer_name"):
        assert first[key] == second[key]


def test_changed_tokenizer_files_are_a_new_entry(cache, gpt2_copy):
    first = tokenizer_cache.tokenizer_info(gpt2_copy)
    again = tokenizer_cache.tokenizer_info(gpt2_copy)
    assert again.fingerprint == first.fingerprint and len(list(cache.iterdir())) == 1
    vocab = json.loads((gpt2_copy / "vocab.json").read_text(encoding="utf-8"))
    vocab["<|endoftext|>"], vocab["!"] = vocab["!"], vocab["<|endoftext|>"]
    (gpt2_copy / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    changed = tokenizer_cache.tokenizer_info(gpt2_copy)
    assert changed.fingerprint != first.fingerprint and len(list(cache.iterdir())) == 2


def test_entries_are_json_and_arrays_never_pickles(cache, gpt2_tok):
    tokenizer_json = gpt2_tok.backend_tokenizer.to_str()
    encoder, _ = choose_encoder("auto", tokenizer_json, np.uint16, ["Hello world\n"], None)
    [npz] = cache.glob("tiktoken-*.npz")
    with np.load(npz, allow_pickle=False) as arrays:
        assert all(arrays[name].dtype != object for name in arrays.files)
    # Loaded back, the encoding gives the same ids, and is trusted as checked.
    bpe = tokenizer_cache.load_tiktoken(tokenizer_json, [TiktokenEncoder.SEPARATOR])
    text = "Hello world, naïve café 😀 <|endoftext|>\n"
    assert bpe.ids[bpe.encoding.encode(text, allowed_special="all")].tolist() == gpt2_tok(text)["input_ids"]
    tokenizer_cache.tokenizer_info(str(fixture_path("tokenizers", "gpt2")))
    [entry] = cache.glob("tokenizer-*")
    json.loads((entry / "info.json").read_text())
    assert sorted(p.name for p in entry.iterdir()) == ["backend.json", "info.json", "saved"]


def test_a_broken_entry_is_derived_again(cache, gpt2_tok, gpt2_copy):
    info = tokenizer_cache.tokenizer_info(gpt2_copy)
    [entry] = cache.glob("tokenizer-*")
    (entry / "info.json").write_text("{not json", encoding="utf-8")
    assert tokenizer_cache.tokenizer_info(gpt2_copy).fingerprint == info.fingerprint
    tokenizer_json = gpt2_tok.backend_tokenizer.to_str()
    choose_encoder("auto", tokenizer_json, np.uint16, ["text"], None)
    [npz] = cache.glob("tiktoken-*.npz")
    npz.write_bytes(npz.read_bytes()[:100])
    assert tokenizer_cache.load_tiktoken(tokenizer_json, [TiktokenEncoder.SEPARATOR]) is None


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch, gpt2_copy):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FASTLM_CACHE", str(blocker))
    assert tokenizer_cache.tokenizer_info(gpt2_copy).vocab_size == 50257


def test_the_cache_root_follows_fastlm_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tokenizer_cache.encoders_dir() == tmp_path / "xdg" / "fastlm" / "encoders"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tokenizer_cache.encoders_dir() == Path.home() / ".cache" / "fastlm" / "encoders"
    monkeypatch.setenv("FASTLM_CACHE", str(tmp_path / "mine"))
    assert tokenizer_cache.encoders_dir() == tmp_path / "mine" / "encoders"
