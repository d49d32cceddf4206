"""fastlm.parallel and prepare in processes: slices cut at document boundaries, stores identical byte for
byte whatever num_proc is and across shards + merge, worker errors reported once with file and line."""
import gzip
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm import parallel
from fastlm.prepare import prepare
from fastlm.store import merge_stores
from tests.data import wikitext_lines

prepare_module = sys.modules["fastlm.prepare"]


def store_files(path):
    """{relative path: bytes} of every file in a store, meta.json as parsed JSON."""
    files = {}
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            name = str(file.relative_to(path))
            files[name] = json.loads(file.read_text()) if name == "meta.json" else file.read_bytes()
    return files


def without_run_details(meta):
    """meta.json less what describes the run rather than the store: how it was split, how long it took."""
    meta = dict(meta, args={k: v for k, v in meta["args"].items() if k not in ("num_proc", "shard", "merged_from")})
    meta.pop("encoding", None)
    meta.pop("source", None)
    return meta


def assert_same_store(a, b):
    files_a, files_b = store_files(a), store_files(b)
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        if name == "meta.json":
            assert files_a[name]["checksums"] == files_b[name]["checksums"]
            assert without_run_details(files_a[name]) == without_run_details(files_b[name])
        else:
            assert files_a[name] == files_b[name], name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two plain text files (one large enough to be cut in many slices), a gzip and a jsonl file."""
    root = tmp_path_factory.mktemp("corpus")
    lines = [row if row else " \n" for row in wikitext_lines("valid")[:1200]]
    (root / "a.txt").write_text("".join(lines[:900]) + "naïve café 😀 " * 50 + "\n", encoding="utf-8")
    with gzip.open(root / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("".join(lines[900:1000]))
    (root / "c.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines[1000:1100]), encoding="utf-8")
    (root / "d.txt").write_text("".join(lines[1100:]), encoding="utf-8")
    return [root / "a.txt", root / "b.txt.gz", root / "c.jsonl", root / "d.txt"]


@pytest.fixture
def small_slices(monkeypatch):
    # Slices of ~4 KB: a few hundred lines of WikiText make many slices per worker.
    monkeypatch.setattr(prepare_module, "_BATCH_BYTES", 4096)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus, gpt2_tok):
    out = tmp_path_factory.mktemp("one") / "s"
    return prepare(corpus, out, tokenizer=gpt2_tok, append_eos=True, progress=False).path


@pytest.mark.parametrize("num_proc", [2, 3])
def test_the_store_is_the_same_byte_for_byte_whatever_num_proc(tmp_path, corpus, gpt2_tok, one_process, small_slices,
                                                              num_proc):
    store = prepare(corpus, tmp_path / "s", tokenizer=gpt2_tok, append_eos=True, num_proc=num_proc, progress=False)
    assert_same_store(store.path, one_process)
    assert store.meta["args"]["num_proc"] == num_proc
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no parts or temporary directories left


def test_four_shards_merged_equal_one_process(tmp_path, corpus, gpt2_tok, one_process, small_slices):
    shards = [prepare(corpus, tmp_path / f"shard{i}", tokenizer=gpt2_tok, append_eos=True, shard=(i, 4), num_proc=2,
                      progress=False) for i in range(4)]
    assert all(len(shard) for shard in shards)
    merged = merge_stores(shards, tmp_path / "merged")
    assert_same_store(merged.path, one_process)
    # The large first file is split between shards; merged, each file is named once, in order.
    assert shards[0].meta["source"] == shards[1].meta["source"] == [str(corpus[0].resolve())]
    assert merged.meta["source"] == [str(path.resolve()) for path in corpus]
    assert shards[2].meta["args"]["shard"] == "2/4"


def test_paragraphs_are_cut_only_between_paragraphs(tmp_path, gpt2_tok, small_slices):
    text = "".join(f"paragraph {i} line one\nline two of {i}\n\n" + "\n" * (i % 3) for i in range(400))
    path = tmp_path / "p.txt"
    path.write_text(text, encoding="utf-8")
    one = prepare([path], tmp_path / "one", tokenizer=gpt2_tok, doc_boundary="paragraph", progress=False)
    two = prepare([path], tmp_path / "two", tokenizer=gpt2_tok, doc_boundary="paragraph", num_proc=2, progress=False)
    assert len(one) == 400
    assert_same_store(two.path, one.path)


def test_a_dataset_is_cut_by_rows(tmp_path, gpt2_tok, small_slices, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(prepare_module, "_BATCH_ROWS", 50)
    rows = [row for row in wikitext_lines("valid")[:600]]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "saved"))
    kwargs = dict(tokenizer=gpt2_tok, dataset_name=str(tmp_path / "saved"), progress=False)
    one = prepare([], tmp_path / "one", **kwargs)
    two = prepare([], tmp_path / "two", num_proc=2, **kwargs)
    assert_same_store(two.path, one.path)


def test_invalid_utf8_in_a_worker_names_file_and_line_once(tmp_path, gpt2_tok, small_slices):
    lines = [f"line {i} of a long file\n".encode() for i in range(3000)]
    lines[2500] = b"broken \xff byte\n"
    path = tmp_path / "bad.txt"
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=r"bad.txt, line 2501: invalid UTF-8") as error:
        prepare([path], tmp_path / "s", tokenizer=gpt2_tok, num_proc=2, progress=False)
    assert str(error.value).count("invalid UTF-8") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["bad.txt"]


def test_a_corrupt_gzip_among_the_inputs_stops_the_run(tmp_path, gpt2_tok, corpus, small_slices):
    data = gzip.compress(b"fine text\n" * 5000)
    (tmp_path / "z.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"z.txt.gz: corrupt or truncated .gz data"):
        prepare([corpus[0], tmp_path / "z.txt.gz", corpus[3]], tmp_path / "s", tokenizer=gpt2_tok, num_proc=2,
                progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["z.txt.gz"]


@pytest.mark.parametrize("shard, message", [((4, 4), "shard"), ((0, 0), "shard"), ((-1, 2), "shard"), ("1/2", "shard")])
def test_bad_shards_are_refused(tmp_path, gpt2_tok, corpus, shard, message):
    with pytest.raises(ValueError, match=message):
        prepare(corpus, tmp_path / "s", tokenizer=gpt2_tok, shard=shard, progress=False)


def test_a_trained_tokenizer_cannot_be_sharded(tmp_path, corpus):
    with pytest.raises(ValueError, match="trained on each shard"):
        prepare(corpus, tmp_path / "s", train_tokenizer=True, vocab_size=300, shard=(0, 2), progress=False)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab\n", max_size=300),
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    parts=st.integers(1, 9),
    count=st.integers(1, 5),
    marker=st.sampled_from([b"\n", b"\n\n"]),
)
def test_plan_cuts_only_at_document_starts_and_shards_tile_the_input(tmp_path_factory, text, sizes, parts, count, marker):
    root = tmp_path_factory.mktemp("plan")
    data = text.encode()
    sources = [parallel.text_lines(_write(root / "t.txt", data), marker), *map(parallel.whole, sizes)]
    whole = parallel.plan(sources, 1)
    assert whole == [parallel.Slice(i, 0, s.size) for i, s in enumerate(sources) if s.size]
    tiles = [piece for index in range(count) for piece in parallel.plan(sources, parts, (index, count))]
    # In order, without gaps or overlaps, and every cut inside the text file at a document start.
    covered = {}
    for piece in tiles:
        assert piece.start == covered.get(piece.source, 0)
        covered[piece.source] = piece.stop
        if piece.source == 0 and piece.start:
            assert data[: piece.start].endswith(marker)
    assert covered == {i: s.size for i, s in enumerate(sources) if s.size}
    assert [piece.source for piece in tiles] == sorted(piece.source for piece in tiles)
    for i in range(1, len(sources)):  # whole sources are never cut
        assert [piece for piece in tiles if piece.source == i] in ([], [parallel.Slice(i, 0, sizes[i - 1])])


def _write(path, data):
    path.write_bytes(data)
    return path


def test_more_shards_than_documents_gives_empty_stores_that_merge(tmp_path, gpt2_tok):
    path = tmp_path / "tiny.txt"
    path.write_text("one line\nanother line\nthird\n", encoding="utf-8")
    shards = [prepare([path], tmp_path / f"s{i}", tokenizer=gpt2_tok, shard=(i, 8), progress=False) for i in range(8)]
    assert sorted(len(shard) for shard in shards) == [0] * 5 + [1] * 3
    one = prepare([path], tmp_path / "one", tokenizer=gpt2_tok, progress=False)
    assert_same_store(merge_stores(shards, tmp_path / "merged").path, one.path)


INTERRUPT_MIDWAY = """
import sys
from fastlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_a_run_in_processes_leaves_nothing(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.data import fixture_path

    path = tmp_path / "in" / "big.txt"
    path.parent.mkdir()
    path.write_text("".join(wikitext_lines("valid")) * 8, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPT_MIDWAY, "prepare", str(path), "-o", str(out / "s"), "--tokenizer",
         str(fixture_path("tokenizers", "gpt2")), "--num-proc", "2", "--no-progress", "--encoder", "hf"],
        env=env, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob(".s.tmp-*/parts/*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before its workers wrote a part"
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C does: the whole foreground process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert stderr.decode().count("KeyboardInterrupt") <= 1  # the parent's only, not one per worker
    assert list(out.iterdir()) == []


def _die(reading, encoding, piece, writer, advance=None):
    import os

    os._exit(1)  # as a worker killed for memory


def test_a_worker_that_dies_stops_the_run_and_leaves_nothing(tmp_path, gpt2_tok, corpus, small_slices, monkeypatch):
    monkeypatch.setattr(prepare_module, "_write_slice", _die)  # the forked workers inherit it
    with pytest.raises(RuntimeError, match="worker process died"):
        prepare(corpus, tmp_path / "s", tokenizer=gpt2_tok, num_proc=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_jsonl_file_is_cut_by_rows_and_errors_name_the_files_row(tmp_path, gpt2_tok, small_slices):
    rows = [{"id": i, "text": f"row {i} of a large JSON-lines file\n"} for i in range(2000)]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    one = prepare([path], tmp_path / "one", tokenizer=gpt2_tok, progress=False)
    two = prepare([path], tmp_path / "two", tokenizer=gpt2_tok, num_proc=2, progress=False)
    assert len(one) == 2000
    assert_same_store(two.path, one.path)
    rows[1700] = {"id": 1700, "body": "no text here"}
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(ValueError, match=r"big.jsonl, row 1700: no text column 'text' \(columns: 'id', 'body'\)"):
        prepare([path], tmp_path / "bad", tokenizer=gpt2_tok, num_proc=2, progress=False)
