"""The prepared-data cache: where the runner keeps the stores it tokenises once per source, what each
entry was prepared from, when a run last used it, and removing the entries no run is using.

Layout under the root (``stores_root()``)::

    <key>/              one entry: 16 hex digits, a hash of the sources, tokenizer and settings
        train/          token stores (fastlm.store), or train-0, train-1, ... for several sources;
        validation/     validation, or validation-0, ... likewise
        manifest.json   what the entry was prepared from (record); older entries have none, and list
                        falls back to the stores' meta.json
        use.lock        shared-locked by every run that uses the entry (using); its mtime is the last use
    <key>.lock          exclusive-locked by the run preparing the entry

``remove`` takes both locks without waiting, so an entry being prepared or used is skipped, never
removed; it renames an entry to a hidden name before deleting it, so no run ever sees half an entry.
Nothing else in the root is touched: only a directory whose name is a key and which holds nothing but
the files above is an entry.
"""
import contextlib
import datetime
import errno
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastlm.store import FORMAT as STORE_FORMAT
from fastlm.store import META_FILE, STORE_ENTRIES

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "fastlm-cache-entry"
MANIFEST_VERSION = 1
USE_LOCK = "use.lock"

_KEY = re.compile(r"[0-9a-f]{16}")
_STORE_NAME = re.compile(r"(train|validation)(-\d+)?")
# What an entry may hold besides its stores: the files above, their temporary names while written
# (StoreWriter's .<store>.tmp-*/.old-*, the manifest's .manifest.json.*), and the marker files the
# runner leaves for a moment to find which ranks share the cache (fastlm.train.dist._MARKER).
_ENTRY_EXTRAS = re.compile(
    r"manifest\.json|use\.lock|\.manifest\.json\.\w+|\.(train|validation)(-\d+)?\.(tmp|old)-\w+"
    r"|\.fastlm-who-shares-[0-9a-f]+-rank\d+")
# An entry renamed away by remove, before or while it is deleted (a killed clean leaves it behind).
_TRASH = re.compile(r"\.([0-9a-f]{16})\.removing-[0-9a-f]+")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# --- where the cache is --------------------------------------------------------------------------------

