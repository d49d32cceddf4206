"""`fastlm prepare`: any corpus to a memory-mapped token store, streaming, parallel and atomic.

    from fastlm.prepare import prepare
    store = prepare(["wiki.train.raw"], "data/wiki", tokenizer="gpt2", append_eos=True, num_proc=4)

Inputs are read in ~1 MB batches of documents and tokenised with batched fast-tokenizer calls
(num_proc > 1 encodes that many batches at once in threads: the Rust encode releases the GIL).
Each batch comes back as one flat numpy array plus document lengths and is appended to the store,
so memory stays flat however large the corpus is.

Documents with no non-whitespace text are skipped in every format unless keep_blank=True (the
runner's default, as Hugging Face's text loader keeps WikiText's " " rows and run_clm tokenises them).
In "line" mode a document keeps its line ending (unless keep_linebreaks=False), so a WikiText-style
raw file gives the same token stream as tokenizing its rows one by one.
"""
import bz2
import gzip
import io
import itertools
import json
import lzma
import operator
import os
import sys
import zlib
from collections import deque
from pathlib import Path

import numpy as np

from fastlm.store import TOKENIZER_DIR, StoreWriter, check_destination, dtype_for_vocab
from fastlm.tokenizer import check_trained_vocab_size

DOC_BOUNDARIES = ("line", "paragraph", "file")
ERRORS = ("strict", "replace")
_COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
_STRUCTURED = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Text is read and tokenised in batches of about this many bytes: big enough to amortise the
# per-call overhead of the tokenizer and the pool, small enough that num_proc batches in flight
# stay a few MB.
_BATCH_BYTES = 1 << 20
_BATCH_ROWS = 4096


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
    dataset_name=None,
    dataset_config=None,
    split=None,
    errors="strict",
    overwrite=False,
    progress=True,
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
    num_proc: batches tokenised at once (threads). With TOKENIZERS_PARALLELISM unset the Rust
        tokenizer also spreads each batch over the cores by itself.
    errors: "strict" raises on invalid UTF-8 naming file and line; "replace" substitutes U+FFFD.
    keep_blank: keep whitespace-only lines and empty rows as documents (HF's loaders do).
    keep_linebreaks: a "line" document keeps its "\n" (HF's text loader option of the same name).
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    _check_arguments(sources, tokenizer, train_tokenizer, vocab_size, doc_boundary, errors, num_proc, dataset_name)
    # Before any tokenizer is loaded or trained: a refused destination should not cost an hour first.
    check_destination(output, overwrite)
    sources = [Path(source) for source in sources]
    if dataset_name is None:
        for source in sources:
            if not source.is_file():
                raise FileNotFoundError(f"input {source} does not exist or is not a file")

    def read_batches():
        if dataset_name is not None:
            return _dataset_batches(dataset_name, dataset_config, split, sources, text_column, keep_blank)
        return itertools.chain.from_iterable(
            _file_batches(source, doc_boundary, text_column, errors, keep_blank, keep_linebreaks) for source in sources
        )

    from fastlm import tokenizer as tokenizer_lib

    if train_tokenizer:
        tok = tokenizer_lib.train_bpe_tokenizer(read_batches(), vocab_size)
        tokenizer_name = f"byte-level BPE trained by fastlm prepare (vocab_size={vocab_size})"
    else:
        tok = tokenizer_lib.load_tokenizer(tokenizer)
        tokenizer_name = str(tokenizer) if isinstance(tokenizer, (str, Path, tuple, list)) else (tok.name_or_path or type(tok).__name__)
    bos = _required_special(tok, "bos", prepend_bos)
    eos = _required_special(tok, "eos", append_eos)
    total_vocab = tokenizer_lib.vocab_size(tok)
    dtype = dtype_for_vocab(total_vocab)
    meta = {
        "vocab_size": total_vocab,
        "special_ids": tokenizer_lib.special_ids(tok),
        "tokenizer_name": tokenizer_name,
        "tokenizer_fingerprint": tokenizer_lib.fingerprint(tok),
        "source": (
            {"dataset": str(dataset_name), "config": dataset_config, "split": split, "data_files": [str(s) for s in sources]}
            if dataset_name is not None
            else [str(source.resolve()) for source in sources]
        ),
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
            "keep_blank": keep_blank,
            "keep_linebreaks": keep_linebreaks,
        },
    }
    from tqdm.auto import tqdm

    encoder_args = (tok.backend_tokenizer.to_str(), add_special_tokens, dtype.name, bos, eos)
    with StoreWriter(output, vocab_size=total_vocab, overwrite=overwrite) as writer:
        tok.save_pretrained(writer.path / TOKENIZER_DIR)
        with tqdm(desc=f"prepare {Path(output).name}", unit="tok", unit_scale=True, disable=not progress) as bar:
            for tokens, lengths in _encode_batches(read_batches(), encoder_args, num_proc):
                writer.append(tokens, lengths)
                bar.update(tokens.shape[0])
        if writer.n_docs == 0:
            where = f"dataset {dataset_name}" if dataset_name is not None else ", ".join(map(str, sources))
            raise ValueError(f"no documents found in {where}: the input is empty or only whitespace; no store written")
        return writer.close(meta)


def summary(store, seconds):
    """One line for the end of a prepare run: documents, tokens, dtype, bytes, seconds, tokens/s."""
    n_bytes = store.tokens.nbytes + store.offsets.nbytes
    rate = store.n_tokens / seconds if seconds > 0 else float("inf")
    return (
        f"{store.path}: {len(store):,} documents, {store.n_tokens:,} tokens ({store.tokens.dtype}), "
        f"{n_bytes / 2**20:,.1f} MiB, {seconds:,.1f} s ({rate:,.0f} tokens/s)"
    )


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


def _required_special(tok, name, wanted):
    if not wanted:
        return None
    token_id = getattr(tok, f"{name}_token_id", None)
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


def _read_blocks(path):
    """The file's bytes, decompressed, in blocks of _BATCH_BYTES. Corrupt or truncated compressed data
    is a ValueError naming the file: gzip, lzma and bz2 raise EOFError, zlib.error, LZMAError or a bare
    OSError that do not say which file."""
    with _open_binary(path) as f:
        while True:
            try:
                block = f.read(_BATCH_BYTES)
            except (EOFError, zlib.error, lzma.LZMAError, OSError) as error:
                if isinstance(error, OSError) and error.errno is not None:
                    raise  # a real I/O error (disk, permissions): it names the file itself
                raise ValueError(f"{path}: corrupt or truncated {path.suffix} data ({error})") from None
            if not block:
                return
            yield block


def _file_batches(path, doc_boundary, text_column, errors, keep_blank=False, keep_linebreaks=True):
    kind = _STRUCTURED.get(path.suffix.lower())
    if kind is None and path.suffix.lower() in _COMPRESSED:
        kind = _STRUCTURED.get(Path(path.stem).suffix.lower())
    if kind is None:
        chunks = _text_chunks(path, errors)
        if doc_boundary == "line":
            return _lines(chunks, keep_blank, keep_linebreaks)
        return {"paragraph": _paragraphs, "file": _whole_file}[doc_boundary](chunks)
    rows = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}[kind](
        path, text_column, errors
    )
    return rows if keep_blank else _skip_blank(rows)


