"""Paths and loaders for the data tests and benchmarks read, shipped in tests/fixtures (see its README)."""
import atexit
import functools
import lzma
import shutil
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@functools.cache
def _tokenizers_dir():
    """The xz-compressed tokenizer files, decompressed once per process into a temporary directory
    (tokenizers and `fastlm prepare --tokenizer DIR` read plain files)."""
    root = Path(tempfile.mkdtemp(prefix="fastlm-test-tokenizers-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for packed in (FIXTURES / "tokenizers").rglob("*.xz"):
        plain = root / packed.relative_to(FIXTURES).with_suffix("")
        plain.parent.mkdir(parents=True, exist_ok=True)
        with lzma.open(packed) as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def fixture_path(*parts):
    """A fixture file or folder: WikiText-2 as shipped (`.xz`), tokenizer files and folders decompressed."""
    path = (_tokenizers_dir() if parts[0] == "tokenizers" else FIXTURES).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"no test fixture {'/'.join(parts)} (tests/fixtures/README.md lists them)")
    return path


def wikitext_lines(split):
    """WikiText-2 raw rows as the HF dataset has them: blank lines become "", others keep their newline."""
    with lzma.open(fixture_path("wikitext-2-raw", f"wiki.{split}.raw.xz"), "rt", encoding="utf-8") as f:
        return ["" if line.strip() == "" else line for line in f]


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    # vocab=/merges= paths: the old vocab_file= keyword silently builds an empty tokenizer in transformers 5.
    return GPT2TokenizerFast(
        vocab=str(fixture_path("tokenizers", "gpt2", "vocab.json")),
        merges=str(fixture_path("tokenizers", "gpt2", "merges.txt")),
    )


def roberta_tokenizer():
    from transformers import RobertaTokenizerFast

    return RobertaTokenizerFast(
        vocab=str(fixture_path("tokenizers", "roberta", "vocab.json")),
        merges=str(fixture_path("tokenizers", "roberta", "merges.txt")),
    )


def bert_tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=str(fixture_path("tokenizers", "bert-base-uncased", "vocab.txt")))