def base_dir():
    """fastlm's user cache directory: $FASTLM_CACHE, else $XDG_CACHE_HOME/fastlm, else ~/.cache/fastlm."""
    base = os.environ.get("FASTLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlm"
    return Path(base)


def stores_root(cache_dir=None):
    """Where prepared stores live: ``cache_dir`` (the runner's --cache_dir) when given, else one user
    cache shared by every run (like datasets' cache), ``<base_dir()>/stores``."""
    return Path(cache_dir) if cache_dir else base_dir() / "stores"


# --- what the runner calls ------------------------------------------------------------------------------

def record(entry, *, sources, tokenizer):
    """Write ``entry``'s manifest (atomically), after the runner has prepared its stores now.

    sources: {store name: source}, a source being a file path or ``{"dataset": name, "config": name or
    None, "split": name}``; tokenizer: what the stores were tokenised with (a name, path or description).
    """
    entry = Path(entry)
    if not isinstance(sources, dict) or not sources:
        raise TypeError("sources must be a non-empty dict {store name: path or dataset dict}")
    listed = []
    for store, source in sources.items():
        if not (isinstance(store, str) and _STORE_NAME.fullmatch(store)):
            raise ValueError(f"{store!r} is not a cache store name (train, validation, train-0, ...)")
        if isinstance(source, dict):
            if not isinstance(source.get("dataset"), str):
                raise ValueError(f"store {store}: a dataset source needs a 'dataset' name, got {source!r}")
            listed.append({"store": store, "dataset": source["dataset"], "config": source.get("config"),
                           "split": source.get("split")})
        elif isinstance(source, (str, os.PathLike)):
            listed.append({"store": store, "path": str(Path(source).resolve())})
        else:
            raise TypeError(f"store {store}: a source is a path or a dataset dict, got {type(source).__name__}")
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "created": time.time(),
                "tokenizer": str(tokenizer), "sources": listed}
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_FILE}.", dir=entry)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the manifest from the cache's other users
        os.replace(tmp, entry / MANIFEST_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def using(entry):
    """Hold ``entry`` as in use by this process for the ``with`` block: records the last use (on entering
    and on leaving) and holds a shared lock, so ``remove`` skips the entry until the block ends or the
    process dies (the kernel drops the lock with the process).

    Makes the entry directory if it does not exist yet (the runner prepares into it inside the block).
    Where the cache cannot be written (a read-only shared cache) the block runs without the lock.
    """
    fd = _hold_shared(Path(entry))
    try:
        yield Path(entry)
    finally:
        if fd is not None:
            os.utime(fd)  # the last use is when the run stopped using it, not when it started
            os.close(fd)  # releases the lock


def _hold_shared(entry):
    import fcntl

    lock = entry / USE_LOCK
    while True:
        try:
            entry.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # removed between mkdir and open: make it again
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise
        fcntl.flock(fd, fcntl.LOCK_SH)
        # A remove that held the lock first has renamed the entry away: lock the new one instead.
        if _same_file(fd, lock):
            os.utime(lock)
            return fd
        os.close(fd)


# --- listing --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One cache entry. sources: paths, or "dataset (config, split)"; tokens: over all its stores;
    size: bytes on disk; created, last_used: seconds since the epoch; in_use: a run holds it now."""
    key: str
    path: Path
    sources: tuple
    tokenizer: str
    stores: tuple
    tokens: int
    size: int
    created: float
    last_used: float
    in_use: bool
    manifest: bool

    def as_json(self):
        """A JSON-ready dict: times in ISO 8601 UTC, size in bytes."""
        return {"key": self.key, "path": str(self.path), "sources": list(self.sources), "tokenizer": self.tokenizer,
                "stores": list(self.stores), "tokens": self.tokens, "size": self.size,
                "created": _iso(self.created), "last_used": _iso(self.last_used), "in_use": self.in_use,
                "manifest": self.manifest}


def entries(root=None):
    """The entries of the cache at ``root`` (default: ``stores_root()``), oldest last use first."""
    root = _existing_root(root)
    if root is None:
        return []
    found = []
    for path in sorted(root.iterdir()):
        try:
            if _is_entry(path):
                found.append(_describe(path))
        except FileNotFoundError:
            continue  # removed while we looked
    return sorted(found, key=lambda e: (e.last_used, e.key))


def ignored(root=None):
    """What the root holds that is not a cache entry nor one of fastlm's own files: left alone by remove."""
    root = _existing_root(root)
    if root is None:
        return []
    return [path for path in sorted(root.iterdir()) if not (_is_entry(path) or _is_entry_lock(path) or _is_trash(path))]


def _existing_root(root):
    root = stores_root() if root is None else Path(root)
    if not root.exists():
        return None
    if not root.is_dir():
        raise NotADirectoryError(f"the cache root {root} is not a directory")
    return root


def _is_entry(path):
    if not _KEY.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
        return False
    for child in path.iterdir():
        if _STORE_NAME.fullmatch(child.name):
            if child.is_symlink() or not child.is_dir() or any(c.name not in STORE_ENTRIES for c in child.iterdir()):
                return False
        elif not _ENTRY_EXTRAS.fullmatch(child.name):
            return False
    return True


def _is_entry_lock(path):
    return path.name.endswith(".lock") and bool(_KEY.fullmatch(path.name[:-5])) and path.is_file()


def _is_trash(path):
    return bool(_TRASH.fullmatch(path.name)) and path.is_dir() and not path.is_symlink()


def _describe(path):
    stores = sorted((child for child in path.iterdir() if _STORE_NAME.fullmatch(child.name)), key=_store_order)
    metas = {store.name: _read_json(store / META_FILE) for store in stores}
    metas = {name: meta for name, meta in metas.items()
             if isinstance(meta, dict) and meta.get("format") == STORE_FORMAT}
    manifest = _read_json(path / MANIFEST_FILE)
    if not (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT):
        manifest = None
    if manifest is not None:
        sources = _unique(_source_text(s) for s in manifest.get("sources") or [])
        tokenizer, created = str(manifest.get("tokenizer")), manifest.get("created")
    else:  # an entry made before manifests: what its stores' meta.json say
        sources = _unique(text for meta in metas.values() for text in _meta_source_texts(meta.get("source")))
        first = next(iter(metas.values()), {})
        tokenizer, created = str(first.get("tokenizer_name", "?")), None
    if not isinstance(created, (int, float)):
        times = [(store / META_FILE).stat().st_mtime for store in stores if store.name in metas]
        created = min(times, default=path.stat().st_mtime)
    lock = path / USE_LOCK
    last_used = max(lock.stat().st_mtime, created) if lock.exists() else created
    tokens = sum(meta["n_tokens"] for meta in metas.values() if isinstance(meta.get("n_tokens"), int))
    return Entry(key=path.name, path=path, sources=tuple(sources), tokenizer=tokenizer,
                 stores=tuple(store.name for store in stores), tokens=tokens, size=_disk_usage(path),
                 created=float(created), last_used=float(last_used),
                 in_use=_locked_by_anyone(lock) or _locked_by_anyone(_prepare_lock(path)),
                 manifest=manifest is not None)


def _store_order(store):
    kind, _, index = store.name.partition("-")
    return (kind != "train", int(index or 0))


def _read_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _unique(items):
    return list(dict.fromkeys(items))


def _source_text(source):
    if not isinstance(source, dict):
        return str(source)
    if "path" in source:
        return str(source["path"])
    details = ", ".join(str(v) for v in (source.get("config"), source.get("split")) if v)
    return f"{source.get('dataset')} ({details})" if details else str(source.get("dataset"))


def _meta_source_texts(source):
    """A store's meta.json "source": a list of paths, or a dataset dict (fastlm.prepare)."""
    if isinstance(source, dict):
        return [_source_text(source)]
    return [str(s) for s in source] if isinstance(source, list) else []


def _disk_usage(path):
    """Bytes the directory takes on disk (allocated blocks, like du), symlinks not followed."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue  # removed while we walk
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def _iso(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- locks ----------------------------------------------------------------------------------------------

def _prepare_lock(entry):
    return entry.with_name(entry.name + ".lock")


def _same_file(fd, path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _locked_by_anyone(path):
    """Whether a process holds a lock (shared or exclusive) on ``path``; asks without waiting and without
    making the file."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)  # some filesystems (NFS) lock exclusively only files open to write
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock this probe may have taken


def _try_exclusive(path):
    """An fd holding an exclusive lock on ``path`` (made if missing), or None when another process holds
    a lock on it or the file went away."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not _same_file(fd, path):  # another remove took it away meanwhile
        os.close(fd)
        return None
    return fd


# --- removing -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Removal:
    """What remove did with one selected entry: removed, or why not (skipped: "in use", "gone")."""
    entry: Entry
    removed: bool
    skipped: str = None


def parse_age(text):
    """Seconds in an age such as "30d", "12h", "90m", "45s", "2w" or "1.5d"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhdw])\s*", str(text))
    if not match:
        raise ValueError(f"{text!r} is not an age such as 30d (a number and a unit: s, m, h, d or w)")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