def _text_chunks(path, errors):
    """Decoded text in ~_BATCH_BYTES pieces that end at a line end (except at end of file)."""
    line = 1
    blocks = _read_blocks(path)
    rest = b""
    while True:
        block = next(blocks, b"")
        data = rest + block
        if block:
            cut = data.rfind(b"\n") + 1
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
        line += data.count(b"\n")
        yield text
        if not block:
            return


def _split_lines(text):
    # Only "\n" ends a line (as in WikiText and HF's text loader): str.splitlines would also split
    # on U+2028 and friends that occur inside real text. Each line keeps its "\n".
    pieces = text.split("\n")
    tail = pieces.pop()
    lines = [piece + "\n" for piece in pieces]
    if tail:
        lines.append(tail)
    return lines


def _lines(chunks, keep_blank=False, keep_linebreaks=True):
    for text in chunks:
        lines = _split_lines(text)
        if not keep_linebreaks:
            lines = [line[:-1] if line.endswith("\n") else line for line in lines]
        yield lines if keep_blank else [line for line in lines if line and not line.isspace()]


def _paragraphs(chunks):
    pending = []
    for text in chunks:
        docs = []
        for blank, group in itertools.groupby(_split_lines(text), key=str.isspace):
            if not blank:
                pending.extend(group)
            elif pending:
                docs.append("".join(pending))
                pending = []
        yield docs
    if pending:
        yield ["".join(pending)]


