"""fastlm.cache and `fastlm cache list|scan|clean`: the runner's prepared-data cache."""
import datetime
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastlm import cache
from fastlm.cli import _size, main
from fastlm.store import StoreWriter, TokenStore
from tests.data import fixture_path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("0123456789abcdef", "0123456789abcd00", "fedcba9876543210")
DAY = 86400


def make_store(path, n_tokens, source):
    """A small store as fastlm.prepare writes one (its meta.json's source and tokenizer_name)."""
    with StoreWriter(path, vocab_size=1000) as writer:
        writer.append(np.arange(n_tokens) % 1000, [n_tokens])
        return writer.close({"source": [str(source)], "tokenizer_name": "gpt2"})


def make_entry(root, key, sources, *, manifest=True, tokenizer="gpt2", last_used=None):
    """An entry with one store per {store name: source file}; n-th store holds 100 * (n + 1) tokens."""
    entry = root / key
    for n, (store, source) in enumerate(sources.items()):
        make_store(entry / store, 100 * (n + 1), source)
    if manifest:
        cache.record(entry, sources=sources, tokenizer=tokenizer)
    if last_used is not None:  # made a day before that
        with cache.using(entry):
            pass
        os.utime(entry / cache.USE_LOCK, (last_used, last_used))
        if manifest:
            made = json.loads((entry / cache.MANIFEST_FILE).read_text())
            (entry / cache.MANIFEST_FILE).write_text(json.dumps({**made, "created": last_used - DAY}))
    return entry


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (data / name).write_text(f"{name}\n")
    return data


@pytest.fixture
def root(tmp_path, files):
    """Three entries: KEYS[0] (train + validation, last used 40 days ago), KEYS[1] (two training
    sources, 2 days ago), KEYS[2] (made before manifests, used now)."""
    root = tmp_path / "stores"
    now = time.time()
    make_entry(root, KEYS[0], {"train": files / "a.txt", "validation": files / "b.txt"}, last_used=now - 40 * DAY)
    make_entry(root, KEYS[1], {"train-0": files / "a.txt", "train-1": files / "c.txt"}, last_used=now - 2 * DAY)
    make_entry(root, KEYS[2], {"train": files / "c.txt"}, manifest=False)
    return root


def listed(root):
    return {e.key: e for e in cache.entries(root)}


def tree(path):
    """Every path under `path` with its bytes (None for a directory): what must stay untouched."""
    return {str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


class Holder:
    """Another process holding `with cache.using(entry)` (or the runner's exclusive preparing lock on
    `<key>.lock`) until stop()."""

    def __init__(self, entry, how="using"):
        hold = (f"cm = cache.using({str(entry)!r})" if how == "using" else
                f"import fcntl; f = open({str(entry) + '.lock'!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX); cm = f")
        code = (f"import sys; from fastlm import cache\n{hold}\n"
                "with cm:\n    print('held', flush=True); sys.stdin.read()")
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, cwd=ROOT)
        assert self.process.stdout.readline() == "held\n"

    def stop(self):
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0


# --- where the cache is ---------------------------------------------------------------------------------

def test_the_root_follows_cache_dir_then_fastlm_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.base_dir() == tmp_path / "home" / ".cache" / "fastlm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.base_dir() == tmp_path / "xdg" / "fastlm"
    monkeypatch.setenv("FASTLM_CACHE", str(tmp_path / "mine"))
    assert cache.base_dir() == tmp_path / "mine"
    assert cache.stores_root() == tmp_path / "mine" / "stores"
    # --cache_dir is the root itself, as the runner uses it.
    assert cache.stores_root(tmp_path / "given") == tmp_path / "given"
    assert cache.stores_root("") == tmp_path / "mine" / "stores"


# --- record and entries -----------------------------------------------------------------------------------

