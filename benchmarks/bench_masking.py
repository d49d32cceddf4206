"""Masking benchmarks: the fastlm kernel vs transformers' torch_mask_tokens, and the collators end to end.

Data: WikiText-2 validation (tests/fixtures), RoBERTa tokenizer, at 8x128 and 64x512.
- "mask": the same int64 tensors, each side with its persistent generator (HF: torch.Generator; fastlm:
  numpy PCG64). HF given the special_tokens_mask tensor (its fast path), and without it (the tutorial's
  path: its dataset has none, so HF builds it with the tokenizer). "fastlm keyed" is the call a
  training loop makes: a fresh PCG64([batch_index, epoch, seed]) stream per batch.
- "collate": feature lists (input_ids + attention_mask, as the tutorial's dataset holds them) to tensors;
  fastlm keyed (seed=0: a PCG64 per batch from [batch, epoch, seed]) and with the default seed=None (the
  stream drawn from torch's global RNG).
- "whole-word": features of 64 paragraphs padded to 512 (HF needs their offset_mapping) to tensors.

    make bench     # or: .venv/bin/python -m pytest benchmarks/bench_masking.py --benchmark-only
"""
import numpy as np
import pytest

from fastlm import DataCollatorForMLM, Masker
from fastlm.packing import IGNORE_INDEX
from tests.data import wikitext_lines

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPES = [(8, 128), (64, 512)]


@pytest.fixture(scope="module")
def stream(roberta_tok):
    """The WikiText-2 validation tokens as one stream (no specials), enough for 64x512 blocks."""
    ids = roberta_tok(wikitext_lines("valid")[:1500], add_special_tokens=False)["input_ids"]
    return np.fromiter((t for row in ids for t in row), dtype=np.int64)


def blocks(stream, roberta_tok, rows, length):
    """group_texts-style blocks framed as the tokenizer frames a sequence: <s> ... </s>."""
    body = stream[: rows * (length - 2)].reshape(rows, length - 2)
    ids = np.empty((rows, length), dtype=np.int64)
    ids[:, 0], ids[:, -1], ids[:, 1:-1] = roberta_tok.cls_token_id, roberta_tok.sep_token_id, body
    return ids


@pytest.fixture(scope="module")
def tensors(stream, roberta_tok):
    out = {}
    for rows, length in SHAPES:
        ids = torch.from_numpy(blocks(stream, roberta_tok, rows, length))
        special = torch.zeros_like(ids)
        special[:, 0] = special[:, -1] = 1
        out[rows, length] = ids, special, torch.ones_like(ids)
    return out


@pytest.fixture(scope="module")
def features(stream, roberta_tok):
    out = {}
    for rows, length in SHAPES:
        ids = blocks(stream, roberta_tok, rows, length).tolist()
        out[rows, length] = [{"input_ids": row, "attention_mask": [1] * length} for row in ids]
    return out


@pytest.fixture(scope="module")
def word_features(roberta_tok):
    """64 whole paragraphs padded / truncated to 512 tokens, with the offset_mapping HF's whole-word
    masking needs (it cannot pad offsets itself, hence padding at tokenization)."""
    lines = [line for line in wikitext_lines("valid") if len(line) > 400][:64]
    enc = roberta_tok(lines, truncation=True, padding="max_length", max_length=512, return_offsets_mapping=True)
    return [{k: enc[k][i] for k in ("input_ids", "attention_mask", "offset_mapping")} for i in range(len(lines))]


def _throughput(benchmark, n_tokens):
    benchmark.extra_info["tokens"] = n_tokens
    if benchmark.stats:
        benchmark.extra_info["Mtokens_per_s"] = round(n_tokens / benchmark.stats.stats.median / 1e6, 2)


def _check_masks(labels, ids):
    targets = labels != IGNORE_INDEX
    assert 0.10 < float(targets.float().mean()) < 0.20
    assert torch.equal(labels[targets], ids[targets])


