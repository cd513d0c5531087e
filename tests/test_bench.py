"""scripts/bench_train.py: a seconds-long smoke run of both variants (in-process to skip two
interpreter start-ups), the report's keys and parity, and the child command line round trip."""

from __future__ import annotations

import argparse
import importlib.util
import json

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("bench_train", REPO_ROOT / "scripts" / "bench_train.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SMOKE = ["--steps", "1", "--batch-size", "2", "--max-length", "128", "--json"]


def test_child_command_round_trips_the_options():
    args = argparse.Namespace(model="small", steps=3, batch_size=5, max_length=256,
                                                        new_tokens=7, generate=True)
    command = bench.child_command(args, "kv_cache")
    assert command[2:] == ["--variant", "kv_cache", "--model", "small", "--steps", "3", "--batch-size", "5",
                           "--max-length", "256", "--new-tokens", "7", "--generate"]


def test_bench_smoke_reports_both_variants(monkeypatch, capsys):
    def in_process(args, variant):
        args.variant = variant
        return json.loads(json.dumps(bench.run_variant(args)))

    monkeypatch.setattr(bench, "run_child", in_process)
    assert bench.main(SMOKE) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "command: python scripts/bench_train.py " + " ".join(SMOKE)
    report = json.loads(lines[-1])
    assert {"speedup", "memory_ratio", "loss_parity", "machine", "command"} <= report.keys()
    baseline, lyra = report["variants"]["baseline"], report["variants"]["lyra"]
    for row in (baseline, lyra):
        assert {"conversation_tokens_per_s", "supervised_tokens_per_s", "pad_fraction",
                "training_memory_bytes"} <= row.keys()
        assert row["steps"] == 1 and row["conversation_tokens_per_s"] > 0
    # same examples: the seed-style run supervises every token, lyra only the replies
    assert baseline["supervised_tokens_per_s"] / baseline["conversation_tokens_per_s"] > 0.95
    assert lyra["supervised_tokens_per_s"] < lyra["conversation_tokens_per_s"]
    assert baseline["pad_fraction"] > lyra["pad_fraction"]
    assert report["loss_parity"] is True and lyra["loss_parity"]["max_abs_diff"] <= 1e-4
    assert report["speedup"] == lyra["conversation_tokens_per_s"] / baseline["conversation_tokens_per_s"]
