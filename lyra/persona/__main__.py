"""The persona command line: a character card becomes a lyra persona you can train.

    python -m lyra.persona import CARD --out my_conf [--user-address NAME] [--chats FILE ...]
                                       [--language en|zh-TW] [--slug NAME] [--eval-share 0.1] [--seed 0]

CARD is a Character Card V1/V2/V3 as JSON, a PNG card (`chara`/`ccv3` chunk), a CHARX zip or a
text-generation-webui character YAML (lyra.persona.cards lists the fields read). It writes
`<out>/persona/<slug>.yaml` and `<out>/data/<slug>_{seed,probes}.jsonl` (+ `_train`/`_eval` with
--chats), prints one line per gap it filled, and ends with the commands that train the persona.
A bad or unsafe file prints one `lyra: error: ...` line and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from lyra.errors import UserError, exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lyra.persona", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    card = commands.add_parser("import", help="a character card (+ your chats) -> persona files to train")
    card.add_argument("card", metavar="CARD", help="card file: .json, .png, .charx, .yaml")
    card.add_argument("--out", required=True, metavar="DIR",
                      help="config dir to write (persona/ and data/ inside); train with --config-dir DIR")
    card.add_argument("--user-address", default=None, metavar="NAME",
                      help="what {{user}} becomes and address_rate counts (default: the card's lyra export "
                           "value, else User)")
    card.add_argument("--chats", nargs="+", default=[], metavar="FILE",
                      help="your own logs with this character, any format `python -m lyra.data validate` reads")
    card.add_argument("--language", default=None, choices=("en", "zh-TW"),
                      help="the persona's language (default: detected from the card)")
    card.add_argument("--slug", default=None, help="the persona's file name, persona=SLUG (default: from the name)")
    card.add_argument("--eval-share", type=float, default=None, metavar="F",
                      help="share of the --chats conversations held out as the eval split (default 0.1)")
    card.add_argument("--seed", type=int, default=0, help="seed of the train/eval shuffle (default 0)")
    card.add_argument("--overwrite", action="store_true", help="replace an existing persona of the same slug")
    return parser


def run_import(args) -> int:
    from lyra.persona.cards import EVAL_SHARE, import_card

    result = import_card(args.card, args.out, user_address=args.user_address, chats=args.chats,
                         language=args.language, slug=args.slug,
                         eval_share=EVAL_SHARE if args.eval_share is None else args.eval_share,
                         seed=args.seed, overwrite=args.overwrite)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(str(path) for path in result.files)}")
    smoke, cpu_real, gpu = result.commands
    print("train it, from this directory:")
    print(f"  {smoke}      # a minute on CPU, tiny model: proves the files")
    print(f"  {cpu_real}   # SmolLM2-135M on CPU, English")
    print(f"  {gpu}                       # Qwen3-0.6B 4-bit on a GPU")
    return 0


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error():
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command == "import":
            return run_import(args)
        raise UserError(None, f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
