"""The `fastlm` command.

    fastlm prepare wiki.train.raw -o data/wiki --tokenizer gpt2 --append-eos --num-proc 4
    fastlm prepare --dataset wikitext --dataset-config wikitext-2-raw-v1 --split train -o data/wiki --tokenizer gpt2
    fastlm prepare big.txt -o data/part3 --tokenizer gpt2 --shard 3/8    (one job of 8; then fastlm merge)
    fastlm merge shard0 shard1 -o data/all
    fastlm inspect data/wiki --docs 3
    fastlm pack data/wiki --block-size 128
    fastlm export data/wiki -o out/wiki_text_document --format megatron   (or --format nanogpt -o train.bin)
    fastlm cache list           (the stores the runner prepared; `fastlm cache clean --older-than 30d --yes`)
    fastlm train ...            (fastlm.run; `fastlm train --help` lists its options)
"""
import argparse
import os
import sys
import time
import warnings


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # `train` owns its whole argument list (the runner's argparse + DeepSpeed's), so it is handed
    # over untouched rather than parsed here.
    if argv[:1] == ["train"]:
        from fastlm import run

        return run.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            # Library warnings (e.g. prepare leaving tiktoken for the HF tokenizer) read as one line.
            warnings.showwarning = lambda message, *_, **__: print(f"{message}", file=sys.stderr)
            return args.command(args)
    except BrokenPipeError:
        # The reader stopped early (`fastlm inspect S | head`): not an error. Point stdout at devnull so
        # the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, OSError) as error:
        from fastlm.writes import WriteFailed

        # Bad input is the user's to fix: one clear line (library messages may span several), no traceback.
        print(f"fastlm {args.command_name}: error: {' '.join(str(error).split())}", file=sys.stderr)
        # A full disk or file-size limit is no bad input: exit status 1, as for the runner's checkpoint writes.
        return 1 if isinstance(error, WriteFailed) else 2


def _parser():
    parser = argparse.ArgumentParser(prog="fastlm", description="Token stores, packing and training for language models.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    prepare = commands.add_parser("prepare", help="tokenise a corpus into a memory-mapped token store")
    prepare.add_argument("sources", nargs="*", help="text (.gz/.xz/.bz2), .jsonl, .json, .csv or .parquet files")
    prepare.add_argument("-o", "--output", required=True, help="store directory to create")
    tok = prepare.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="local directory, hub name, tokenizer.json, vocab.json (+merges.txt) or vocab.txt")
    tok.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE on the corpus")
    prepare.add_argument("--vocab-size", type=int, help="vocabulary size for --train-tokenizer")
    prepare.add_argument("--doc-boundary", choices=("line", "paragraph", "file"), default="line",
                         help="what a document is in a text file (default: line)")
    prepare.add_argument("--text-column", default="text", help="column/field holding the text (default: text)")
    prepare.add_argument("--append-eos", action="store_true", help="end every document with the eos token")
    prepare.add_argument("--prepend-bos", action="store_true", help="start every document with the bos token")
    prepare.add_argument("--add-special-tokens", action="store_true",
                         help="apply the tokenizer's own template to each document (e.g. [CLS] ... [SEP])")
    prepare.add_argument("--num-proc", type=int, default=1,
                         help="worker processes, each reading, encoding and writing its own slices of the input; "
                              "the store is the same byte for byte for any value (default: 1)")
    prepare.add_argument("--shard", type=_shard, metavar="I/N",
                         help="prepare only the I-th (0-based) of N slices of the input, cut at document boundaries "
                              "(e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); fastlm merge joins the "
                              "N stores into the store of the whole input")
    prepare.add_argument("--encoder", choices=("auto", "tiktoken", "hf"), default="auto",
                         help="auto (default): tiktoken for a byte-level BPE (GPT-2, RoBERTa) when it gives the "
                              "tokenizer's ids (checked once per tokenizer, then cached), else the Hugging Face "
                              "tokenizer")
    prepare.add_argument("--dataset", dest="dataset_name",
                         help="Hugging Face dataset name or save_to_disk directory (sources become its data_files)")
    prepare.add_argument("--dataset-config", help="dataset configuration name")
    prepare.add_argument("--split", help="dataset split")
    prepare.add_argument("--errors", choices=("strict", "replace"), default="strict",
                         help="invalid UTF-8: stop with file and line (strict, default) or substitute U+FFFD")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing store at --output")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(command=_prepare, command_name="prepare")

    merge = commands.add_parser("merge", help="concatenate shard stores made with the same tokenizer")
    merge.add_argument("stores", nargs="+")
    merge.add_argument("-o", "--output", required=True)
    merge.add_argument("--overwrite", action="store_true")
    merge.set_defaults(command=_merge, command_name="merge")

    inspect = commands.add_parser("inspect", help="print a store's metadata and a few decoded documents")
    inspect.add_argument("store")
    inspect.add_argument("--docs", type=int, default=3, help="documents to decode (default: 3)")
    inspect.add_argument("--verify", action="store_true", help="also check the sha256 of the data files")
    inspect.add_argument("--tokenizer", help="tokenizer to decode with (a Megatron dataset records none)")
    inspect.set_defaults(command=_inspect, command_name="inspect")

    pack = commands.add_parser("pack", help="blocks and fill rate of every packing mode over a store")
    pack.add_argument("store")
    pack.add_argument("--block-size", type=int, required=True)
    pack.set_defaults(command=_pack, command_name="pack")

    export = commands.add_parser("export", help="write a store as a Megatron-LM .bin/.idx or a nanoGPT .bin")
    export.add_argument("store")
    export.add_argument("-o", "--output", required=True, help="megatron: prefix of OUT.bin + OUT.idx; nanogpt: a file")
    export.add_argument("--format", required=True, choices=("megatron", "nanogpt"))
    export.add_argument("--eot-id", type=int, help="nanogpt: the end-of-text id (default: the store's eos)")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(command=_export, command_name="export")

    _add_cache_commands(commands)
    commands.add_parser("train", help="train a model on a store (fastlm.run; see `fastlm train --help`)")
    return parser