def _whole_file(chunks):
    text = "".join(chunks)
    yield [] if text.isspace() or not text else [text]


def _skip_blank(batches):
    for texts in batches:
        yield [text for text in texts if text and not text.isspace()]


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


def _dataset_batches(name, config, split, data_files, text_column, keep_blank=False):
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
    column = dataset.select_columns([text_column]).with_format("arrow")
    row = 0
    for table in column.iter(batch_size=_BATCH_ROWS):
        texts = _text_column_values(table.column(0).combine_chunks(), f"dataset {name}", text_column, row)
        row += table.num_rows
        yield texts if keep_blank else [text for text in texts if text and not text.isspace()]


# ---------------------------------------------------------------------------------------------
# Encoding: batches of texts -> (flat token array, document lengths), in-process or in a pool.


class _Encoder:
    """Batched fast-tokenizer calls flattened with numpy. It works on a copy of the backend
    tokenizer (from its JSON), so the user's tokenizer object is never modified."""

    def __init__(self, tokenizer_json, add_special_tokens, dtype, bos, eos):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer_json)
        # A saved tokenizer.json may carry truncation/padding settings: they must not cut documents.
        self.backend.no_truncation()
        self.backend.no_padding()
        self.add_special_tokens = add_special_tokens
        self.dtype = np.dtype(dtype)
        self.bos = bos
        self.eos = eos

    def __call__(self, texts):
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=self.add_special_tokens)
        ids = list(map(operator.attrgetter("ids"), encodings))
        lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, count=int(lengths.sum()))
        return _add_boundaries(tokens, lengths, self.bos, self.eos)


def _add_boundaries(tokens, lengths, bos, eos):
    """Insert bos before and/or eos after every document, vectorised over the batch."""
    extra = (bos is not None) + (eos is not None)
    if not extra:
        return tokens, lengths
    lengths = lengths + extra
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]) if ends.size else 0, tokens.dtype)
    content = np.ones(out.shape[0], bool)
    if bos is not None:
        out[starts] = bos
        content[starts] = False
    if eos is not None:
        out[ends - 1] = eos
        content[ends - 1] = False
    out[content] = tokens
    return out, lengths


def _encode_batches(batches, encoder_args, num_proc):
    encoder = _Encoder(*encoder_args)
    batches = (texts for texts in batches if texts)
    if num_proc == 1:
        yield from map(encoder, batches)
        return
    from concurrent.futures import ThreadPoolExecutor

    # Threads, not processes: encode_batch_fast releases the GIL for the whole Rust encode, which
    # is ~95% of the work, so threads scale like a process pool without its start-up cost,
    # pickling, fork/spawn hazards or hangs when a worker dies.
    pool = ThreadPoolExecutor(num_proc, thread_name_prefix="fastlm-tokenize")
    try:
        # Submitting everything up front would read the whole corpus ahead; a bounded queue of
        # 2 batches per thread keeps every core busy with memory independent of the corpus size.
        pending = deque()
        for texts in batches:
            pending.append(pool.submit(encoder, texts))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
