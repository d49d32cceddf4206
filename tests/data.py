"""Paths and loaders for the offline data beside the checkout (../shared/data), for tests and benchmarks."""
import lzma
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts):
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"offline data not found at {path} (expected ../shared/data beside the checkout)")
    return path


def wikitext_lines(split):
    """WikiText-2 raw rows as the HF dataset has them: blank lines become "", others keep their newline."""
    with lzma.open(shared_path("wikitext-2-raw", f"wiki.{split}.raw.xz"), "rt", encoding="utf-8") as f:
        return ["" if line.strip() == "" else line for line in f]


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    # vocab=/merges= paths: the old vocab_file= keyword silently builds an empty tokenizer in transformers 5.
    return GPT2TokenizerFast(
        vocab=str(shared_path("tokenizers", "gpt2", "vocab.json")),
        merges=str(shared_path("tokenizers", "gpt2", "merges.txt")),
    )


def roberta_tokenizer():
    from transformers import RobertaTokenizerFast

    return RobertaTokenizerFast(
        vocab=str(shared_path("tokenizers", "roberta", "vocab.json")),
        merges=str(shared_path("tokenizers", "roberta", "merges.txt")),
    )


def bert_tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=str(shared_path("tokenizers", "bert-base-uncased", "vocab.txt")))