def _shard(text):
    index, _, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"I/N needs 0 <= I < N, got {text!r}")
    return shard


def _prepare(args):
    from fastlm.prepare import cpu_seconds, prepare, summary

    start, start_cpu = time.perf_counter(), cpu_seconds()
    store = prepare(
        args.sources,
        args.output,
        tokenizer=args.tokenizer,
        train_tokenizer=args.train_tokenizer,
        vocab_size=args.vocab_size,
        doc_boundary=args.doc_boundary,
        text_column=args.text_column,
        append_eos=args.append_eos,
        prepend_bos=args.prepend_bos,
        add_special_tokens=args.add_special_tokens,
        num_proc=args.num_proc,
        shard=args.shard,
        dataset_name=args.dataset_name,
        dataset_config=args.dataset_config,
        split=args.split,
        errors=args.errors,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        encoder=args.encoder,
    )
    print(summary(store, time.perf_counter() - start, cpu_seconds() - start_cpu))
    return 0


def _merge(args):
    from fastlm.prepare import summary
    from fastlm.store import merge_stores

    start = time.perf_counter()
    store = merge_stores(args.stores, args.output, overwrite=args.overwrite)
    print(summary(store, time.perf_counter() - start))
    return 0


def _inspect(args):
    import json

    from fastlm.megatron import MegatronStore
    from fastlm.store import TokenStore

    store = TokenStore.open(args.store, verify=args.verify)
    # Loaded before anything is printed, so a missing or broken tokenizer is the only output.
    tokenizer = _inspect_tokenizer(store, args.tokenizer) if args.docs > 0 and len(store) else None
    print(json.dumps(store.meta, indent=2, sort_keys=True))
    if args.verify:
        print("checksums: OK")
    for line in _store_rates(store):
        print(line)
    if isinstance(store, MegatronStore) and tokenizer is None and args.docs > 0 and len(store):
        print(f"documents not decoded: {store.path} records no tokenizer; pass --tokenizer (the one its ids come from)")
    if tokenizer is not None:
        for i in range(min(args.docs, len(store))):
            doc = store.doc(i)
            print(f"--- document {i} ({doc.shape[0]} tokens)")
            print(tokenizer.decode(doc.tolist()))
    return 0


