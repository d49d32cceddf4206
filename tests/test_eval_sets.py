"""Several evaluation sets, bits per byte, and the checks between stores and model (tokenizer, ids)."""
import json
import math
import shutil

import numpy as np
import pytest

from fastlm import run
from fastlm.train import data, evaluation
from fastlm.train.data import EvalSet
from tests.data import wikitext_lines
from tests.test_run import TINY, _PlainEngine, _config, _tiny_gpt


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    lines = [line for line in wikitext_lines("valid") if line.strip()]
    root = tmp_path_factory.mktemp("eval_sets")
    parts = {"train": lines[:300], "wiki": lines[300:330], "more": lines[330:345]}
    for name, part in parts.items():
        (root / f"{name}.txt").write_text("".join(part), encoding="utf-8")
    return root, parts


@pytest.fixture(scope="module")
def stores(texts):
    from fastlm.prepare import prepare

    root, _ = texts
    train = prepare([str(root / "train.txt")], root / "train", train_tokenizer=True, vocab_size=512, progress=False)
    for name in ("wiki", "more"):
        prepare([str(root / f"{name}.txt")], root / name, tokenizer=str(train.tokenizer_dir), progress=False)
    return root


def test_bits_per_byte_is_nll_in_bits_over_the_bytes_the_scored_tokens_cover():
    # Every token scored: plain division.
    assert evaluation.bits_per_byte(math.log(2) * 300, 100, n_tokens=100, n_bytes=400) == pytest.approx(0.75)
    # Half the tokens scored cover half the text's bytes.
    assert evaluation.bits_per_byte(math.log(2) * 150, 50, n_tokens=100, n_bytes=400) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="scored tokens"):
        evaluation.bits_per_byte(1.0, 0, n_tokens=100, n_bytes=400)


def test_every_set_is_reported_under_its_name_and_the_first_also_at_the_top(stores):
    from transformers import AutoTokenizer

    from fastlm.store import TokenStore

    cfg = _config("--block_size", "64", "--per_device_eval_batch_size", "4")
    settings = dict(task=cfg.task, batch_size=cfg.evaluation.per_device_eval_batch_size)
    tokenizer = AutoTokenizer.from_pretrained(TokenStore.open(stores / "train").tokenizer_dir)
    sets = []
    for name in ("wiki", "more"):
        store = TokenStore.open(stores / name)
        n_bytes = 1000 if name == "more" else None  # only "more" knows its text's bytes
        sets.append(EvalSet(name, data.pack(cfg.data, store.tokens, store.offsets, tokenizer), store.n_tokens, n_bytes))
    engine = _PlainEngine(_tiny_gpt(512))
    got = evaluation.evaluate_sets(engine, sets, **settings, rank=0, world_size=1)
    wiki = evaluation.evaluate(engine, sets[0].blocks, **settings, rank=0, world_size=1)
    more = evaluation.evaluate(engine, sets[1].blocks, **settings, rank=0, world_size=1)
    assert {k: got[k] for k in ("eval_loss", "perplexity", "eval_tokens")} == wiki
    assert got["eval_wiki_loss"] == wiki["eval_loss"] and got["eval_more_perplexity"] == more["perplexity"]
    assert got["eval_more_tokens"] == more["eval_tokens"]
    assert "eval_wiki_bits_per_byte" not in got and "eval_bits_per_byte" not in got
    covered = 1000 * more["eval_tokens"] / sets[1].n_tokens
    assert got["eval_more_bits_per_byte"] == pytest.approx(more["eval_loss"] * more["eval_tokens"] / math.log(2) / covered)