def select(found, *, keys=None, older_than=None, source=None, all=False, now=None):
    """The entries of ``found`` that remove would take: those named by ``keys`` (full keys or unique
    prefixes), or all, then those last used more than ``older_than`` ago (seconds, a timedelta or an
    age such as "30d") and those prepared from ``source`` (a file, a directory holding the files, or a
    dataset name). Criteria given together must all hold."""
    if all and (keys or older_than is not None or source is not None):
        raise ValueError("all selects every entry: give it alone, or select by keys, age or source")
    if not (all or keys or older_than is not None or source is not None):
        raise ValueError("say what to remove: keys, an age (older_than), a source, or all")
    chosen = list(found)
    if keys:
        chosen = [_by_key(found, key) for key in _unique(keys)]
    if older_than is not None:
        age = _seconds(older_than)
        cutoff = (time.time() if now is None else now) - age
        chosen = [e for e in chosen if e.last_used < cutoff]
    if source is not None:
        chosen = [e for e in chosen if any(_matches(text, source) for text in e.sources)]
    return _unique(chosen)


def remove(keys=None, *, older_than=None, source=None, all=False, root=None, dry_run=False):
    """Remove the cache entries that ``select`` picks; [Removal]. Entries in use (a run holds them, or is
    preparing them) are skipped. Each removal is atomic: the entry is renamed to a hidden name, then
    deleted. With dry_run nothing changes and removed=True means "would be removed"."""
    chosen = select(entries(root), keys=keys, older_than=older_than, source=source, all=all)
    if dry_run:
        return [Removal(e, False, "in use") if e.in_use else Removal(e, True) for e in chosen]
    if chosen:
        _delete_trash(chosen[0].path.parent)
    return [_remove_entry(entry) for entry in chosen]


