"""`fastlm prepare`: any corpus to a memory-mapped token store, streaming, parallel and atomic.

    from fastlm.prepare import prepare
    store = prepare(["wiki.train.raw"], "data/wiki", tokenizer="gpt2", append_eos=True, num_proc=4)

Inputs are read in ~1 MB batches of documents and encoded (fastlm.encoding: tiktoken for byte-level
BPE, else the Hugging Face tokenizer). Each batch comes back as one flat numpy array plus document
lengths and is appended to the store, so memory stays flat however large the corpus is; a document
longer than a batch (a 200 MB line) is read and encoded in pieces. With num_proc > 1 the input is cut
into slices at document boundaries and each worker process reads, decodes, encodes and writes its own
slices, joined in order at the end (fastlm.parallel); ``shard=(i, n)`` prepares the i-th of n such
slices of the input, for n machines whose stores `fastlm merge` joins.

Every record of a structured file or dataset (JSONL, JSON, CSV, Parquet) is a document, whatever it
holds, as in Megatron-LM's preprocess_data.py and nanoGPT's prepare.py: whitespace-only text is a
document, and so is an empty string (no tokens, or only the framing ids such as append_eos adds; nanoGPT
does the same, Megatron leaves out the end-of-document id there). In text files, documents with no
non-whitespace text are skipped unless keep_blank=True (the runner's default: Hugging Face's text loader
keeps WikiText's " " rows and run_clm tokenises them).
In "line" mode a document keeps its line ending (unless keep_linebreaks=False), so a WikiText-style
raw file gives the same token stream as tokenizing its rows one by one.
"""
import bz2
import functools
import gzip
import io
import itertools
import json
import lzma
import os
import re
import resource
import sys
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fastlm import parallel
from fastlm.encoding import ENCODERS, Batch, choose_encoder, encode_batches, verification_sample
from fastlm.store import TOKENIZER_DIR, StoreWriter, check_destination
from fastlm.tokenizer import byte_level_bpe_problem, check_trained_vocab_size

DOC_BOUNDARIES = ("line", "paragraph", "file")
ERRORS = ("strict", "replace")
_COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
_STRUCTURED = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Text is read and tokenised in batches of about this many bytes: big enough to amortise the
# per-call overhead of the tokenizer and the pool, small enough that num_proc batches in flight
# stay a few MB.
_BATCH_BYTES = 1 << 20
_BATCH_ROWS = 4096
# A document longer than this that cannot be cut for the tokenizer is refused: a tokenizer needs ~100x
# a text's size in memory (a 200 MB line took 23 GB), so this bounds one call to about 1 GB.
_MAX_UNSPLIT_CHARS = 1 << 23


