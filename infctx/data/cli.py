"""`infctx data build ...` and `infctx data inspect PREFIX`."""

from __future__ import annotations

import argparse
import sys

from infctx.data.records import RecordFormat


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infctx data", description="build and inspect binidx datasets")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="tokenise JSONL / text / Hugging Face datasets into binidx")
    b.add_argument("inputs", nargs="*", help="files, globs, directories, save_to_disk folders or dataset names")
    b.add_argument("--config", help="YAML build config (one build, or several under `builds:`)")
    b.add_argument("--output", "-o", help="output path prefix (writes PREFIX.bin/.idx/.meta.json)")
    b.add_argument("--tokenizer", default="world", help="world | bytes | path to a tokenizer.json (default world)")
    b.add_argument("--vocab-size", type=int, help="declared vocabulary (default: the tokenizer's)")
    b.add_argument("--format", default="text", choices=RecordFormat.KINDS, help="record format (default text)")
    b.add_argument("--text-key", default="text")
    b.add_argument("--prompt-key", default="prompt")
    b.add_argument("--completion-key", default="completion")
    b.add_argument("--messages-key", default="messages")
    b.add_argument("--template", help="template with {column} fields (format template)")
    b.add_argument("--completion-template", help="trained part of a template (writes a mask sidecar)")
    b.add_argument("--kind", default="auto", choices=["auto", "jsonl", "text", "hf", "hf_disk"], help="input kind")
    b.add_argument("--split", default="train", help="dataset split (Hugging Face inputs)")
    b.add_argument("--name", help="dataset configuration name (Hugging Face inputs)")
    b.add_argument("--data-files", nargs="+", help="data_files for load_dataset (e.g. with input 'json')")
    b.add_argument("--streaming", action="store_true", help="stream the Hugging Face dataset")
    b.add_argument("--text-split", default="document", choices=["document", "paragraph", "line"],
                   help="plain text: one document per file, per blank-line paragraph, or per line")
    b.add_argument("--ctx-len", type=int, action="append", help="ctx_len to compute a magic prime for (repeatable)")
    b.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
    b.add_argument("--chunk-mb", type=float, default=4.0, help="input per work unit in MB")
    b.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    b.add_argument("--force", action="store_true", help="rebuild even if a matching finished output exists")
    b.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    i = sub.add_parser("inspect", help="print header, counts, length histogram and a few documents")
    i.add_argument("prefix", help="binidx path prefix (without .bin/.idx)")
    i.add_argument("--docs", type=int, default=3, help="documents to decode")
    i.add_argument("--chars", type=int, default=300, help="characters shown per document")
    i.add_argument("--tokenizer", help="tokenizer to decode with (default: from the metadata)")
    return p


def _build(args) -> None:
    from infctx.data.builder import BuildConfig, build, build_from_config
    from infctx.data.sources import InputSpec

    # only what was given on the command line overrides a config file
    overrides = {k: v for k, v in (("workers", args.workers), ("strict", args.strict or None),
                                   ("force", args.force or None), ("progress", False if args.quiet else None)) if v is not None}
    if args.config:
        if args.inputs or args.output:
            raise ValueError("give either --config or inputs with --output, not both")
        build_from_config(args.config, **overrides)
        return
    if not args.inputs or not args.output:
        raise ValueError("give input paths and --output PREFIX (or --config FILE)")
    fmt = RecordFormat(kind=args.format, text_key=args.text_key, prompt_key=args.prompt_key,
                       completion_key=args.completion_key, messages_key=args.messages_key,
                       template=args.template, completion_template=args.completion_template)
    specs = [InputSpec(path=p, kind=args.kind, split=args.split, name=args.name, data_files=args.data_files,
                       streaming=args.streaming, text_split=args.text_split) for p in args.inputs]
    build(BuildConfig(inputs=specs, output=args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                      format=fmt, ctx_lens=args.ctx_len or [4096], chunk_bytes=int(args.chunk_mb * (1 << 20)),
                      **overrides))


def main(argv: list[str]) -> int:
    from infctx.data.builder import BuildError

    args = _parser().parse_args(argv)
    try:
        if args.cmd == "build":
            _build(args)
        else:
            from infctx.data.inspect import describe

            print(describe(args.prefix, docs=args.docs, chars=args.chars, tokenizer=args.tokenizer))
    except (BuildError, ValueError, FileNotFoundError) as err:
        print(f"infctx data {args.cmd}: {err}", file=sys.stderr)
        return 1
    return 0