def _seconds(age):
    if isinstance(age, str):
        return parse_age(age)
    if isinstance(age, datetime.timedelta):
        return age.total_seconds()
    if isinstance(age, (int, float)) and not isinstance(age, bool) and age >= 0:
        return float(age)
    raise ValueError(f"older_than must be an age such as '30d', seconds >= 0 or a timedelta, got {age!r}")


def _by_key(found, key):
    key = str(key).lower()
    matches = [e for e in found if e.key.startswith(key)] if key else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(f"no cache entry {key!r} (fastlm cache list shows the keys)")
    raise ValueError(f"{key!r} is the start of {len(matches)} keys ({', '.join(e.key for e in matches)}): "
                     "give more of it")


def _matches(text, source):
    if text == str(source) or text.startswith(f"{source} ("):  # a dataset, shown as "name (config, split)"
        return True
    mine, given = Path(text), Path(source).resolve()
    return mine.is_absolute() and (mine == given or given in mine.parents)


def _remove_entry(entry):
    prepare_lock = _prepare_lock(entry.path)
    held = [_try_exclusive(prepare_lock)]
    try:
        if held[0] is None:
            return Removal(entry, False, "in use")
        if not entry.path.is_dir():  # another remove was first
            prepare_lock.unlink(missing_ok=True)
            return Removal(entry, False, "gone")
        held.append(_try_exclusive(entry.path / USE_LOCK))
        if held[1] is None:
            return Removal(entry, False, "in use")
        if not _is_entry(entry.path):  # changed since it was listed: no longer ours to remove
            return Removal(entry, False, "changed")
        trash = entry.path.with_name(f".{entry.key}.removing-{secrets.token_hex(4)}")
        os.rename(entry.path, trash)
        # Unlinked while still held: a run waiting on it finds the entry gone and makes a new one.
        prepare_lock.unlink(missing_ok=True)
        _rmtree(trash)
        return Removal(entry, True)
    finally:
        for fd in held:
            if fd is not None:
                os.close(fd)


def _rmtree(path):
    shutil.rmtree(path, ignore_errors=True)  # a file already gone (another clean sweeping) is no error
    if path.exists():
        raise OSError(f"could not delete all of {path} (renamed out of the cache); delete it by hand")


def _delete_trash(root):
    """Finish the deletions an interrupted remove left (entries already renamed away)."""
    for path in root.iterdir():
        if _is_trash(path):
            shutil.rmtree(path, ignore_errors=True)