def test_entries_describe_each_entry_from_its_manifest(root, files):
    before = time.time()
    entry = make_entry(root, "aaaaaaaaaaaaaaaa", {"train": files / "a.txt", "validation": files / "b.txt"},
                       tokenizer="roberta-base")
    row = listed(root)["aaaaaaaaaaaaaaaa"]
    assert row.path == entry and row.manifest
    assert row.sources == (str(files / "a.txt"), str(files / "b.txt"))
    assert row.tokenizer == "roberta-base"
    assert row.stores == ("train", "validation") and row.tokens == 100 + 200
    assert before <= row.created <= time.time()
    assert row.last_used == row.created and not row.in_use  # never used by a run since it was made
    # Size on disk, as du counts it: every allocated block of every file and directory below.
    blocks = sum(os.lstat(p).st_blocks for p in entry.rglob("*")) * 512
    assert row.size == blocks > 0
    manifest = json.loads((entry / cache.MANIFEST_FILE).read_text())
    assert manifest["sources"][1] == {"store": "validation", "path": str(files / "b.txt")}
    assert oct((entry / cache.MANIFEST_FILE).stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "train", "validation"]


def test_entries_are_sorted_by_last_use_and_sum_several_sources(root, files):
    rows = cache.entries(root)
    assert [e.key for e in rows] == [KEYS[0], KEYS[1], KEYS[2]]
    several = rows[1]
    assert several.stores == ("train-0", "train-1") and several.tokens == 300
    assert several.sources == (str(files / "a.txt"), str(files / "c.txt"))
    assert rows[0].last_used == pytest.approx(time.time() - 40 * DAY, abs=60)


def test_an_entry_made_before_manifests_lists_from_its_stores_meta(tmp_path, gpt2_tok):
    """Entries the runner made before it wrote manifests: sources and tokenizer from what fastlm.prepare
    recorded in each store's meta.json, created when those were written."""
    from fastlm.prepare import prepare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one line\nanother line\n")
    entry = tmp_path / "stores" / KEYS[0]
    gpt2 = str(fixture_path("tokenizers", "gpt2"))
    prepare([corpus], entry / "train", tokenizer=gpt2, progress=False)
    prepare([corpus], entry / "validation", tokenizer=str(entry / "train" / "tokenizer"), progress=False)
    row = listed(tmp_path / "stores")[KEYS[0]]
    assert not row.manifest
    assert row.sources == (str(corpus.resolve()),)
    assert row.tokenizer == gpt2
    assert row.tokens == 2 * TokenStore.open(entry / "train").n_tokens
    assert row.created == (entry / "train" / "meta.json").stat().st_mtime
    assert row.last_used == row.created