def prepare(
    sources,
    output,
    *,
    tokenizer=None,
    train_tokenizer=False,
    vocab_size=None,
    doc_boundary="line",
    text_column="text",
    append_eos=False,
    prepend_bos=False,
    add_special_tokens=False,
    num_proc=1,
    shard=None,
    dataset_name=None,
    dataset_config=None,
    split=None,
    errors="strict",
    overwrite=False,
    progress=True,
    encoder="auto",
    keep_blank=False,
    keep_linebreaks=True,
):
    """Tokenise ``sources`` into a new token store at ``output``; returns the opened TokenStore.

    sources: paths of plain text (optionally .gz/.xz/.bz2), .jsonl/.json/.csv/.parquet files; or []
        with ``dataset_name`` (a Hugging Face dataset name, or a directory from Dataset.save_to_disk);
        with both, the paths are the dataset's data_files (``dataset_name="json"``, ``"text"``, ...).
    tokenizer: tokenizer object, local directory, hub name, tokenizer.json, vocab.json (+merges.txt)
        or WordPiece vocab.txt. Or ``train_tokenizer=True, vocab_size=N`` to train a byte-level BPE
        on the corpus; either way the tokenizer is saved in ``<output>/tokenizer``.
    doc_boundary: a document is a "line" of a text file, a blank-line-separated "paragraph", or a
        whole "file". Rows of structured files and datasets are always one document each.
    add_special_tokens: apply the tokenizer's own template (e.g. [CLS] ... [SEP]) to each document;
        append_eos / prepend_bos add the eos / bos id explicitly.
    num_proc: worker processes, each reading, encoding and writing its own slices of the input; the
        store is the same byte for byte whatever it is. With num_proc=1 and TOKENIZERS_PARALLELISM
        unset the Hugging Face tokenizer spreads each batch over the cores by itself.
    shard: (i, n) prepares only the i-th (0-based) of n slices of the input, cut at document
        boundaries (by file, and by byte range within plain text files); merging the n stores in
        order (merge_stores) gives the store of the whole input. A shard may hold no document.
    errors: "strict" raises on invalid UTF-8 naming file and line; "replace" substitutes U+FFFD.
    encoder: "auto" (tiktoken for a byte-level BPE when it reproduces the tokenizer's ids on a sample
        of the corpus, else the Hugging Face tokenizer, with a warning saying why), "tiktoken" (or a
        ValueError saying why not) or "hf". The ids are the tokenizer's either way.
    keep_blank: keep whitespace-only documents of text files (lines, whole files), as HF's loaders do.
    keep_linebreaks: a "line" document keeps its "\n" (HF's text loader option of the same name).

    A document longer than ~1 MB is read and encoded in pieces cut where a byte-level BPE gives the
    whole document's ids; other tokenizers refuse documents over 8 Mi characters (_MAX_UNSPLIT_CHARS).
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    _check_arguments(sources, tokenizer, train_tokenizer, vocab_size, doc_boundary, errors, num_proc, dataset_name)
    shard = _check_shard(shard, train_tokenizer)
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    # Before any tokenizer is loaded or trained: a refused destination should not cost an hour first.
    check_destination(output, overwrite)
    sources = [Path(source) for source in sources]
    if dataset_name is None:
        for source in sources:
            if not source.is_file():
                raise FileNotFoundError(f"input {source} does not exist or is not a file")
    if num_proc > 1:
        # Each worker encodes one batch at a time on its core: the Hugging Face tokenizer's own thread
        # pool in every worker would oversubscribe the cores (and warns when a worker is forked).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset = None if dataset_name is None else _open_dataset(dataset_name, dataset_config, split, sources, text_column)
    reading = _Reading(sources, dataset, f"dataset {dataset_name}", doc_boundary, text_column, errors, keep_blank,
                       keep_linebreaks)
    slices = _plan(reading, num_proc, shard)

    from fastlm import tokenizer_cache

    if train_tokenizer:
        from fastlm.tokenizer import train_bpe_tokenizer

        # A trained tokenizer is a byte-level BPE with GPT-2's split: it learns from the same safe pieces.
        texts = (batch.texts for piece in slices for batch in _safe_pieces(reading.batches(piece), keep_blank))
        tok = tokenizer_cache.describe(train_bpe_tokenizer(texts, vocab_size))
        tokenizer_name = f"byte-level BPE trained by fastlm prepare (vocab_size={vocab_size})"
    else:
        # Local tokenizer files are described from the user's cache after the first run: no transformers.
        tok = tokenizer_cache.tokenizer_info(tokenizer)
        tokenizer_name = str(tokenizer) if isinstance(tokenizer, (str, Path, tuple, list)) else tok.name
    bos = _required_special(tok, "bos", prepend_bos)
    eos = _required_special(tok, "eos", append_eos)
    if add_special_tokens and tok.template is None:
        raise ValueError(tok.template_error)
    template_prefix, template_suffix = tok.template if add_special_tokens else ([], [])
    total_vocab = tok.vocab_size
    if dataset_name is not None:
        source = {"dataset": str(dataset_name), "config": dataset_config, "split": split,
                  "data_files": [str(s) for s in sources]}
    else:
        # A shard names the files it holds a part of; merging shards joins a file split between two.
        held = sorted({piece.source for piece in slices}) if shard != (0, 1) else range(len(sources))
        source = [str(sources[i].resolve()) for i in held]
    meta = {
        "vocab_size": total_vocab,
        "special_ids": tok.special_ids,
        "tokenizer_name": tokenizer_name,
        "tokenizer_fingerprint": tok.fingerprint,
        "source": source,
        "args": {
            "doc_boundary": doc_boundary,
            "text_column": text_column,
            "append_eos": append_eos,
            "prepend_bos": prepend_bos,
            "add_special_tokens": add_special_tokens,
            "errors": errors,
            "train_tokenizer": train_tokenizer,
            "requested_vocab_size": vocab_size,
            "num_proc": num_proc,
            "shard": None if shard == (0, 1) else f"{shard[0]}/{shard[1]}",
            "encoder": encoder,
            "keep_blank": keep_blank,
            "keep_linebreaks": keep_linebreaks,
        },
    }
    tokenizer_json = tok.tokenizer_json
    byte_level_problem = byte_level_bpe_problem(tokenizer_json)
    # Long documents are encoded in pieces where that keeps their ids, else whole up to a limit.
    pieces = _safe_pieces if byte_level_problem is None else _whole_documents
    with StoreWriter(output, vocab_size=total_vocab, overwrite=overwrite, record_bytes=True) as writer:
        tok.save(writer.path / TOKENIZER_DIR)
        start, start_cpu = time.perf_counter(), cpu_seconds()
        first = next(pieces(reading.batches(slices[0]), keep_blank), Batch([])) if slices else Batch([])
        chosen, why = choose_encoder(
            encoder, tokenizer_json, writer.dtype, verification_sample(first.texts), byte_level_problem
        )
        encoding = _Encoding(pieces, chosen, ([bos] if bos is not None else []) + template_prefix,
                             template_suffix + ([eos] if eos is not None else []))
        _write(reading, encoding, slices, writer, num_proc, Path(output).name, progress)
        if writer.n_docs == 0 and shard == (0, 1):
            where = f"dataset {dataset_name}" if dataset_name is not None else ", ".join(map(str, sources))
            raise ValueError(f"no documents found in {where}: the input is empty or only whitespace; no store written")
        meta["encoding"] = {
            "encoder": chosen.name,
            "why_not_tiktoken": why,
            "seconds": round(time.perf_counter() - start, 6),
            "cpu_seconds": round(cpu_seconds() - start_cpu, 6),
        }
        return writer.close(meta)


def _plan(reading, num_proc, shard):
    """The slices this run prepares (fastlm.parallel.plan): its shard of the input, a few per worker."""
    if reading.dataset is not None:
        inputs, min_units = [parallel.every_unit(len(reading.dataset))], _BATCH_ROWS
    else:
        inputs, min_units = [_input(path, reading.doc_boundary) for path in reading.sources], _BATCH_BYTES
    units = sum(source.size for source in inputs) // shard[1]
    return parallel.plan(inputs, parallel.slice_count(units, num_proc, min_units), shard)


class _Reading(NamedTuple):
    """How the run reads its input: ``batches(slice)`` are the Batches of one slice of it."""

    sources: list
    dataset: object
    dataset_where: str
    doc_boundary: str
    text_column: str
    errors: str
    keep_blank: bool
    keep_linebreaks: bool

    def batches(self, piece):
        if self.dataset is not None:
            rows = _dataset_batches(self.dataset, self.dataset_where, self.text_column, piece.start, piece.stop)
            return _row_batches(rows, self.dataset_where, first_row=piece.start)
        path = self.sources[piece.source]
        byte_range = (piece.start, piece.stop) if _splittable(path, self.doc_boundary) else None
        return _file_batches(path, self.doc_boundary, self.text_column, self.errors, self.keep_blank,
                             self.keep_linebreaks, byte_range)


class _Encoding(NamedTuple):
    """How the run encodes: ``pieces`` (_safe_pieces or _whole_documents), the encoder, and the ids
    around every document."""

    pieces: object
    encoder: object
    prefix: list
    suffix: list


def _write(reading, encoding, slices, writer, num_proc, name, progress):
    from tqdm.auto import tqdm

    with tqdm(desc=f"prepare {name}", unit="tok", unit_scale=True, disable=not progress) as bar:
        text_bytes = 0

        def advance(tokens, n_bytes):
            nonlocal text_bytes
            text_bytes += n_bytes
            bar.update(tokens)
            bar.set_postfix_str(f"{text_bytes / 1e6 / max(bar.format_dict['elapsed'], 1e-3):,.1f} MB/s", refresh=False)

        if num_proc == 1 or len(slices) == 1:
            for piece in slices:
                _write_slice(reading, encoding, piece, writer, advance)
            return
        job = parallel.Job(functools.partial(_write_slice, reading, encoding), writer.vocab_size)
        parallel.prepare_in_processes(job, slices, writer, num_proc, lambda part: advance(part.n_tokens, part.meta["n_bytes"]))


def _write_slice(reading, encoding, piece, writer, advance=None):
    """Read, encode and append one slice of the input to ``writer``."""
    try:
        batches = encoding.pieces(reading.batches(piece), reading.keep_blank)
        for tokens, lengths, doc_bytes, open_last in encode_batches(batches, encoding.encoder, prefix=encoding.prefix,
                                                                    suffix=encoding.suffix):
            writer.append(tokens, lengths, doc_bytes, open_last=open_last)
            if advance is not None:
                advance(tokens.shape[0], int(doc_bytes.sum()))
    except ValueError as error:
        if reading.dataset is not None or not piece.start:
            raise
        path = reading.sources[piece.source]
        if _structured_kind(path) == "jsonl":
            # Rows count from the slice's start and some messages look the row up: for the exact message,
            # read the file from its start to the slice's end (only ever after an error).
            for _ in encoding.pieces(reading.batches(piece._replace(start=0)), reading.keep_blank):
                pass
        # Readers number lines from the slice's start; the first line of the slice is found only now.
        raise ValueError(_from_file_start(str(error), path, piece.start)) from None


def _from_file_start(message, path, start):
    """``message`` with the line numbers it gives for ``path`` counted from the file's start, not from
    byte ``start`` where the slice read began."""
    lines_before = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(min(1 << 22, start - f.tell())), b""):
            lines_before += block.count(b"\n")
    return re.sub(re.escape(f"{path}, line ") + r"(\d+)",
                  lambda match: f"{path}, line {int(match.group(1)) + lines_before}", message)


def cpu_seconds():
    """CPU seconds of this process and of its finished children (prepare's worker processes), at a finer
    grain than os.times' 10 ms ticks: a small corpus encodes in less than one tick."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def summary(store, seconds, cpu_seconds=None):
    """One line for the end of a prepare run: documents, tokens, dtype, size, seconds, tokens/s (per
    core: per CPU second), text bytes per token."""
    n_bytes = store.tokens.nbytes + store.offsets.nbytes
    rate = store.n_tokens / seconds if seconds > 0 else float("inf")
    line = (
        f"{store.path}: {len(store):,} documents, {store.n_tokens:,} tokens ({store.tokens.dtype}), "
        f"{n_bytes / 2**20:,.1f} MiB, {seconds:,.1f} s ({rate:,.0f} tokens/s"
    )
    if cpu_seconds:
        line += f", {store.n_tokens / cpu_seconds:,.0f} tokens/s per core"
    line += ")"
    if store.doc_bytes is not None and store.n_tokens:
        line += f", {store.n_bytes / store.n_tokens:.2f} bytes/token"
    return line


def _check_arguments(sources, tokenizer, train_tokenizer, vocab_size, doc_boundary, errors, num_proc, dataset_name):
    if doc_boundary not in DOC_BOUNDARIES:
        raise ValueError(f"doc_boundary must be one of {DOC_BOUNDARIES}, got {doc_boundary!r}")
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")
    if not isinstance(num_proc, int) or isinstance(num_proc, bool) or num_proc < 1:
        raise ValueError(f"num_proc must be a positive integer, got {num_proc!r}")
    if not sources and dataset_name is None:
        raise ValueError("no input: give source files or a dataset name")
    if train_tokenizer:
        if tokenizer is not None:
            raise ValueError("give either a tokenizer or train_tokenizer=True, not both")
        if vocab_size is None:
            raise ValueError("train_tokenizer=True needs vocab_size (--vocab-size)")
        check_trained_vocab_size(vocab_size)
    elif tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer=... (--tokenizer) or train_tokenizer=True (--train-tokenizer)")
    elif vocab_size is not None:
        raise ValueError("vocab_size only applies with train_tokenizer=True")


def _check_shard(shard, train_tokenizer):
    """(index, count) of the shard to prepare; (0, 1) for the whole input."""
    if shard is None:
        return 0, 1
    if not (isinstance(shard, (tuple, list)) and len(shard) == 2 and all(_is_count(value) for value in shard)
            and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    if train_tokenizer:
        raise ValueError("a tokenizer trained on each shard would differ between shards: train one first "
                         "(prepare a sample with --train-tokenizer) and pass its <store>/tokenizer to every shard")
    return int(shard[0]), int(shard[1])


def _is_count(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _required_special(tok, name, wanted):
    if not wanted:
        return None
    token_id = tok.special_ids.get(name)
    if token_id is None:
        raise ValueError(
            f"{'prepend_bos' if name == 'bos' else 'append_eos'} needs a {name} token, and this tokenizer "
            "has none; use add_special_tokens=True (--add-special-tokens) for its own template instead"
        )
    return int(token_id)


# ---------------------------------------------------------------------------------------------
# Reading: every source becomes an iterator of lists of document texts.


def _open_binary(path):
    return _COMPRESSED.get(path.suffix.lower(), open)(path, "rb")


def _read_blocks(path, byte_range=None):
    """The file's bytes, decompressed, in blocks of _BATCH_BYTES; only bytes [start, stop) of an
    uncompressed file with ``byte_range``. Corrupt or truncated compressed data is a ValueError naming
    the file: gzip, lzma and bz2 raise EOFError, zlib.error, LZMAError or a bare OSError that do not
    say which file."""
    start, stop = byte_range or (0, None)
    with _open_binary(path) as f:
        f.seek(start)
        while True:
            size = _BATCH_BYTES if stop is None else min(_BATCH_BYTES, stop - f.tell())
            if size <= 0:
                return
            try:
                block = f.read(size)
            except (EOFError, zlib.error, lzma.LZMAError, OSError) as error:
                if isinstance(error, OSError) and error.errno is not None:
                    raise  # a real I/O error (disk, permissions): it names the file itself
                raise ValueError(f"{path}: corrupt or truncated {path.suffix} data ({error})") from None
            if not block:
                return
            yield block


def _structured_kind(path):
    """"jsonl", "json", "csv" or "parquet" for a (possibly compressed) structured file, else None."""
    kind = _STRUCTURED.get(path.suffix.lower())
    if kind is None and path.suffix.lower() in _COMPRESSED:
        kind = _STRUCTURED.get(Path(path.stem).suffix.lower())
    return kind


def _splittable(path, doc_boundary):
    """Whether the file may be cut between documents: an uncompressed JSON-lines file, or text file of
    lines or paragraphs."""
    if path.suffix.lower() in _COMPRESSED:
        return False
    kind = _structured_kind(path)
    return kind == "jsonl" or (kind is None and doc_boundary != "file")


def _input(path, doc_boundary):
    """The file as a parallel.Source, cut only between files unless it is _splittable."""
    if _splittable(path, doc_boundary):
        paragraphs = doc_boundary == "paragraph" and _structured_kind(path) is None
        return parallel.text_lines(path, b"\n\n" if paragraphs else b"\n")
    return parallel.whole(path.stat().st_size)


def _file_batches(path, doc_boundary, text_column, errors, keep_blank=False, keep_linebreaks=True, byte_range=None):
    """The file's Batches; only those of bytes [start, stop) of a _splittable file with ``byte_range``
    (cut at document boundaries: line and row numbers then count from start)."""
    kind = _structured_kind(path)
    if kind is None:
        pieces = _text_pieces(path, errors, byte_range)
        if doc_boundary == "line":
            return _lines(pieces, path, keep_blank, keep_linebreaks)
        if doc_boundary == "file":
            return _whole_file(pieces, path, keep_blank)
        return _paragraphs(pieces, path)  # blank lines end paragraphs: none is blank
    if kind == "jsonl" and byte_range is not None:
        return _row_batches(_jsonl_rows(path, text_column, errors, _text_chunks(path, errors, byte_range)), path)
    return _row_batches({"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}[kind](
        path, text_column, errors
    ), path)


def _text_chunks(path, errors, byte_range=None):
    """Decoded text in ~_BATCH_BYTES chunks that end at a line end (except at the end of the file), for
    readers that need whole lines; a long line is held whole."""
    long_line = []
    for text, _, line_open in _text_pieces(path, errors, byte_range):
        if line_open:
            long_line.append(text)
            continue
        if long_line:
            text = "".join(long_line) + text
            long_line = []
        yield text


def _text_pieces(path, errors, byte_range=None):
    """(text, line, line_open): decoded text in ~_BATCH_BYTES pieces that end at a line end, and the
    number of the line text starts in. A line longer than _BATCH_BYTES is cut at a character boundary
    instead, with line_open True, so one huge line never sits in memory whole."""
    line = 1
    line_open = False
    blocks = _read_blocks(path, byte_range)
    rest = b""
    while True:
        block = next(blocks, b"")
        data = rest + block
        if not data and line_open:
            yield "", line, False  # the file ends inside the line the last piece left open
        line_open = False
        if block:
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                cut = _utf8_boundary(data)
                line_open = True
                if cut == 0:
                    rest = data
                    continue
            data, rest = data[:cut], data[cut:]
        if not data:
            return
        try:
            text = data.decode("utf-8", errors)
        except UnicodeDecodeError as error:
            bad_line = line + data.count(b"\n", 0, error.start)
            raise ValueError(
                f"{path}, line {bad_line}: invalid UTF-8 ({error.reason}: {data[error.start:error.end]!r}); "
                "fix the file or pass errors='replace' (--errors replace) to substitute U+FFFD"
            ) from None
        yield text, line, line_open
        line += data.count(b"\n")
        if not block:
            return


def _utf8_boundary(data):
    """Where to cut data so that no UTF-8 character is split: before a multi-byte character's lead
    byte among the last four bytes, else at the end. Cutting there decodes, strictly or with U+FFFD,
    exactly as the whole would."""
    i = len(data) - 1
    while i > 0 and len(data) - i < 4 and 0x80 <= data[i] < 0xC0:
        i -= 1
    return i if data[i] >= 0xC0 else len(data)


def _split_lines(text):
    # Only "\n" ends a line (as in WikiText and HF's text loader): str.splitlines would also split
    # on U+2028 and friends that occur inside real text. Each line keeps its "\n".
    pieces = text.split("\n")
    tail = pieces.pop()
    lines = [piece + "\n" for piece in pieces]
    if tail:
        lines.append(tail)
    return lines


def _lines(chunks, path, keep_blank=False, keep_linebreaks=True):
    continues = False
    for text, line, line_open in chunks:
        lines = _split_lines(text) or [""]
        if not keep_linebreaks:  # only complete lines end in "\n": the piece of an open one has none
            lines = [line[:-1] if line.endswith("\n") else line for line in lines]
        # The first line may finish one begun in an earlier chunk and the last may go on in the next:
        # whether such a line is blank is for _safe_pieces / _whole_documents to tell.
        first = 1 if continues else 0
        last = max(len(lines) - 1 if line_open else len(lines), first)
        whole = lines[first:last] if keep_blank else [line for line in lines[first:last] if line and not line.isspace()]
        docs = lines[:first] + whole + lines[last:]
        open_line = line + text.count("\n")
        yield Batch(docs, continues, line_open, f"{path}, line {open_line}" if line_open else "")
        continues = line_open


def _paragraphs(chunks, path):
    paragraph = []       # the current paragraph's text not sent yet
    size = 0
    sent = False         # the current paragraph is long: its first pieces went out already
    first_line = 0       # the line it starts on, for error messages
    unsure = ""          # an unfinished line that is whitespace so far: blank or not is known at its end
    in_text_line = False  # the last piece was an unfinished line with text: the next piece goes on with it
    for text, line, line_open in chunks:
        continues = sent
        docs = []
        lines = _split_lines(text) or [""]
        for i, piece in enumerate(lines):
            complete = not (line_open and i == len(lines) - 1)
            if not in_text_line:
                piece = unsure + piece
                unsure = ""
                if piece.isspace() or not piece:
                    if not complete:
                        unsure = _bounded_whitespace(piece, path, line + i)
                    elif paragraph or sent:
                        docs.append("".join(paragraph))  # a blank line ends the paragraph
                        paragraph, size, sent = [], 0, False
                    continue
                if not (paragraph or sent):
                    first_line = line + i
            paragraph.append(piece)
            size += len(piece)
            in_text_line = not complete
        if size >= _BATCH_BYTES:
            docs.append("".join(paragraph))
            paragraph, size, sent = [], 0, True
        if docs:
            yield Batch(docs, continues, sent and not paragraph, f"{path}, line {first_line}")
    if paragraph or sent:
        yield Batch(["".join(paragraph)], sent)


def _bounded_whitespace(text, path, line):
    if len(text) > _MAX_UNSPLIT_CHARS:
        raise ValueError(f"{path}, line {line}: more than {_MAX_UNSPLIT_CHARS:,} characters of whitespace in one line")
    return text


def _whole_file(chunks, path, keep_blank=False):
    previous = None
    for i, (text, _, _) in enumerate(chunks):
        if previous is not None:
            yield Batch([previous], i > 1, True, str(path))
        previous = text
    if previous is not None:
        yield Batch([previous] if i or keep_blank or not previous.isspace() else [], i > 0)


def _row_batches(batches, where, first_row=0):
    """Rows of a structured file or dataset as Batches, every row a document (blank ones too), a row
    longer than _BATCH_BYTES in pieces (it is in memory already; the pieces bound the tokenizer's memory)."""
    row = first_row
    for texts in batches:
        if texts and max(map(len, texts)) > _BATCH_BYTES:
            yield from _long_rows(texts, row, where)
        else:
            yield Batch(list(texts))
        row += len(texts)


def _long_rows(texts, first_row, where):
    docs = []
    for row, text in enumerate(texts, first_row):
        if len(text) <= _BATCH_BYTES or text.isspace():
            docs.append(text)
            continue
        if docs:
            yield Batch(docs)
            docs = []
        starts = range(0, len(text), _BATCH_BYTES)
        for start in starts:
            yield Batch([text[start : start + _BATCH_BYTES]], start > 0, start != starts[-1], f"{where}, row {row}")
    if docs:
        yield Batch(docs)


def _text_column_values(column, where, text_column, first_row):
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise ValueError(f"{where}: column {text_column!r} holds {column.type}, not text")
    if column.null_count:
        row = first_row + int(np.argmax(np.asarray(column.is_null())))
        raise ValueError(f"{where}: row {row} has no {text_column!r} text (null or missing)")
    return column.to_pylist()


def _missing_column(where, text_column, columns):
    return ValueError(f"{where}: no text column {text_column!r} (columns: {', '.join(map(repr, columns))}); use --text-column")


class _Utf8Reader(io.RawIOBase):
    """Decoded text chunks as a UTF-8 file for pyarrow's readers. Invalid UTF-8 never reaches pyarrow
    (whose error names neither file nor row): _text_chunks has reported it with its line, or replaced it."""

    def __init__(self, chunks):
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk.encode("utf-8"))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _jsonl_rows(path, text_column, errors, chunks=None):
    import pyarrow as pa
    import pyarrow.json as pj

    # Only the text field is parsed; other fields may hold anything.
    parse = pj.ParseOptions(explicit_schema=pa.schema([(text_column, pa.string())]), unexpected_field_behavior="ignore")
    source = _Utf8Reader(_text_chunks(path, errors) if chunks is None else chunks)
    row = 0
    try:
        reader = pj.open_json(source, read_options=pj.ReadOptions(block_size=_BATCH_BYTES), parse_options=parse)
        for batch in reader:
            column = batch.column(0)
            if column.null_count:
                raise _jsonl_missing_text(path, text_column, errors, row + int(np.argmax(np.asarray(column.is_null()))))
            yield _text_column_values(column, path, text_column, row)
            row += batch.num_rows
    except pa.ArrowInvalid as error:
        raise ValueError(f"{path}: not valid JSON lines near row {row} ({error})") from None


def _jsonl_missing_text(path, text_column, errors, row):
    """The error for a JSON-lines row without text: it names the fields that row does have."""
    # pyarrow counts only lines with content as rows.
    lines = (line for text in _text_chunks(path, errors) for line in _split_lines(text) if not line.isspace())
    record = json.loads(next(itertools.islice(lines, row, None)))
    if isinstance(record, dict) and text_column in record:
        return ValueError(f"{path}, row {row}: {text_column!r} is null, not text")
    return _missing_column(f"{path}, row {row}", text_column, list(record) if isinstance(record, dict) else [])


def _json_rows(path, text_column, errors):
    chunks = _text_chunks(path, errors)
    first = next(chunks, "")
    if not first.lstrip().startswith("["):
        yield from _jsonl_rows(path, text_column, errors, itertools.chain([first], chunks))
        return
    # A JSON array has to be parsed whole; for corpora larger than RAM use JSON lines.
    try:
        rows = json.loads(first + "".join(chunks))
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    texts = []
    for row, record in enumerate(rows):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, row {row}: a {type(record).__name__}, not an object with a {text_column!r} field")
        if text_column not in record:
            raise _missing_column(f"{path}, row {row}", text_column, list(record))
        text = record[text_column]
        if not isinstance(text, str):
            raise ValueError(f"{path}, row {row}: {text_column!r} holds {json.dumps(text)[:40]}, not text")
        texts.append(text)
    for start in range(0, len(texts), _BATCH_ROWS):
        yield texts[start : start + _BATCH_ROWS]


def _csv_rows(path, text_column, errors):
    import csv

    # The csv module refuses fields over 128 KiB unless told otherwise (a process-wide setting), and a
    # document may be longer. It is used rather than pyarrow's reader because strict mode reports a
    # quote that is never closed, which pyarrow silently turns into one row holding the rest of the file.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # Whole "\n"-terminated lines: the csv module treats the end of each string as a line end.
    lines = (line for text in _text_chunks(path, errors) for line in _split_lines(text))
    reader = csv.reader(lines, strict=True)
    first_line = 1
    try:
        header = next(reader, None)
        if header is None:
            return
        if text_column not in header:
            raise _missing_column(path, text_column, header)
        index = header.index(text_column)
        texts, size = [], 0
        first_line = reader.line_num + 1
        for record in reader:
            if record:  # a blank line is no row
                if len(record) != len(header):
                    raise ValueError(f"{path}, line {first_line}: {len(record)} fields, but the header has "
                                     f"{len(header)}")
                texts.append(record[index])
                size += len(record[index])
                if size >= _BATCH_BYTES or len(texts) >= _BATCH_ROWS:
                    yield texts
                    texts, size = [], 0
            first_line = reader.line_num + 1
        yield texts
    except csv.Error as error:
        if "unexpected end of data" in str(error):
            raise ValueError(f"{path}, line {first_line}: a quote opened in this row is never closed (the "
                             "rest of the file would be one field)") from None
        raise ValueError(f"{path}, line {first_line}: not valid CSV ({error})") from None


def _parquet_rows(path, text_column, errors):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet strings are UTF-8 by construction: errors has nothing to replace.
    try:
        parquet = pq.ParquetFile(path)
        if text_column not in parquet.schema_arrow.names:
            raise _missing_column(path, text_column, parquet.schema_arrow.names)
        row = 0
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[text_column]):
            yield _text_column_values(batch.column(0), path, text_column, row)
            row += batch.num_rows
    except pa.ArrowException as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None


def _open_dataset(name, config, split, data_files, text_column):
    """The dataset's text column (arrow format): rows are read by slices of it (_dataset_batches)."""
    import datasets

    local = Path(name)
    if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
        dataset = datasets.load_from_disk(str(local))
    else:
        dataset = datasets.load_dataset(
            str(name), config, split=split, data_files=[str(f) for f in data_files] or None
        )
    if isinstance(dataset, datasets.DatasetDict):
        if split is None and len(dataset) == 1:
            split = next(iter(dataset))
        if split not in dataset:
            raise ValueError(f"dataset {name} has splits {list(dataset)}; choose one with split= (--split)")
        dataset = dataset[split]
    if text_column not in dataset.column_names:
        raise _missing_column(f"dataset {name}", text_column, dataset.column_names)
    return dataset.select_columns([text_column]).with_format("arrow")


def _dataset_batches(column, where, text_column, start, stop):
    """Lists of the texts of rows [start, stop) of an _open_dataset column."""
    row = start
    # A contiguous range selects without an indices mapping: a view of the same arrow table.
    for table in column.select(range(start, stop)).iter(batch_size=_BATCH_ROWS):
        texts = _text_column_values(table.column(0).combine_chunks(), where, text_column, row)
        row += table.num_rows
        yield texts


# ---------------------------------------------------------------------------------------------
# Long documents: the readers send a document longer than _BATCH_BYTES in pieces. A byte-level BPE
# with GPT-2's split encodes each piece of its regex split on its own, so a document can be cut where
# the split always cuts and encoded in parts with exactly the whole document's ids; any other tokenizer
# gets whole documents, up to _MAX_UNSPLIT_CHARS.


# The last offset where GPT-2's split always cuts, whatever follows: a space or newline after a
# non-whitespace character. No piece of the split holds both (only whitespace pieces hold whitespace,
# and an optional leading space is a piece's first character), none looks behind, and the piece that
# ends there looks no further; so the text before and after it split as the whole does. Python's \S is
# "not str.isspace()", which is stricter than the tokenizers' regex \S: never a false cut.
_SAFE_CUT = re.compile(r".*\S([ \n])", re.DOTALL)


def _last_safe_cut(text):
    match = _SAFE_CUT.match(text)
    return match.start(1) if match else 0


def _safe_pieces(batches, keep_blank=False):
    """Batches whose pieces of long documents end only at safe cuts (the rest of a piece is carried
    to the next one), so encoding the pieces gives exactly the whole documents' ids. A long document
    goes out only once it has text, so one that turns out blank is dropped like any blank document
    (kept with keep_blank)."""
    carry = ""         # the open document's text after its last safe cut
    started = False    # some of the open document went out already
    for batch in batches:
        texts = list(batch.texts)
        continues = False
        same_document = batch.continues and batch.open and len(texts) == 1
        if batch.continues:
            texts[0] = carry + texts[0]
            carry = ""
            continues = started
            if not (started or same_document or keep_blank) and (texts[0].isspace() or not texts[0]):
                texts.pop(0)
        opened = False
        if batch.open:
            last = texts.pop()
            cut = _last_safe_cut(last)
            if cut:
                texts.append(last[:cut])
                opened = True
            carry = last[cut:]
            if len(carry) > _MAX_UNSPLIT_CHARS:
                raise ValueError(
                    f"{batch.where}: more than {_MAX_UNSPLIT_CHARS:,} characters without a space or newline after "
                    "a non-space, where a long document can be cut for the tokenizer; split such text first"
                )
            started = opened or (same_document and started)
        else:
            started = False
        if texts:
            yield Batch(texts, continues, opened, batch.where)


def _whole_documents(batches, keep_blank=False):
    """Batches of whole documents, the pieces of long ones joined; refuses one longer than
    _MAX_UNSPLIT_CHARS (this tokenizer cannot encode it in parts, and it needs ~100x its size in memory)."""
    pieces = []
    size = 0
    for batch in batches:
        texts = list(batch.texts)
        same_document = batch.continues and batch.open and len(texts) == 1
        if batch.continues:
            pieces.append(texts.pop(0))
            size += len(pieces[-1])
            if not same_document:
                whole = "".join(pieces)
                texts[0:0] = [whole] if keep_blank or (whole and not whole.isspace()) else []
                pieces, size = [], 0
        if batch.open and not same_document:
            pieces = [texts.pop()]
            size = len(pieces[0])
        if size > _MAX_UNSPLIT_CHARS:
            raise ValueError(
                f"{batch.where}: a document of more than {_MAX_UNSPLIT_CHARS:,} characters, too long to tokenize "
                "whole; only a byte-level BPE tokenizer (GPT-2, RoBERTa) encodes long documents in pieces. "
                "Split the document (e.g. --doc-boundary line or paragraph) or use such a tokenizer"
            )
        if texts:
            yield Batch(texts)
