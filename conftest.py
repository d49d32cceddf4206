"""Session fixtures shared by tests/ and benchmarks/. Nothing here may reach the hub."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _private_store_cache(tmp_path_factory):
    """The runner prepares text into a user cache shared by all runs (~/.cache/fastlm): the tests' stores go
    to a cache of their own (subprocesses inherit it)."""
    os.environ["FASTLM_CACHE"] = str(tmp_path_factory.mktemp("fastlm_cache"))


@pytest.fixture(scope="session")
def gpt2_tok():
    from tests.data import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def roberta_tok():
    from tests.data import roberta_tokenizer

    return roberta_tokenizer()


@pytest.fixture(scope="session")
def bert_tok():
    from tests.data import bert_tokenizer

    return bert_tokenizer()
