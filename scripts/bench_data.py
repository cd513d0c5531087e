"""Benchmark the data pipeline on a ~20 MB, 32,000-conversation file: stats and first-run tokenization.

    python scripts/bench_data.py                 # generate, time first run / cached run / stats, check every record
    python scripts/bench_data.py --check-every 8 # check every 8th record against the per-turn reference only
    python scripts/bench_data.py --peer          # also lyra's previous encoder, side by side

The file is generated from the embedded corpus (real-shaped seed records: 1-2 corpus conversations
joined into one, ~60% single-reply), so its token lengths are those of real persona chats. Each step
reports three clocks, because a shared machine stretches wall time: `_wall_s`, `_process_s`
(time.process_time: this process, every thread, the tokenizer's Rust threads included) and `_cpu_s`
(getrusage user + system of this process and its waited-for children). The first run's examples
are then compared, ids and labels, with the per-turn template path (`encode_conversation`: two
template renders and two whole-text tokenizations per turn) and the count of records found equal
is printed; any difference stops the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from lyra.data import corpus_file


def generate(path: Path, conversations: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    source = [json.loads(line) for line in corpus_file("train").read_text(encoding="utf-8").splitlines()]
    with path.open("w", encoding="utf-8") as out:
        for index in range(conversations):
            turns = []
            for record in rng.sample(source, rng.choice([1, 1, 1, 2, 2])):
                turns += [turn for turn in record["conversations"] if turn["from"] != "system"]
            turns[-1] = dict(turns[-1], value=f"{turns[-1]['value']}（第{index}則）")  # no exact duplicates
            out.write(json.dumps({"id": f"bench-{index}", "conversations": turns}, ensure_ascii=False) + "\n")


def previous_encoder(conversations, tokenizer, max_length: int, system_prompt: str | None) -> list[list[int]]:
    """lyra's encoder before the shared prepare step: two tokenizing template calls per turn, one turn at a time."""
    from lyra.data.tokenization import with_system_prompt

    def ids(messages, **kwargs):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=False, return_dict=True,
                                                  **kwargs)["input_ids"])

    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for conversation in conversations:
        messages = with_system_prompt(conversation.messages, system_prompt)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, full = ids(messages[:index], add_generation_prompt=True), ids(messages[: index + 1])
            input_ids = full[: full.index(end_id, len(prompt)) + 1]
            if len(input_ids) > max_length:
                break
            examples.append(input_ids)
    return examples


def _clocks() -> tuple[float, float, float]:
    """(wall, process CPU incl. threads, rusage CPU of this process and its children) in seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (time.perf_counter(), time.process_time(),
            own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime)


def check_against_reference(prepared, tokenizer, max_length: int, system_prompt: str | None, every: int
                            ) -> tuple[int, int]:
    """(records, examples) of every `every`-th record whose examples equal the per-turn reference's."""
    from lyra.data.tokenization import IGNORE_INDEX, encode_conversation, truncate

    records = examples = 0
    for conversation, turns in list(zip(prepared.conversations, prepared.turns))[::every]:
        first_run = truncate([(ids, [IGNORE_INDEX] * prompt + ids[prompt:]) for ids, prompt in turns], max_length)
        if first_run != encode_conversation(conversation, tokenizer, max_length, system_prompt):
            raise SystemExit(f"{conversation.id}: the first run's ids or labels differ from the per-turn reference")
        records += 1
        examples += len(first_run)
    return records, examples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=32000)
    parser.add_argument("--peer", action="store_true", help="also time lyra's previous encoder on the same file")
    parser.add_argument("--check-every", type=int, default=1, metavar="N",
                        help="compare every Nth record with the per-turn reference (default 1: all; 0: none)")
    args = parser.parse_args()
    from lyra.data.prepare import prepare_file
    from lyra.data.stats import prepared_stats, qwen3_tokenizer, training_defaults

    max_length, system_prompt = training_defaults()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        generate(path, args.conversations)
        timings: dict[str, float] = {}

        def timed(name, function):
            before = _clocks()
            result = function()
            for clock, start, end in zip(("wall", "process", "cpu"), before, _clocks()):
                timings[f"{name}_{clock}_s"] = end - start
            return result

        tokenizer = timed("tokenizer_load", qwen3_tokenizer)
        prepared = timed("first_run_read_and_tokenize",
                         lambda: prepare_file(path, tokenizer, system_prompt, cache_dir=Path(tmp) / "cache"))
        examples, _ = timed("examples", lambda: prepared.examples(max_length))
        timed("training_dataset", lambda: prepared.dataset(max_length))  # what build_datasets hands the Trainer
        stats = timed("stats_from_tokenized", lambda: prepared_stats(prepared, max_length))
        cached = timed("cached_run_read_and_load",
                       lambda: prepare_file(path, tokenizer, system_prompt, cache_dir=Path(tmp) / "cache"))
        assert cached.from_cache and cached.turns == prepared.turns
        checked = {}
        if args.check_every > 0:
            records, compared = timed("reference_check", lambda: check_against_reference(
                prepared, tokenizer, max_length, system_prompt, args.check_every))
            checked = {"records_equal_to_reference": records, "examples_equal_to_reference": compared}
        if args.peer:
            peer = timed("peer_turn_by_turn",
                         lambda: previous_encoder(prepared.conversations, tokenizer, max_length, system_prompt))
            assert peer == [e["input_ids"] for e in examples]  # same examples, token for token
            timings["speedup_vs_peer_cpu"] = (timings["peer_turn_by_turn_cpu_s"]
                                              / timings["first_run_read_and_tokenize_cpu_s"])
        print(json.dumps({"file_mb": round(path.stat().st_size / 1e6, 1), "conversations": stats["conversations"],
                          "examples": len(examples), **checked, "rendering": asdict(prepared.rendering),
                          "load_average": os.getloadavg(), "cpus": os.cpu_count(),
                          **{k: round(v, 2) for k, v in timings.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
