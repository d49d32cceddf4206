"""The `fastlm` command.

    fastlm prepare wiki.train.raw -o data/wiki --tokenizer gpt2 --append-eos --num-proc 4
    fastlm prepare --dataset wikitext --dataset-config wikitext-2-raw-v1 --split train -o data/wiki --tokenizer gpt2
    fastlm prepare big.txt -o data/part3 --tokenizer gpt2 --shard 3/8    (one job of 8; then fastlm merge)
    fastlm merge shard0 shard1 -o data/all
    fastlm inspect data/wiki --docs 3
    fastlm pack data/wiki --block-size 128
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
        # Bad input is the user's to fix: one clear line (library messages may span several), no traceback.
        print(f"fastlm {args.command_name}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


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
    inspect.set_defaults(command=_inspect, command_name="inspect")

    pack = commands.add_parser("pack", help="blocks and fill rate of every packing mode over a store")
    pack.add_argument("store")
    pack.add_argument("--block-size", type=int, required=True)
    pack.set_defaults(command=_pack, command_name="pack")

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

    from fastlm.store import TokenStore

    store = TokenStore.open(args.store, verify=args.verify)
    # Loaded before anything is printed, so a missing or broken tokenizer is the only output.
    tokenizer = store.load_tokenizer() if args.docs > 0 and len(store) else None
    print(json.dumps(store.meta, indent=2, sort_keys=True))
    if args.verify:
        print("checksums: OK")
    for line in _store_rates(store):
        print(line)
    if tokenizer is not None:
        for i in range(min(args.docs, len(store))):
            doc = store.doc(i)
            print(f"--- document {i} ({doc.shape[0]} tokens)")
            print(tokenizer.decode(doc.tolist()))
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


if __name__ == "__main__":
    sys.exit(main())