def test_a_dataset_source_is_shown_with_its_config_and_split(tmp_path):
    entry = tmp_path / KEYS[0]
    make_store(entry / "train", 10, "x")
    cache.record(entry, tokenizer="gpt2", sources={
        "train": {"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "train"},
        "validation": {"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "validation"}})
    assert listed(tmp_path)[KEYS[0]].sources == ("wikitext (wikitext-2-raw-v1, train)",
                                                 "wikitext (wikitext-2-raw-v1, validation)")


def test_an_entry_removed_while_listed_is_left_out(root, monkeypatch):
    describe = cache._describe

    def removed_meanwhile(path):
        if path.name == KEYS[1]:
            shutil.rmtree(path)
        return describe(path)

    monkeypatch.setattr(cache, "_describe", removed_meanwhile)
    assert sorted(listed(root)) == [KEYS[0], KEYS[2]]


@pytest.mark.parametrize("sources, error", [
    ({}, TypeError), ("a.txt", TypeError), ({"train": 3}, TypeError),
    ({"weights": "a.txt"}, ValueError), ({"train": {"config": "c"}}, ValueError)])
def test_record_refuses_what_is_not_a_source(tmp_path, sources, error):
    (tmp_path / KEYS[0]).mkdir()
    with pytest.raises(error):
        cache.record(tmp_path / KEYS[0], sources=sources, tokenizer="gpt2")
    assert list((tmp_path / KEYS[0]).iterdir()) == []  # nothing half-written


def test_record_replaces_the_manifest_atomically(root, files, monkeypatch):
    entry = root / KEYS[0]
    before = (entry / cache.MANIFEST_FILE).read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.record(entry, sources={"train": files / "c.txt"}, tokenizer="bert")
    assert (entry / cache.MANIFEST_FILE).read_bytes() == before
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "train", "use.lock", "validation"]


def test_a_missing_root_has_no_entries_and_a_file_is_refused(tmp_path):
    assert cache.entries(tmp_path / "nothing") == [] and cache.ignored(tmp_path / "nothing") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        cache.entries(tmp_path / "file")


def test_what_is_not_an_entry_is_never_listed_nor_touched(root, tmp_path):
    (root / "README.txt").write_text("my notes")
    (root / "datasets").mkdir()
    (root / "datasets" / "x.bin").write_bytes(b"x")
    (root / "aaaaaaaaaaaaaaaa").write_text("a file named like a key")
    foreign = root / "bbbbbbbbbbbbbbbb"  # named like a key, but holds a file fastlm never writes there
    make_store(foreign / "train", 10, "x")
    (foreign / "results.csv").write_text("1,2\n")
    inside = root / "cccccccccccccccc"  # a user's file inside a store directory
    make_store(inside / "train", 10, "x")
    (inside / "train" / "notes.txt").write_text("mine")
    make_entry(tmp_path, "dddddddddddddddd", {"train": "x"})
    (root / "dddddddddddddddd").symlink_to(tmp_path / "dddddddddddddddd")  # a link: never followed
    kept = {name: tree(root / name) for name in ("datasets", "bbbbbbbbbbbbbbbb", "cccccccccccccccc")}
    assert set(listed(root)) == set(KEYS)
    assert [p.name for p in cache.ignored(root)] == [
        "README.txt", "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc", "datasets", "dddddddddddddddd"]
    removed = cache.remove(all=True, root=root)
    assert sorted(r.entry.key for r in removed if r.removed) == sorted(KEYS)
    assert sorted(p.name for p in root.iterdir()) == [
        "README.txt", "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc", "datasets", "dddddddddddddddd"]
    assert (root / "README.txt").read_text() == "my notes"
    assert {name: tree(root / name) for name in kept} == kept
    assert (tmp_path / "dddddddddddddddd" / "train").is_dir()


# --- using: in use, last use ------------------------------------------------------------------------------

def test_using_records_the_last_use_and_makes_a_new_entry(root, tmp_path):
    old = time.time() - 40 * DAY
    with cache.using(root / KEYS[0]) as entry:
        assert entry == root / KEYS[0]
    assert listed(root)[KEYS[0]].last_used == pytest.approx(time.time(), abs=60)
    assert listed(root)[KEYS[0]].last_used > old + DAY
    with cache.using(tmp_path / "new" / KEYS[1]):  # the runner prepares into the entry inside the block
        assert (tmp_path / "new" / KEYS[1]).is_dir()


def test_using_a_cache_it_may_not_write_runs_without_the_lock(root, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(cache.USE_LOCK):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(cache.os, "open", read_only)
    with cache.using(root / KEYS[0]) as entry:
        assert entry == root / KEYS[0]
    monkeypatch.undo()
    assert listed(root)[KEYS[0]].last_used == pytest.approx(time.time() - 40 * DAY, abs=60)  # not recorded


def test_an_entry_another_process_uses_is_listed_in_use_and_never_removed(root):
    holder = Holder(root / KEYS[0])
    try:
        assert listed(root)[KEYS[0]].in_use and not listed(root)[KEYS[1]].in_use
        before = tree(root / KEYS[0])
        removed = {r.entry.key: r for r in cache.remove(all=True, root=root)}
        assert removed[KEYS[0]].skipped == "in use" and not removed[KEYS[0]].removed
        assert removed[KEYS[1]].removed and removed[KEYS[2]].removed
        assert tree(root / KEYS[0]) == before
        assert [e.key for e in cache.entries(root)] == [KEYS[0]]
    finally:
        holder.stop()
    assert not listed(root)[KEYS[0]].in_use
    assert [r.removed for r in cache.remove([KEYS[0]], root=root)] == [True]
    assert cache.entries(root) == []


def test_an_entry_being_prepared_is_in_use(root):
    """The runner's exclusive lock on <key>.lock while it prepares the entry."""
    holder = Holder(root / KEYS[1], how="preparing")
    try:
        assert listed(root)[KEYS[1]].in_use
        assert [r.skipped for r in cache.remove([KEYS[1]], root=root)] == ["in use"]
    finally:
        holder.stop()
    assert [r.removed for r in cache.remove([KEYS[1]], root=root)] == [True]
    assert not (root / (KEYS[1] + ".lock")).exists()  # its lock file goes with it


def test_using_waits_out_a_removal_and_makes_the_entry_again(root):
    """A run that starts while clean removes its entry waits for the removal, then holds a new entry,
    never the directory that was renamed away."""
    entry = root / KEYS[0]
    held = cache._try_exclusive(entry / cache.USE_LOCK)  # what _remove_entry holds while it deletes
    inside = threading.Event()

    def run():
        with cache.using(entry):
            inside.set()
            time.sleep(0.5)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert not inside.wait(0.5)  # blocked by the removal's lock
        os.rename(entry, root / f".{KEYS[0]}.removing-0000")
        cache._rmtree(root / f".{KEYS[0]}.removing-0000")
    finally:
        os.close(held)
    assert inside.wait(10)
    assert listed(root)[KEYS[0]].in_use and listed(root)[KEYS[0]].stores == ()
    thread.join()


# --- remove ---------------------------------------------------------------------------------------------

def test_remove_by_key_or_a_unique_start_of_one(root):
    assert [r.entry.key for r in cache.remove(["fedc"], root=root)] == [KEYS[2]]
    with pytest.raises(ValueError, match="start of 2 keys"):
        cache.remove(["0123456789abcd"], root=root)
    with pytest.raises(ValueError, match="no cache entry 'ffff'"):
        cache.remove(["ffff"], root=root)
    assert [r.removed for r in cache.remove([KEYS[0].upper(), KEYS[0]], root=root)] == [True]
    assert list(listed(root)) == [KEYS[1]]


@pytest.mark.parametrize("age", ["30d", "4w", 30 * DAY, datetime.timedelta(days=30)])
def test_remove_older_than_takes_the_last_use(root, age):
    assert [r.entry.key for r in cache.remove(older_than=age, root=root)] == [KEYS[0]]
    assert sorted(listed(root)) == [KEYS[1], KEYS[2]]


def test_remove_older_than_an_hour_keeps_what_was_used_since(root):
    assert sorted(r.entry.key for r in cache.remove(older_than="1h", root=root)) == sorted(KEYS[:2])
    assert list(listed(root)) == [KEYS[2]]


def test_remove_by_source_file_directory_or_dataset(root, files, tmp_path, monkeypatch):
    assert [r.entry.key for r in cache.remove(source=files / "b.txt", root=root, dry_run=True)] == [KEYS[0]]
    from_c = cache.remove(source=files / "c.txt", root=root, dry_run=True)
    assert sorted(r.entry.key for r in from_c) == [KEYS[1], KEYS[2]]
    assert len(cache.remove(source=files, root=root, dry_run=True)) == 3
    assert cache.remove(source=tmp_path / "other", root=root, dry_run=True) == []
    entry = root / "aaaaaaaaaaaaaaaa"
    make_store(entry / "train", 10, "x")
    cache.record(entry, sources={"train": {"dataset": "wikitext", "config": None, "split": "train"}}, tokenizer="t")
    assert [r.entry.key for r in cache.remove(source="wikitext", root=root)] == ["aaaaaaaaaaaaaaaa"]
    # Relative paths are taken from the working directory, as on the command line.
    monkeypatch.chdir(files)
    assert [r.entry.key for r in cache.remove(source="b.txt", root=root)] == [KEYS[0]]


def test_criteria_together_must_all_hold(root, files):
    assert [r.entry.key for r in cache.remove(older_than="1d", source=files / "c.txt", root=root)] == [KEYS[1]]
    assert [r.entry.key for r in cache.remove([KEYS[0], KEYS[2]], older_than="1d", root=root)] == [KEYS[0]]
    assert list(listed(root)) == [KEYS[2]]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "say what to remove"), ({"all": True, "keys": [KEYS[0]]}, "give it alone"),
    ({"all": True, "older_than": "1d"}, "give it alone"), ({"older_than": "30"}, "not an age"),
    ({"older_than": "-1d"}, "not an age"), ({"older_than": -5}, "older_than must be"),
    ({"older_than": True}, "older_than must be")])
def test_remove_refuses_unclear_requests_and_changes_nothing(root, kwargs, message):
    before = tree(root)
    with pytest.raises(ValueError, match=message):
        cache.remove(root=root, **kwargs)
    assert tree(root) == before


def test_a_dry_run_changes_nothing(root):
    before = tree(root)
    plan = cache.remove(all=True, root=root, dry_run=True)
    assert [(r.entry.key, r.removed) for r in plan] == [(k, True) for k in KEYS]
    assert tree(root) == before


def test_removal_is_atomic_per_entry(root, monkeypatch):
    """The entry leaves the cache in one rename; a removal killed while deleting leaves a hidden
    directory no run or listing sees, which the next remove deletes."""
    renamed = []
    real_rename = os.rename

    def rename(src, dst):
        renamed.append((Path(src).name, Path(dst).name))
        real_rename(src, dst)

    def killed(path):
        assert not (root / KEYS[0]).exists() and path.is_dir()  # renamed before any file is deleted
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.os, "rename", rename)
    monkeypatch.setattr(cache, "_rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.remove([KEYS[0]], root=root)
    assert renamed[0][0] == KEYS[0] and renamed[0][1].startswith(f".{KEYS[0]}.removing-")
    trash = root / renamed[0][1]
    assert trash.is_dir() and KEYS[0] not in listed(root) and cache.ignored(root) == []
    monkeypatch.undo()
    cache.remove([KEYS[1]], root=root)
    assert not trash.exists() and list(listed(root)) == [KEYS[2]]


def test_parse_age():
    assert [cache.parse_age(a) for a in ("45s", "90m", "12h", "30d", "2w", "1.5d")] == \
        [45, 5400, 43200, 30 * DAY, 14 * DAY, 1.5 * DAY]
    for bad in ("30", "d", "30y", "3 0d", ""):
        with pytest.raises(ValueError, match="not an age"):
            cache.parse_age(bad)


# --- the command ----------------------------------------------------------------------------------------

def test_cache_list_prints_a_table_and_the_total(root, capsys):
    (root / "notes.txt").write_text("x")
    (root / "mine").mkdir()
    assert main(["cache", "list", "--cache-dir", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "TOKENS", "SIZE", "LAST", "USED", "CREATED", "TOKENIZER", "SOURCES"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert set(rows) == set(KEYS)
    assert " 300 " in rows[KEYS[0]] and "40 days ago" in rows[KEYS[0]] and "a.txt, " in rows[KEYS[0]]
    assert "2 days ago" in rows[KEYS[1]]
    total = sum(e.size for e in cache.entries(root))
    assert lines[4] == f"3 entries, 700 tokens, {_size(total)} in {root}" and _size(total).endswith(" kB")
    assert lines[5] == "left alone (not cache entries): mine/, notes.txt"


def test_cache_scan_is_list_and_json_is_the_entries(root, capsys, monkeypatch):
    monkeypatch.setenv("FASTLM_CACHE", str(root.parent))
    assert main(["cache", "scan", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [e.as_json() for e in cache.entries(root)]
    assert rows[0]["key"] == KEYS[0] and rows[0]["tokens"] == 300 and isinstance(rows[0]["size"], int)
    assert rows[0]["stores"] == ["train", "validation"] and rows[0]["in_use"] is False
    assert datetime.datetime.strptime(rows[0]["created"], "%Y-%m-%dT%H:%M:%SZ")


def test_cache_list_of_an_empty_cache(tmp_path, capsys):
    assert main(["cache", "list", "--cache-dir", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out == f"no cache entries in {tmp_path / 'none'}\n"
    assert main(["cache", "list", "--json", "--cache-dir", str(tmp_path / "none")]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cache_clean_is_a_dry_run_without_yes(root, capsys):
    before = tree(root)
    assert main(["cache", "clean", "--older-than", "1d", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in out[:2]] == [["would", "remove", KEYS[0]], ["would", "remove", KEYS[1]]]
    assert out[2].startswith("dry run: 2 entries, ") and out[2].endswith("would be freed; add --yes to remove")
    assert tree(root) == before


def test_cache_clean_yes_removes_and_says_what_it_kept(root, capsys):
    holder = Holder(root / KEYS[0])
    try:
        assert main(["cache", "clean", "--all", "--yes", "--cache-dir", str(root)]) == 0
    finally:
        holder.stop()
    out = capsys.readouterr().out.splitlines()
    said = {line.split()[1]: line for line in out[:3]}
    assert said[KEYS[0]].startswith(f"kept {KEYS[0]} ") and said[KEYS[0]].endswith("(in use by a running process)")
    assert said[KEYS[1]].startswith(f"removed {KEYS[1]} ") and said[KEYS[2]].startswith(f"removed {KEYS[2]} ")
    assert out[3].startswith("removed 2 entries, ") and out[3].endswith(" freed")
    assert list(listed(root)) == [KEYS[0]]


def test_cache_clean_asks_on_a_terminal(root, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "n")
    assert main(["cache", "clean", KEYS[2], "--cache-dir", str(root)]) == 0
    assert asked[0].startswith("remove 1 entry, ") and asked[0].endswith("? [y/N] ")
    assert "nothing removed" in capsys.readouterr().out and KEYS[2] in listed(root)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["cache", "clean", KEYS[2], "--cache-dir", str(root)]) == 0
    assert "removed 1 entry, " in capsys.readouterr().out and KEYS[2] not in listed(root)


def test_cache_clean_with_nothing_chosen_says_so(root, capsys):
    assert main(["cache", "clean", "--older-than", "90d", "--cache-dir", str(root)]) == 0
    assert capsys.readouterr().out == f"nothing to remove in {root}\n"
    holder = Holder(root / KEYS[2])
    try:
        assert main(["cache", "clean", KEYS[2], "--cache-dir", str(root)]) == 0
    finally:
        holder.stop()
    assert capsys.readouterr().out.splitlines()[-1] == "nothing to remove: every entry chosen is in use"


@pytest.mark.parametrize("argv, message", [
    ([], "say what to remove: KEY..., --older-than AGE, --source PATH or --all"),
    (["--all", KEYS[0]], "--all removes every entry: give it alone"),
    (["--older-than", "30x"], "'30x' is not an age such as 30d"),
    (["ffff"], "no cache entry 'ffff'")])
def test_cache_clean_errors_are_one_line_and_exit_2(root, capsys, argv, message):
    before = tree(root)
    assert main(["cache", "clean", *argv, "--yes", "--cache-dir", str(root)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"fastlm cache clean: error: {message}")
    assert captured.err.count("\n") == 1
    assert tree(root) == before


def test_the_command_runs_as_a_process(root):
    done = subprocess.run([sys.executable, "-m", "fastlm.cli", "cache", "clean", "--all", "--cache-dir", str(root)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "dry run: 3 entries" in done.stdout
    assert len(cache.entries(root)) == 3
