"""The `fastlm` command: prepare, merge, inspect, pack, and the train hand-off."""
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastlm import pack_blocks, pack_documents
from fastlm.cli import main
from fastlm.store import TokenStore
from tests.data import fixture_path, wikitext_lines

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "corpus.txt"
    path.write_text("".join(wikitext_lines("valid")[:120]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2_dir():
    return str(fixture_path("tokenizers", "gpt2"))


@pytest.fixture(scope="module")
def store_path(corpus, gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_store") / "store"
    assert main(["prepare", str(corpus), "-o", str(out), "--tokenizer", gpt2_dir, "--append-eos", "--no-progress"]) == 0
    return out


def test_prepare_prints_a_summary_and_makes_a_store(corpus, gpt2_dir, gpt2_tok, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["prepare", str(corpus), "-o", str(out), "--tokenizer", gpt2_dir, "--prepend-bos", "--no-progress"]) == 0
    store = TokenStore.open(out)
    summary = capsys.readouterr().out
    assert f"{len(store):,} documents, {store.n_tokens:,} tokens (uint16)" in summary
    assert "tokens/s" in summary
    first = next(line for line in corpus.read_text().splitlines(keepends=True) if line.strip())
    assert store.doc(0).tolist() == [gpt2_tok.bos_token_id, *gpt2_tok(first)["input_ids"]]
    assert store.meta["args"]["prepend_bos"] is True and store.meta["tokenizer_name"] == gpt2_dir


def test_bad_input_is_one_line_not_a_traceback(tmp_path, gpt2_dir, capsys):
    code = main(["prepare", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "s"), "--tokenizer", gpt2_dir])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fastlm prepare: error: input") and "missing.txt" in err and "Traceback" not in err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a token store" in capsys.readouterr().err


def test_prepare_needs_a_tokenizer_choice(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prepare", str(corpus), "-o", str(tmp_path / "s")])
    assert "--tokenizer" in capsys.readouterr().err


def test_inspect_prints_meta_and_decoded_documents(store_path, corpus, capsys):
    assert main(["inspect", str(store_path), "--docs", "2", "--verify"]) == 0
    out = capsys.readouterr().out
    meta = json.loads(out[: out.index("\n}\n") + 2])
    assert meta == TokenStore.open(store_path).meta
    assert "checksums: OK" in out
    first = next(line for line in corpus.read_text().splitlines(keepends=True) if line.strip())
    assert "--- document 0 (" in out and first + "<|endoftext|>" in out
    assert "--- document 1 (" in out and "--- document 2 (" not in out


def test_inspect_and_prepare_report_bytes_per_token_and_tokens_per_core(store_path, corpus, gpt2_dir, tmp_path, capsys):
    store = TokenStore.open(store_path)
    assert main(["inspect", str(store_path), "--docs", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{store.n_bytes / store.n_tokens:.3f} bytes/token" in out
    cpu_rate = store.n_tokens / store.meta["encoding"]["cpu_seconds"]
    assert "encoding: tiktoken, " in out and f"{cpu_rate:,.0f} tokens/s per core (num_proc 1)" in out
    assert main(["prepare", str(corpus), "-o", str(tmp_path / "s"), "--tokenizer", gpt2_dir, "--no-progress",
                 "--encoder", "hf", "--num-proc", "2"]) == 0
    summary = capsys.readouterr().out
    assert "tokens/s per core" in summary and "bytes/token" in summary
    hf = TokenStore.open(tmp_path / "s")
    assert hf.meta["encoding"]["encoder"] == "hf" and hf.meta["args"]["num_proc"] == 2
    assert hf.tokens.tolist() == [t for t in store.tokens.tolist() if t != 50256]


def test_a_fallback_warning_is_one_line(corpus, gpt2_dir, tmp_path, capsys, monkeypatch):
    from fastlm import encoding

    encoding._tiktoken_bpe.cache_clear()
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    assert main(["prepare", str(corpus), "-o", str(tmp_path / "s"), "--tokenizer", gpt2_dir, "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastlm prepare: tiktoken is not available")
    assert main(["prepare", str(corpus), "-o", str(tmp_path / "t"), "--tokenizer", gpt2_dir, "--encoder", "tiktoken"]) == 2
    assert "error: encoder='tiktoken' cannot encode with this tokenizer: tiktoken is not available" in capsys.readouterr().err
    encoding._tiktoken_bpe.cache_clear()


def test_pack_reports_every_mode(store_path, capsys):
    assert main(["pack", str(store_path), "--block-size", "64"]) == 0
    out = capsys.readouterr().out
    store = TokenStore.open(store_path)
    eos = store.special_ids["eos"]
    expected = {
        "pack_blocks remainder=drop": pack_blocks(store.tokens, store.offsets, 64),
        "pack_blocks remainder=keep": pack_blocks(store.tokens, store.offsets, 64, remainder="keep"),
        "pack_documents overlong=split": pack_documents(store.tokens, store.offsets, 64, pad_id=eos),
        "pack_documents overlong=truncate": pack_documents(store.tokens, store.offsets, 64, overlong="truncate", pad_id=eos),
    }
    rows = {line[:34].strip(): line[34:].split() for line in out.splitlines()[2:]}
    assert "pack_blocks remainder=pad" in rows
    for name, result in expected.items():
        blocks, tokens, fill = rows[name]
        assert int(blocks.replace(",", "")) == len(result)
        assert int(tokens.replace(",", "")) == result.n_tokens
        assert fill == f"{result.fill_rate:.2%}"


def test_merge_command(store_path, tmp_path, capsys):
    assert main(["merge", str(store_path), str(store_path), "-o", str(tmp_path / "m")]) == 0
    merged, single = TokenStore.open(tmp_path / "m"), TokenStore.open(store_path)
    assert len(merged) == 2 * len(single)
    assert merged.doc(len(single)).tolist() == single.doc(0).tolist()


def test_shards_then_merge_give_the_one_machine_store(store_path, corpus, gpt2_dir, tmp_path, capsys):
    shards = [str(tmp_path / f"part{i}") for i in range(3)]
    for i, shard in enumerate(shards):
        assert main(["prepare", str(corpus), "-o", shard, "--tokenizer", gpt2_dir, "--append-eos", "--no-progress",
                     "--shard", f"{i}/3"]) == 0
    assert main(["merge", *shards, "-o", str(tmp_path / "all")]) == 0
    merged, single = TokenStore.open(tmp_path / "all"), TokenStore.open(store_path)
    assert merged.meta["checksums"] == single.meta["checksums"] and len(merged) == len(single)
    for name in ("tokens.bin", "offsets.bin", "bytes.bin"):
        assert (tmp_path / "all" / name).read_bytes() == (store_path / name).read_bytes()


@pytest.mark.parametrize("shard", ["3/3", "1", "a/b", "-1/2"])
def test_a_bad_shard_is_a_usage_error(corpus, gpt2_dir, tmp_path, capsys, shard):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", str(corpus), "-o", str(tmp_path / "s"), "--tokenizer", gpt2_dir, "--shard", shard])
    assert exit_.value.code == 2 and "--shard" in capsys.readouterr().err


def test_train_hands_its_arguments_to_the_runner(monkeypatch):
    from fastlm import run

    seen = []
    monkeypatch.setattr(run, "main", lambda argv: seen.append(argv) or 0)
    assert main(["train", "--task", "clm", "--help-me"]) == 0
    assert seen == [["--task", "clm", "--help-me"]]


def test_console_entry_lists_the_commands():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "fastlm.cli", "--help"], env=env, capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("prepare", "merge", "inspect", "pack", "train"):
        assert command in result.stdout


def test_a_reader_that_stops_early_is_not_an_error(store_path):
    """`fastlm inspect S | head -1`: more output than the pipe holds, then the pipe closes."""
    inspect = subprocess.Popen([sys.executable, "-m", "fastlm.cli", "inspect", str(store_path), "--docs", "100"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    inspect.stdout.readline()
    inspect.stdout.close()
    _, stderr = inspect.communicate(timeout=60)
    assert inspect.returncode == 0, stderr.decode()
    assert b"Broken pipe" not in stderr and b"Traceback" not in stderr


# --- bad input from the command line: exit status 2 and one line, in a real process -----------------------


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fastlm.cli", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _project_dir(tmp_path):
    """A user's directory that happens to hold a meta.json: never a store to overwrite."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "meta.json").write_text("{}")
    (project / "thesis.tex").write_text("precious")
    return project


def _truncated_gzip(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    data = gzip.compress(b"one document\n" * 5000)
    path.write_bytes(data[: len(data) // 2])
    return path


def _store_without(part):
    def make(tmp_path, store_path):
        copy = tmp_path / "copy"
        shutil.copytree(store_path, copy)
        if part == "tokenizer":
            shutil.rmtree(copy / "tokenizer")
        else:
            (copy / part).write_bytes((copy / part).read_bytes()[:-3])
        return copy
    return make


@pytest.mark.parametrize("case, argv, message", [
    ("overwrite a project", lambda t, s, c, g: ["prepare", c, "-o", _project_dir(t), "--tokenizer", g, "--overwrite"],
     "is not a token store (it holds thesis.tex); refusing to overwrite it"),
    ("merge over a project", lambda t, s, c, g: ["merge", s, "-o", _project_dir(t), "--overwrite"],
     "is not a token store (it holds thesis.tex); refusing to overwrite it"),
    ("vocabulary of 1e9", lambda t, s, c, g: ["prepare", c, "-o", t / "s", "--train-tokenizer", "--vocab-size", "1000000000"],
     "--vocab-size must be an integer in [257, 4194304]"),
    ("truncated gzip", lambda t, s, c, g: ["prepare", _truncated_gzip(t), "-o", t / "s", "--tokenizer", g, "--no-progress"],
     "corpus.txt.gz: corrupt or truncated .gz data (Compressed file ended before the end-of-stream marker"),
    ("broken tokenizer.json", lambda t, s, c, g: ["prepare", c, "-o", t / "s", "--tokenizer", t / "tokenizer.json"],
     "tokenizer.json: not a readable tokenizer (Exception: key must be a string"),
    ("store without tokenizer", lambda t, s, c, g: ["inspect", _store_without("tokenizer")(t, s)],
     "has no tokenizer"),
    ("truncated store", lambda t, s, c, g: ["pack", _store_without("tokens.bin")(t, s), "--block-size", "8"],
     "the store is truncated or corrupt"),
    ("missing store", lambda t, s, c, g: ["merge", s, t / "nope", "-o", t / "m"], "no such directory"),
])
def test_bad_input_from_the_command_line(case, argv, message, tmp_path, store_path, corpus, gpt2_dir):
    (tmp_path / "tokenizer.json").write_text("{1: 2}")
    result = _run_cli(*argv(tmp_path, store_path, corpus, gpt2_dir))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlm ") and message in lines[0], result.stderr
    assert result.stdout == ""
    if (tmp_path / "proj").exists():
        assert (tmp_path / "proj" / "thesis.tex").read_text() == "precious"
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()