def test_a_run_evaluates_each_set_with_bits_per_byte(stores, texts, tmp_path):
    """Strided evaluation scores every token but the first: bits per byte is then the NLL in bits over
    the bytes of the text, which the store records per document (bytes.bin)."""
    from fastlm.store import TokenStore

    _, parts = texts
    wiki_bytes = np.array([len(line.encode("utf-8")) for line in parts["wiki"]], dtype=np.int64)
    assert np.array_equal(TokenStore.open(stores / "wiki").doc_bytes, wiki_bytes)
    results = run.train(["--task", "clm", "--train_store", str(stores / "train"), "--eval_store", f"wiki={stores / 'wiki'}",
                         f"more={stores / 'more'}", "--config_name", "gpt2-tiny", "--block_size", "64",
                         "--eval_stride", "32", "--max_steps", "2", "--eval_steps", "1", "--output_dir", str(tmp_path), *TINY])
    n_tokens = TokenStore.open(stores / "wiki").n_tokens
    assert results["eval_wiki_tokens"] == n_tokens - 1  # every token scored but the first
    expected = results["eval_wiki_loss"] * results["eval_wiki_tokens"] / math.log(2) / (wiki_bytes.sum() * (n_tokens - 1) / n_tokens)
    assert results["eval_wiki_bits_per_byte"] == pytest.approx(expected, rel=1e-9)
    assert results["eval_bits_per_byte"] == results["eval_wiki_bits_per_byte"]  # the first set, at the top level
    assert results["eval_loss"] == results["eval_wiki_loss"]
    assert "eval_more_loss" in results and "eval_more_bits_per_byte" in results
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [1, 2]
    assert all({"eval_wiki_loss", "eval_wiki_perplexity", "eval_wiki_bits_per_byte", "eval_more_loss",
                "eval_more_perplexity", "eval_more_tokens"} <= set(m) for m in evals)

    # --do_eval alone, with evaluation stores and no training store: the saved model on the same sets.
    evaluated = run.train(["--model_name_or_path", str(tmp_path), "--eval_store", f"wiki={stores / 'wiki'}",
                           f"more={stores / 'more'}", "--block_size", "64", "--eval_stride", "32", "--do_eval",
                           "--output_dir", str(tmp_path / "eval"), *TINY])
    assert evaluated["steps"] == 0 and evaluated["task"] == "clm"
    for key in ("eval_wiki_loss", "eval_more_loss", "eval_more_bits_per_byte"):
        assert evaluated[key] == pytest.approx(results[key], rel=1e-6)
    hf = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert hf["eval_loss"] == evaluated["eval_wiki_loss"] and hf["eval_more_loss"] == evaluated["eval_more_loss"]
    assert hf["perplexity"] == pytest.approx(math.exp(hf["eval_loss"]))


def test_held_out_documents_keep_their_bytes(texts):
    docs = data.Documents(np.arange(10, dtype=np.uint16), np.array([0, 2, 5, 9, 10]), np.array([3, 4, 5, 6]))
    train, held_out = data.split_documents(docs, 0.5)
    assert train.doc_bytes.tolist() == [3, 4] and held_out.doc_bytes.tolist() == [5, 6]
    assert (train.n_tokens, held_out.n_tokens, held_out.n_bytes) == (5, 5, 11)
    assert data.split_documents(data.Documents(docs.tokens, docs.offsets), 0.5)[1].n_bytes is None


# --- stores that do not fit each other or the model ---------------------------------------------------

def test_an_eval_store_of_another_tokenizer_is_refused_before_anything_starts(stores, texts, tmp_path, capsys):
    from fastlm.prepare import prepare

    root, _ = texts
    other = prepare([str(root / "wiki.txt")], tmp_path / "other", train_tokenizer=True, vocab_size=300, progress=False)
    with pytest.raises(SystemExit) as exit_:
        run.main(["--train_store", str(stores / "train"), "--eval_store", str(stores / "wiki"), str(other.path),
                  "--config_name", "gpt2-tiny", "--output_dir", str(tmp_path / "out"), *TINY])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"the evaluation store {other.path} was made with another tokenizer than the training store" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_token_ids_beyond_the_models_vocabulary_are_named_before_training(stores, tmp_path, capsys):
    """A store whose ids outrun its tokenizer (written by another tool, or tampered with): the model built
    for the tokenizer has 512 embedding rows, and id 700 would fail inside torch at whichever step drew it."""
    from fastlm.store import StoreWriter, TokenStore

    good = TokenStore.open(stores / "train")
    with StoreWriter(tmp_path / "bad", vocab_size=1024) as writer:
        tokens = np.array(good.tokens[:5000], dtype=np.int64)
        tokens[4321] = 700
        writer.append(tokens, [1000] * 5)
        shutil.copytree(good.tokenizer_dir, writer.path / "tokenizer")
        writer.close({k: v for k, v in good.meta.items() if k in ("special_ids", "tokenizer_fingerprint")})
    with pytest.raises(SystemExit) as exit_:
        run.main(["--train_store", str(tmp_path / "bad"), "--config_name", "gpt2-tiny", "--output_dir",
                  str(tmp_path / "out"), "--max_steps", "1", "--validation_split_percentage", "0", "--block_size", "128", *TINY])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"the training store {tmp_path / 'bad'} holds token id 700, but the model's vocabulary has 512 ids" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
