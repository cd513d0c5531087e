"""The data command line: convert transcripts, validate files, describe a corpus.

    python -m lyra.data convert IN.txt OUT.jsonl [--label Guest=user]
    python -m lyra.data validate FILE [FILE ...]        # exit 0 trainable, 1 with FILE:LINE problems
    python -m lyra.data validate chat.jsonl --label Kyon=user --label Haruhi=assistant   # speaker names
    python -m lyra.data stats [FILE] [--split eval] [--max-length N] [--json]
    python -m lyra.data pairs run_dir=R --out pairs.jsonl [--from base|run] [--max-pairs N]

`validate` and `stats` read and encode a file exactly as training does (`lyra.data.prepare`): a
file `validate` passes trains. Preference pairs (chosen/rejected records, lyra.data.preference) are
recognised by their first record and read, checked and counted as `objective=dpo|orpo` trains them.
`pairs` builds persona pairs from a run (lyra.pairs). Without FILE, `stats` describes the embedded default-persona corpus (`--split train|eval`). User mistakes
(a missing file, a bad option) print one `lyra: error: ...` line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lyra.data import corpus_file
from lyra.data.records import format_problems
from lyra.data.txt import convert_txt_to_jsonl, parse_label_options
from lyra.errors import UserError, exit_on_user_error


def _existing_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(None, f"file not found: {path}")
    return path


def _add_label_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label", action="append", default=[], metavar="LABEL=ROLE",
                        help="extra .txt role label or speaker name, e.g. Guest=user or Maid=assistant (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lyra.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="a .txt transcript -> seed-format JSONL (atomic write)")
    convert.add_argument("input", help="the transcript (.txt)")
    convert.add_argument("output", help="the JSONL file to write")
    _add_label_option(convert)

    validate = commands.add_parser("validate", help="list every problem as FILE:LINE: message")
    validate.add_argument("files", nargs="+", metavar="FILE", help=".jsonl, .json or .txt")
    validate.add_argument("--system-prompt", default=None,
                          help="system prompt added to conversations without one (default: data.system_prompt)")
    _add_label_option(validate)

    stats = commands.add_parser("stats", help="counts, duplicates, token lengths, truncation")
    stats.add_argument("file", nargs="?", metavar="FILE", help="default: the embedded default-persona corpus")
    stats.add_argument("--split", choices=("train", "eval"), default=None,
                       help="embedded corpus split (default train); only without FILE")
    stats.add_argument("--max-length", type=int, default=None,
                       help="tokens per example, as data.max_length (default: that of a default training run)")
    stats.add_argument("--system-prompt", default=None,
                       help="system prompt added to conversations without one (default: data.system_prompt)")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    _add_label_option(stats)

    pairs = commands.add_parser("pairs", help="chosen = the corpus reply, rejected = an out-of-character generation")
    pairs.add_argument("run_dir", help="a training run's output dir (run_dir=DIR or DIR)")
    pairs.add_argument("--out", required=True, help="the JSONL of pairs to write (atomic)")
    pairs.add_argument("--from", dest="source", choices=("base", "run"), default="base",
                       help="who writes the rejected reply: the base model (adapter off, default) or the run itself")
    pairs.add_argument("--max-pairs", type=int, default=None,
                       help="generate for a random sample of this many assistant turns (default: all)")
    pairs.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    pairs.add_argument("--max-new-tokens", type=int, default=128, help="longest generated reply")
    pairs.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    pairs.add_argument("--seed", type=int, default=0, help="the sample of turns and the sampling")
    return parser


def run_convert(args) -> int:
    count = convert_txt_to_jsonl(_existing_file(args.input), args.output, parse_label_options(args.label))
    print(f"wrote {count} conversations to {args.output}")
    return 0


def _settings(args) -> tuple[int, str | None]:
    """(max_length, system_prompt): the options, else those of a default training run."""
    max_length, system_prompt = getattr(args, "max_length", None), args.system_prompt
    if max_length is None or system_prompt is None:
        from lyra.data.stats import training_defaults

        default_length, default_prompt = training_defaults()
        max_length = max_length if max_length is not None else default_length
        system_prompt = system_prompt if system_prompt is not None else default_prompt
    if max_length < 1:
        raise UserError("--max-length", f"must be >= 1, got {max_length}")
    return max_length, system_prompt or None


def _prepare(path: Path, args, system_prompt: str | None):
    """The file read and encoded exactly as training does (`lyra.data.prepare`), with its cache."""
    from lyra.data.prepare import default_cache_dir, prepare_file
    from lyra.data.stats import qwen3_tokenizer

    return prepare_file(path, qwen3_tokenizer(), system_prompt, parse_label_options(args.label), default_cache_dir())


def _prepare_pairs(path: Path, system_prompt: str | None):
    """A preference file read and encoded exactly as objective=dpo|orpo does (lyra.data.preference)."""
    from lyra.data.preference import prepare_pairs
    from lyra.data.stats import qwen3_tokenizer

    return prepare_pairs(path, qwen3_tokenizer(), system_prompt)


def run_validate(args) -> int:
    from lyra.data.preference import is_preference_file

    _, system_prompt = _settings(args)
    failed = False
    for name in args.files:
        path = _existing_file(name)
        if is_preference_file(path):
            prepared = _prepare_pairs(path, system_prompt)
            for note in prepared.notes():
                print(note, file=sys.stderr)
            if prepared.problems:
                failed = True
                print(format_problems(prepared.problems, limit=None))
                print(f"{path}: {len(prepared.problems)} problem(s), {len(prepared.pairs)} valid pair(s)", file=sys.stderr)
            else:
                print(f"{path}: ok, {len(prepared.pairs)} preference pairs")
            continue
        prepared = _prepare(path, args, system_prompt)
        problems = prepared.problems
        if problems:
            failed = True
            print(format_problems(problems))  # grouped, at most MAX_REPORTED_PROBLEMS lines per file
        for note in prepared.notes():
            print(note, file=sys.stderr)
        if problems:
            print(f"{path}: {len(problems)} problem(s), {len(prepared.conversations)} valid conversation(s)",
                  file=sys.stderr)
        else:
            turns = sum(len(t) for t in prepared.turns)
            print(f"{path}: ok, {len(prepared.conversations)} conversations, {turns} assistant turns")
    return 1 if failed else 0


def run_stats(args) -> int:
    from lyra.data.stats import format_stats, prepared_stats

    if args.file and args.split:
        raise UserError("--split", "selects a split of the embedded corpus; drop it when giving FILE")
    if args.file:
        path, source = _existing_file(args.file), args.file
    else:
        split = args.split or "train"
        path = corpus_file(split)
        source = f"{path.name} (embedded default-persona corpus, {split} split)"
    max_length, system_prompt = _settings(args)
    from lyra.data.preference import format_pair_stats, is_preference_file, pair_stats

    if is_preference_file(path):
        prepared = _prepare_pairs(path, system_prompt)
        if not prepared.pairs:
            raise UserError(str(path), f"no usable pair:\n{format_problems(prepared.problems)}")
        stats = {**pair_stats(prepared, max_length), "file": str(path), "skipped_invalid": prepared.skipped}
        print(json.dumps(stats, ensure_ascii=False, indent=2) if args.json else format_pair_stats(stats, source))
        return 0
    prepared = _prepare(path, args, system_prompt)
    if not prepared.conversations:
        raise UserError(str(path), f"no usable conversation:\n{format_problems(prepared.problems)}")
    stats = prepared_stats(prepared, max_length)
    stats["file"] = str(path)
    stats["skipped_invalid"] = prepared.skipped
    print(json.dumps(stats, ensure_ascii=False, indent=2) if args.json else format_stats(stats, source))
    return 0


def run_pairs(args) -> int:
    from lyra.pairs import build_pairs, write_pairs
    from lyra.paths import resolve_user_path
    from lyra.runs import load_run

    if args.max_pairs is not None and args.max_pairs < 1:
        raise UserError("--max-pairs", f"must be >= 1, got {args.max_pairs}")
    if args.batch_size < 1:
        raise UserError("--batch-size", f"must be >= 1, got {args.batch_size}")
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.temperature == 0:
        generation["do_sample"] = False
    else:
        import torch

        torch.manual_seed(args.seed)
    from lyra.generation import check_generation

    check_generation(generation, key="--")  # before the model loads
    run = load_run(args.run_dir.removeprefix("run_dir="), merge=False)  # PEFT: the adapter can be switched off
    report = build_pairs(run, source=args.source, max_pairs=args.max_pairs, batch_size=args.batch_size,
                         seed=args.seed, **generation)
    out = resolve_user_path(args.out)
    write_pairs(report.pairs, out)
    print(report.summary())
    print(f"wrote {len(report.pairs)} pairs to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        return {"convert": run_convert, "validate": run_validate, "stats": run_stats,
                "pairs": run_pairs}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