def _inspect_tokenizer(store, name):
    """--tokenizer, else the store's own; None for a Megatron dataset without --tokenizer (nothing to decode with)."""
    from fastlm.megatron import MegatronStore
    from fastlm.tokenizer import fingerprint, load_tokenizer

    if name is None:
        return None if isinstance(store, MegatronStore) else store.load_tokenizer()
    tokenizer = load_tokenizer(name)
    recorded = store.meta.get("tokenizer_fingerprint")
    if recorded is not None and fingerprint(tokenizer) != recorded:
        raise ValueError(f"--tokenizer {name} is not the tokenizer {store.path} was made with "
                         f"({store.meta.get('tokenizer_name')}): its ids would decode to other text")
    return tokenizer


def _export(args):
    from fastlm.export import export_store

    print(export_store(args.store, args.output, format=args.format, overwrite=args.overwrite, eot_id=args.eot_id))
    return 0


def _store_rates(store):
    if store.doc_bytes is not None and store.n_tokens:
        yield f"text: {store.n_bytes:,} UTF-8 bytes, {store.n_bytes / store.n_tokens:.3f} bytes/token"
    encoding = store.meta.get("encoding")
    if encoding and encoding.get("seconds") and encoding.get("cpu_seconds"):
        yield (
            f"encoding: {encoding['encoder']}, {store.n_tokens / encoding['seconds']:,.0f} tokens/s, "
            f"{store.n_tokens / encoding['cpu_seconds']:,.0f} tokens/s per core "
            f"(num_proc {store.meta.get('args', {}).get('num_proc', 1)})"
        )


def _pack(args):
    from fastlm import pack_blocks, pack_documents
    from fastlm.store import TokenStore

    store = TokenStore.open(args.store)
    pad_id = store.pad_id
    modes = [(f"pack_blocks remainder={mode}", lambda mode=mode: pack_blocks(
        store.tokens, store.offsets, args.block_size, remainder=mode, pad_id=pad_id)) for mode in ("drop", "pad", "keep")]
    modes += [(f"pack_documents overlong={mode}", lambda mode=mode: pack_documents(
        store.tokens, store.offsets, args.block_size, overlong=mode, pad_id=pad_id)) for mode in ("split", "truncate")]
    print(f"{store.path}: {len(store):,} documents, {store.n_tokens:,} tokens, block size {args.block_size}")
    print(f"{'mode':<34} {'blocks':>12} {'tokens':>14} {'fill rate':>10}")
    for name, pack in modes:
        result = pack()
        print(f"{name:<34} {len(result):>12,} {result.n_tokens:>14,} {result.fill_rate:>10.2%}")
    return 0


def _add_cache_commands(commands):
    cache = commands.add_parser("cache", help="list and clean the stores the runner prepared (its data cache)")
    cache_commands = cache.add_subparsers(title="cache commands", required=True, metavar="COMMAND")
    listing = cache_commands.add_parser("list", aliases=["scan"], help="one row per cache entry, and the total")
    listing.add_argument("--json", action="store_true", help="the entries as a JSON list (times in UTC, sizes in bytes)")
    listing.set_defaults(command=_cache_list, command_name="cache list")
    clean = cache_commands.add_parser("clean", help="remove cache entries no run is using (a dry run unless --yes)")
    clean.add_argument("keys", nargs="*", metavar="KEY", help="entries to remove (keys, or their first digits)")
    clean.add_argument("--older-than", metavar="AGE", help="entries last used more than AGE ago: 30d, 12h, 90m, 45s, 2w")
    clean.add_argument("--source", metavar="PATH", help="entries prepared from PATH (a file, a directory of files, "
                                                        "or a dataset name)")
    clean.add_argument("--all", action="store_true", help="every entry")
    clean.add_argument("-y", "--yes", action="store_true",
                       help="remove without asking (else: a question on a terminal, a dry run otherwise)")
    clean.set_defaults(command=_cache_clean, command_name="cache clean")
    for parser in (listing, clean):
        parser.add_argument("--cache-dir", metavar="DIR",
                            help="the cache (the runner's --cache_dir; default: $FASTLM_CACHE/stores, "
                                 "else ~/.cache/fastlm/stores)")


