"""Training sources and evaluation sets as the command line names them: [NAME=]PATH[:WEIGHT]."""
import math
import re
from dataclasses import dataclass
from pathlib import Path

from fastlm.train.errors import ConfigError

SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Source:
    """One training source or evaluation set of the command line. weight None: in proportion to its size."""
    name: str
    path: str
    weight: float = None


def _split_name(value, flag):
    name, sep, path = value.partition("=")
    if sep and SOURCE_NAME.fullmatch(name) and path:
        return name, path
    if sep and not path:
        raise ConfigError(f"{flag} {value}: no path after {name}=")
    return None, value


def _default_name(path):
    """A source's name from its path: a store's directory name, a file's name without its suffix."""
    base = Path(path.rstrip("/")).name
    base = base.split(".", 1)[0] if "." in base.lstrip(".") else base
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "data"


def _weight(path, flag):
    """(path, weight or None) of PATH[:WEIGHT]; a path that exists as given keeps any colon it has."""
    head, sep, tail = path.rpartition(":")
    if not sep or Path(path).exists():
        return path, None
    try:
        weight = float(tail)
    except ValueError:
        return path, None
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"{flag} {path}: the weight must be a finite number > 0, got {tail}")
    return head, weight


def _sources(values, flag, *, weighted):
    entries = []
    for value in values:
        name, path = _split_name(value, flag)
        path, weight = _weight(path, flag) if weighted else (path, None)
        entries.append(Source(name or _default_name(path), path, weight))
    names = [source.name for source in entries]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{flag}: two sources are named {name!r}; name them apart as NAME=PATH")
    return entries


def train_sources(values, flag="--train_store"):
    """--train_store / --train_file values ([NAME=]PATH[:WEIGHT] ...) as Sources; all weighted or none."""
    sources = _sources(values, flag, weighted=True)
    given = [source.weight is not None for source in sources]
    if any(given) and not all(given):
        for value, source in zip(values, sources):
            tail = source.path.rpartition(":")[2] if ":" in source.path and source.weight is None else None
            if tail is not None and not Path(source.path).exists():
                raise ConfigError(f"{flag} {value}: the weight {tail!r} is not a number (a weight is a number > 0, "
                                  "e.g. web:0.7)")
        raise ConfigError(f"{flag}: give a weight to every source or to none (none: in proportion to their "
                          f"blocks), got {' '.join(values)}")
    return sources


def eval_sources(values, flag="--eval_store"):
    """--eval_store / --validation_file values ([NAME=]PATH ...) as Sources."""
    return _sources(values, flag, weighted=False)
