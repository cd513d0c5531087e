"""Benchmark the data pipeline on a ~20 MB, 32,000-conversation file: stats and first-run tokenization.

    python scripts/bench_data.py                 # generate, then time first run / cached run / stats
    python scripts/bench_data.py --peer          # also lyra's previous encoder, side by side

The file is generated from the embedded corpus (real-shaped seed records: 1-2 corpus conversations
joined into one, ~60% single-reply), so its token lengths are those of real persona chats. Every
figure is wall-clock seconds on this machine; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
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


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=32000)
    parser.add_argument("--peer", action="store_true", help="also time lyra's previous encoder on the same file")
    args = parser.parse_args()
    from lyra.data.prepare import prepare_file
    from lyra.data.stats import prepared_stats, qwen3_tokenizer, training_defaults

    max_length, system_prompt = training_defaults()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        generate(path, args.conversations)
        timings: dict[str, float] = {}

        def timed(name, function):
            started, cpu = time.perf_counter(), _cpu_seconds()
            result = function()
            timings[f"{name}_wall_s"] = time.perf_counter() - started
            timings[f"{name}_cpu_s"] = _cpu_seconds() - cpu  # this process + its (joined) render workers
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
        if args.peer:
            peer = timed("peer_turn_by_turn",
                         lambda: previous_encoder(prepared.conversations, tokenizer, max_length, system_prompt))
            assert peer == [e["input_ids"] for e in examples]  # same examples, token for token
            timings["speedup_vs_peer_cpu"] = (timings["peer_turn_by_turn_cpu_s"]
                                              / timings["first_run_read_and_tokenize_cpu_s"])
        print(json.dumps({"file_mb": round(path.stat().st_size / 1e6, 1), "conversations": stats["conversations"],
                          "examples": len(examples), "load_average": os.getloadavg(), "cpus": os.cpu_count(),
                          **{k: round(v, 2) for k, v in timings.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