def _cache_list(args):
    import json

    from fastlm import cache

    root = cache.stores_root(args.cache_dir)
    found = cache.entries(root)
    if args.json:
        print(json.dumps([entry.as_json() for entry in found], indent=2))
        return 0
    if not found:
        print(f"no cache entries in {root}")
    else:
        now = time.time()
        rows = [("KEY", "TOKENS", "SIZE", "LAST USED", "CREATED", "TOKENIZER", "SOURCES")]
        rows += [(e.key, f"{e.tokens:,}", _size(e.size), "in use now" if e.in_use else _ago(e.last_used, now),
                  _ago(e.created, now), e.tokenizer, ", ".join(e.sources) or "?") for e in found]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:  # numbers right-aligned; the sources last, as long as they are
            cells = [cell.rjust(w) if i in (1, 2) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
            print("  ".join(cells + [row[-1]]))
        in_use = sum(e.in_use for e in found)
        print(f"{_entries(len(found))}, {sum(e.tokens for e in found):,} tokens, {_size(sum(e.size for e in found))} "
              f"in {root}" + (f" ({in_use} in use)" if in_use else ""))
    others = cache.ignored(root)
    if others and not args.json:
        print(f"left alone (not cache entries): {', '.join(p.name + ('/' if p.is_dir() else '') for p in others)}")
    return 0


def _cache_clean(args):
    from fastlm import cache

    root = cache.stores_root(args.cache_dir)
    if not (args.keys or args.older_than or args.source or args.all):
        raise ValueError("say what to remove: KEY..., --older-than AGE, --source PATH or --all")
    if args.all and (args.keys or args.older_than or args.source):
        raise ValueError("--all removes every entry: give it alone")
    chosen = dict(keys=args.keys, older_than=args.older_than, source=args.source, all=args.all, root=root)
    if not args.yes:
        plan = cache.remove(**chosen, dry_run=True)
        _print_removals(plan, "would remove")
        going = [r.entry for r in plan if r.removed]
        if not going:
            print("nothing to remove: every entry chosen is in use" if plan else f"nothing to remove in {root}")
            return 0
        summary = f"{_entries(len(going))}, {_size(sum(e.size for e in going))}"
        if not sys.stdin.isatty():
            print(f"dry run: {summary} would be freed; add --yes to remove")
            return 0
        if input(f"remove {summary}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
        chosen = dict(keys=[e.key for e in going], root=root)
    done = cache.remove(**chosen)
    _print_removals(done, "removed")
    freed = [r.entry for r in done if r.removed]
    print(f"removed {_entries(len(freed))}, {_size(sum(e.size for e in freed))} freed" if done
          else f"nothing to remove in {root}")
    return 0


def _print_removals(removals, verb):
    now = time.time()
    why = {"in use": "in use by a running process", "gone": "already removed", "changed": "changed since listed"}
    for r in removals:
        e = r.entry
        what = f"{e.key}  {_size(e.size):>9}  last used {_ago(e.last_used, now)}  {', '.join(e.sources) or '?'}"
        print(f"{verb} {what}" if r.removed else f"kept {what} ({why[r.skipped]})")


def _entries(n):
    return f"{n} entry" if n == 1 else f"{n} entries"


def _size(n_bytes):
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} TB"


def _ago(seconds, now):
    age = max(0.0, now - seconds)
    for limit, unit, label in ((90, 1, "s"), (90 * 60, 60, "min"), (36 * 3600, 3600, "h")):
        if age < limit:
            return f"{age / unit:.0f} {label} ago"
    return f"{age / 86400:.0f} days ago"


if __name__ == "__main__":
    sys.exit(main())
