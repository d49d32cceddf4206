"""The shipped test data: every fixture decompresses to the bytes its licence notes describe."""
import hashlib
import lzma

import pytest

from tests.data import FIXTURES, fixture_path

SUMS = [line.split() for line in (FIXTURES / "SHA256SUMS").read_text().splitlines()]


@pytest.mark.parametrize(("sha256", "name"), SUMS, ids=[name for _, name in SUMS])
def test_each_fixture_decompresses_to_its_recorded_sha256(sha256, name):
    assert hashlib.sha256(lzma.decompress((FIXTURES / f"{name}.xz").read_bytes())).hexdigest() == sha256


def test_every_shipped_file_is_listed_and_the_tokenizer_files_are_served_decompressed():
    assert sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*.xz")) == sorted(f"{n}.xz" for _, n in SUMS)
    assert fixture_path("tokenizers", "gpt2", "merges.txt").read_text().startswith("#version: 0.2")
    with pytest.raises(FileNotFoundError, match="no test fixture"):
        fixture_path("tokenizers", "gpt2", "missing.json")