# --- the masking kernel vs torch_mask_tokens on the same tensors -----------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def bench_mask_hf_torch_mask_tokens(benchmark, tensors, roberta_tok, shape):
    benchmark.group = f"mask {shape[0]}x{shape[1]}"
    ids, special, _ = tensors[shape]
    collator = transformers.DataCollatorForLanguageModeling(roberta_tok, mlm_probability=0.15, seed=0)
    collator.create_rng("pt")
    _, labels = benchmark(lambda: collator.torch_mask_tokens(ids.clone(), special_tokens_mask=special))
    _check_masks(labels, ids)
    _throughput(benchmark, ids.numel())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def bench_mask_hf_torch_mask_tokens_tutorial(benchmark, tensors, roberta_tok, shape):
    """The tutorial's path: its dataset has no special_tokens_mask, so HF asks the tokenizer per row."""
    benchmark.group = f"mask {shape[0]}x{shape[1]}"
    ids, _, _ = tensors[shape]
    collator = transformers.DataCollatorForLanguageModeling(roberta_tok, mlm_probability=0.15, seed=0)
    collator.create_rng("pt")
    _, labels = benchmark(lambda: collator.torch_mask_tokens(ids.clone()))
    _check_masks(labels, ids)
    _throughput(benchmark, ids.numel())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def bench_mask_fastlm(benchmark, tensors, roberta_tok, shape):
    benchmark.group = f"mask {shape[0]}x{shape[1]}"
    ids, _, attention = tensors[shape]
    masker = Masker.from_tokenizer(roberta_tok, mlm_probability=0.15)
    rng = np.random.Generator(np.random.PCG64(0))
    _, labels = benchmark(masker.mask_with, ids, attention, rng)
    _check_masks(labels, ids)
    _throughput(benchmark, ids.numel())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def bench_mask_fastlm_keyed(benchmark, tensors, roberta_tok, shape):
    benchmark.group = f"mask {shape[0]}x{shape[1]}"
    ids, _, attention = tensors[shape]
    masker = Masker.from_tokenizer(roberta_tok, mlm_probability=0.15, seed=0)
    _, labels = benchmark(masker, ids, attention, epoch=0, batch_index=12345)
    _check_masks(labels, ids)
    _throughput(benchmark, ids.numel())


# --- collators from feature lists ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def bench_collate_hf(benchmark, features, roberta_tok, shape):
    benchmark.group = f"collate {shape[0]}x{shape[1]}"
    collator = transformers.DataCollatorForLanguageModeling(roberta_tok, mlm_probability=0.15, seed=0)
    batch = benchmark(collator, features[shape])
    _check_masks(batch["labels"], torch.tensor([f["input_ids"] for f in features[shape]]))
    _throughput(benchmark, shape[0] * shape[1])


@pytest.mark.parametrize("seed", [0, None], ids=["keyed", "global-rng"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def bench_collate_fastlm(benchmark, features, roberta_tok, shape, seed):
    benchmark.group = f"collate {shape[0]}x{shape[1]}"
    collator = DataCollatorForMLM(roberta_tok, mlm_probability=0.15, seed=seed)
    batch = benchmark(collator, features[shape])
    _check_masks(batch["labels"], torch.tensor([f["input_ids"] for f in features[shape]]))
    _throughput(benchmark, shape[0] * shape[1])


# --- whole-word masking ------------------------------------------------------------------------------------

def _n_tokens(word_features):
    return sum(len(f["input_ids"]) for f in word_features)


@pytest.mark.benchmark(group="whole-word collate 64x512")
@pytest.mark.filterwarnings("ignore:Random token replacement is not supported")
def bench_whole_word_hf(benchmark, word_features, roberta_tok):
    # Both mask every token of a selected word (HF forces mask_replace_prob=1 with a warning; fastlm by default).
    collator = transformers.DataCollatorForLanguageModeling(roberta_tok, whole_word_mask=True, seed=0)
    batch = benchmark(collator, word_features)
    assert (batch["labels"] != IGNORE_INDEX).any()
    _throughput(benchmark, _n_tokens(word_features))


@pytest.mark.benchmark(group="whole-word collate 64x512")
def bench_whole_word_fastlm(benchmark, word_features, roberta_tok):
    collator = DataCollatorForMLM(roberta_tok, whole_word_mask=True, seed=0)
    batch = benchmark(collator, word_features)
    assert (batch["labels"] != IGNORE_INDEX).any()
    _throughput(benchmark, _n_tokens(word_features))
