"""One parity check: the same probes, greedy, through every way a trained persona is served.

    python -m lyra.evaluate run_dir=R targets=hf,merged,gguf,server
    python -m lyra.evaluate run_dir=R targets=hf,merged,gguf eval.num_probes=4 eval.generation.max_new_tokens=48

    from lyra.parity import parity_check, format_parity
    report = parity_check(run_dir, ["hf", "merged", "gguf"], probes, persona, generation)
    print(format_parity(report))

Every target gets each probe prompt as a lone user message, with no system message: each must add
the persona's prompt by itself, as it will for a user whose frontend sends none.
    hf      the PEFT model as trained (lyra.runs.load_run(merge=False); a 4-bit base stays 4-bit),
            prompted by lyra.generation, the training prompt path. The reference.
    merged  what `lyra.export` ships: the adapter merged into the float32 base
            (lyra.runs.load_full_precision_merged), prompted through the export's chat template
    gguf    `lyra.export format=gguf` run by llama.cpp (llama-cpp-python: `pip install 'lyra[gguf-runtime]'`):
            the file's embedded template rendered as llama-cpp-python renders it, tokenized by llama.cpp
    server  `python -m lyra.serve` on a free local port, asked through the official `openai` client

Per target: the persona metrics (lyra.persona), the share of replies equal to the reference's
(clean text; token ids too where the target exposes them), whether its prompt ids equal lyra's
(the server: `usage.prompt_tokens` against lyra's count), and whether each reply stopped at a turn
end where the reference's did. A target whose runtime is missing is skipped with the reason; a
target that fails carries its error; every target that disagrees is named in one line.

Decoding is lyra's greedy rule everywhere: the argmax after transformers' repetition penalty
(each token of prompt and reply, once). llama.cpp's own `repeat_penalty` counts only the last 64
sampled tokens, so on llama.cpp lyra applies its rule to llama.cpp's logits: what is compared is
the file, its template, its tokenizer and the runtime's arithmetic, not two sampler designs.

The llama.cpp code (the cached export, load_llama, the runner and lyra's greedy rule on its logits) is
lyra.engines', shared with the llamacpp engine that chat, web and the server can serve with.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lyra.engines import GGUF_RUNTIME_HINT, LlamaCppRunner, export_gguf, gguf_cache_dir, hydra_override, lyra_env
from lyra.errors import UserError
from lyra.persona import metric_names, persona_metrics

log = logging.getLogger(__name__)

TARGETS = ("hf", "merged", "gguf", "server")
REFERENCE = "hf"
# What the gguf and server targets can reproduce of a greedy generation group; the rest are ignored by greedy.
_PORTABLE = ("do_sample", "temperature", "max_new_tokens", "repetition_penalty")
_IGNORED_BY_GREEDY = ("top_p", "top_k", "min_p", "typical_p")
_SERVER_LOG_LINES = 3  # lines of a failed server's output quoted in the report


@dataclass
class TargetRun:
    """What one target answered: Reply objects (lyra.generation), prompt-id checks, notes."""

    name: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""  # why skipped or failed
    replies: list = field(default_factory=list)
    prompt_ids_equal: list = field(default_factory=list)  # per probe: True/False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- validation

def parse_targets(value: Any) -> list[str]:
    """`hf,merged,gguf,server` (a string or a list) as a list in the given order, duplicates dropped."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names = list(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    unknown = [name for name in names if name not in TARGETS]
    if unknown or not names:
        raise UserError("targets", f"{', '.join(unknown) or 'nothing'} is not a target; choose from "
                                   f"{','.join(TARGETS)} (e.g. targets=hf,merged)")
    return names


def check_parity_generation(generation: Mapping[str, Any], targets: Sequence[str]) -> None:
    """Greedy, and nothing the gguf and server targets cannot reproduce; one line naming the key."""
    greedy = generation.get("do_sample") is False or generation.get("temperature") == 0
    if not greedy:
        raise UserError("eval.generation.do_sample", "the parity check compares greedy replies; "
                                                     "set eval.generation.do_sample=false")
    if {"gguf", "server"} & set(targets):
        for key, value in generation.items():
            if value is not None and key not in _PORTABLE + _IGNORED_BY_GREEDY:
                raise UserError(f"eval.generation.{key}", "the gguf and server targets reproduce only "
                                                          f"{', '.join(_PORTABLE)}; drop it for the parity check")


def missing_runtime(target: str) -> str | None:
    """Why `target` cannot run in this environment (None = it can)."""
    if target == "gguf" and importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: {GGUF_RUNTIME_HINT}"
    if target == "server":
        if importlib.util.find_spec("lyra.serve") is None:
            return "this lyra has no lyra.serve (the OpenAI-compatible server)"
        if importlib.util.find_spec("openai") is None:
            return "the openai client is not installed: pip install openai"
    return None


# ---------------------------------------------------------------- the check

def parity_check(run_dir: Path, targets: Sequence[str], probes: Sequence, persona: Mapping,
                 generation: Mapping[str, Any], adapter: str = "adapter", device: str | None = None,
                 gguf_type: str = "f16", gguf_cache: bool = True, server_start_timeout_s: float = 300) -> dict:
    """Run `probes` through each target; the report `format_parity` prints (JSON-ready)."""
    from lyra.gguf import check_gguf_type
    from lyra.runs import adapter_dir, check_adapter_base, load_run_config

    targets = parse_targets(targets)
    generation = dict(generation)
    check_parity_generation(generation, targets)
    check_gguf_type(gguf_type)
    adapter_path = adapter_dir(run_dir, adapter)
    if adapter_path is None:
        raise UserError("adapter", "the parity check compares ways of serving a trained adapter; "
                                   "adapter=none has none")
    check_adapter_base(adapter_path, load_run_config(run_dir).model)
    skipped = {name: reason for name in targets if (reason := missing_runtime(name))}
    for name, reason in skipped.items():
        print(f"parity: {name} skipped: {reason}", flush=True)

    import torch

    from lyra.generation import build_prompt_ids
    from lyra.runs import load_run

    run = load_run(run_dir, adapter=adapter, device=device, merge=False)
    tokenizer = run.tokenizer
    prompts = [build_prompt_ids(p.prompt, tokenizer, system_prompt=run.system_prompt) for p in probes]
    results: dict[str, TargetRun] = {}
    for name in targets:
        result = TargetRun(name)
        results[name] = result
        if name in skipped:
            result.status, result.reason = "skipped", skipped[name]
            continue
        if name != "hf" and run.model is not None:  # one model in memory at a time
            run.model = None
            gc.collect()
        started = time.perf_counter()
        try:
            if name == "hf":
                _run_hf(result, run, prompts, generation)
            elif name == "merged":
                _run_merged(result, run, adapter_path, probes, prompts, generation, device, torch.float32)
            elif name == "gguf":
                _run_gguf(result, run, adapter, adapter_path, probes, prompts, generation, device, gguf_type,
                          gguf_cache)
            else:
                _run_server(result, run, adapter, probes, prompts, generation, server_start_timeout_s)
        except UserError as error:
            result.status, result.reason = "failed", str(error)
        except Exception as error:  # reported as this target's failure; the other targets still run
            log.warning("parity target %s failed", name, exc_info=True)
            result.status, result.reason = "failed", f"{type(error).__name__}: {error}"
        result.seconds = time.perf_counter() - started
        print(f"parity: {name} {result.status}{': ' + result.reason if result.reason else ''} "
              f"({result.seconds:.0f} s)", flush=True)
    return _report(results, probes, persona, generation, prompts, gguf_type)


def _run_hf(result: TargetRun, run, prompts, generation) -> None:
    from lyra.generation import generate_in_batches

    # one prompt at a time, as chat and the server generate: left padding can flip a near-tied argmax
    result.replies = generate_in_batches(prompts, run.model, run.tokenizer, 1, **generation)
    result.prompt_ids_equal = [True] * len(prompts)
    result.notes.append("lyra's own prompt path (lyra.generation), PEFT adapter on the base as trained")


def _run_merged(result: TargetRun, run, adapter_path: Path, probes, prompts, generation, device, dtype) -> None:
    from lyra.data.tokenization import chat_prompt_ids, template_with_system_prompt
    from lyra.generation import generate_in_batches
    from lyra.runs import load_full_precision_merged, load_run_tokenizer

    tokenizer = load_run_tokenizer(run.run_dir, adapter_path, run.cfg.model)  # a copy that carries the export's template
    if run.system_prompt:
        tokenizer.chat_template = template_with_system_prompt(tokenizer.chat_template, run.system_prompt)
    ids = [chat_prompt_ids([{"role": "user", "content": p.prompt}], tokenizer) for p in probes]
    result.prompt_ids_equal = [a == b for a, b in zip(ids, prompts)]
    model = load_full_precision_merged(run.cfg, adapter_path, dtype, device)
    try:
        result.replies = generate_in_batches(ids, model, tokenizer, 1, **generation)
    finally:
        del model
        gc.collect()
    result.notes.append(f"adapter merged into the {str(dtype).removeprefix('torch.')} base; the export's chat template")


# ---------------------------------------------------------------- gguf (llama.cpp)

def _run_gguf(result: TargetRun, run, adapter: str, adapter_path: Path, probes, prompts, generation, device,
              gguf_type: str, cache: bool) -> None:
    import torch

    from lyra.generation import reply_cleaner

    with ExitStack() as stack:
        if cache:
            output_dir = gguf_cache_dir(run.run_dir, adapter_path, gguf_type)
        else:
            output_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lyra-parity-"))) / "gguf"
        gguf_file = export_gguf(run.run_dir, adapter, adapter_path, gguf_type, device, output_dir)
        result.notes.append(f"{gguf_file}" if cache else f"lyra.export format=gguf gguf.type={gguf_type} (temp dir)")
        max_new = int(generation.get("max_new_tokens") or 256)
        llm = LlamaCppRunner(gguf_file, n_ctx=max(map(len, prompts)) + max_new + 8,
                             n_threads=torch.get_num_threads())
        try:
            stops = _stop_ids(run.tokenizer)
            missing = [t for t in stops if not llm.is_end_of_generation(t)]
            if missing:
                result.notes.append(f"llama.cpp does not end a generation at {missing}: llama-server and Ollama "
                                    "would run past lyra's turn end")
            penalty = float(generation.get("repetition_penalty") or 1.0)
            clean = reply_cleaner(run.tokenizer)
            replies, equal = [], []
            for probe, lyra_ids in zip(probes, prompts):
                ids = llm.prompt_ids([{"role": "user", "content": probe.prompt}])
                equal.append(ids == list(lyra_ids))
                tokens, ended = llm.greedy(ids, max_new, stops, penalty)
                raw = llm.detokenize([t for t in tokens if t not in stops])
                replies.append(_reply(clean(raw), raw, tokens, ended, len(ids)))
            result.replies, result.prompt_ids_equal = replies, equal
            if llm.chat_format != "chat_template.default":
                result.notes.append(f"llama-cpp-python's create_chat_completion would use its built-in "
                                    f"{llm.chat_format!r} format, not the file's template")
        finally:
            llm.close()


def _stop_ids(tokenizer) -> list[int]:
    from lyra.generation import stop_token_ids

    return stop_token_ids(tokenizer)


def _reply(text: str, raw: str, token_ids: list[int], ended_by_eos: bool, prompt_tokens: int):
    from lyra.generation import Reply

    return Reply(text=text, raw=raw, token_ids=token_ids, ended_by_eos=ended_by_eos, prompt_tokens=prompt_tokens)


# ---------------------------------------------------------------- server (lyra.serve + openai)

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_server(result: TargetRun, run, adapter: str, probes, prompts, generation, start_timeout_s: float) -> None:
    import openai

    port = free_port()
    command = [sys.executable, "-m", "lyra.serve", hydra_override("run_dir", run.run_dir), f"port={port}",
               "host=127.0.0.1", *([hydra_override("adapter", adapter)] if adapter != "adapter" else [])]
    with tempfile.TemporaryFile(mode="w+") as output:
        process = subprocess.Popen(command, env=lyra_env(), stdout=output, stderr=subprocess.STDOUT, text=True)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                   timeout=600)
            model = _wait_for_models(client, process, output, start_timeout_s)
            result.notes.append(f"lyra.serve on 127.0.0.1:{port}, model {model!r}")
            max_new = int(generation.get("max_new_tokens") or 256)
            extra = {}
            if generation.get("repetition_penalty") not in (None, 1.0):
                extra["repetition_penalty"] = generation["repetition_penalty"]
            replies, equal = [], []
            for probe, lyra_ids in zip(probes, prompts):
                response = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": probe.prompt}], temperature=0,
                    max_tokens=max_new, stream=False, extra_body=extra or None)
                choice = response.choices[0]
                text = choice.message.content or ""
                prompt_tokens = response.usage.prompt_tokens if response.usage else -1
                equal.append(prompt_tokens == len(lyra_ids))
                replies.append(_reply(text.strip(), text, [], choice.finish_reason == "stop", prompt_tokens))
            result.replies, result.prompt_ids_equal = replies, equal
            result.notes.append("prompt ids compared by count (usage.prompt_tokens)")
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_models(client, process, output, timeout_s: float) -> str:
    """The served persona's model id, once /v1/models answers; the server's last lines if it dies."""
    import openai

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output.seek(0)
            tail = [line for line in output.read().splitlines() if line.strip()][-_SERVER_LOG_LINES:]
            raise UserError("targets", f"server: lyra.serve exited with code {process.returncode}: " + " | ".join(tail))
        try:
            ids = [model.id for model in client.models.list().data]
        except (openai.APIConnectionError, openai.APITimeoutError):
            time.sleep(0.5)
            continue
        persona = [i for i in ids if not i.endswith("-base")]
        if not persona:
            raise UserError("targets", f"server: /v1/models lists no persona model ({ids})")
        return persona[0]
    raise UserError("targets", f"server: lyra.serve did not answer within {timeout_s:.0f} s "
                               "(raise parity.server_start_timeout_s)")


# ---------------------------------------------------------------- report

def _report(results: dict[str, TargetRun], probes, persona: Mapping, generation, prompts, gguf_type: str) -> dict:
    reference = REFERENCE if REFERENCE in results else next(iter(results))
    ref = results[reference]
    ref_ok = ref.status == "ok"
    report_targets: dict[str, Any] = {}
    disagreements: list[str] = []
    for name, result in results.items():
        entry: dict[str, Any] = {"status": result.status, "reason": result.reason or None,
                                 "seconds": round(result.seconds, 1), "notes": result.notes}
        if result.status == "ok":
            n = len(result.replies)
            same_text = [a.text == b.text for a, b in zip(result.replies, ref.replies)] if ref_ok else []
            same_tokens = ([a.token_ids == b.token_ids for a, b in zip(result.replies, ref.replies)]
                           if ref_ok and result.replies[:1] and result.replies[0].token_ids and ref.replies[0].token_ids
                           else None)
            same_stop = [a.ended_by_eos == b.ended_by_eos for a, b in zip(result.replies, ref.replies)] if ref_ok else []
            entry.update({
                "prompt_ids_equal": all(result.prompt_ids_equal),
                "prompt_ids_equal_count": sum(result.prompt_ids_equal),
                "exact_match_rate": sum(same_text) / n if ref_ok and n else None,
                "token_match_rate": sum(same_tokens) / n if same_tokens is not None and n else None,
                "eos_match_rate": sum(same_stop) / n if ref_ok and n else None,
                "metrics": persona_metrics(result.replies, persona),
                "replies": [{"id": p.id, "reply": r.text, "ended_by_eos": r.ended_by_eos,
                             "prompt_tokens": r.prompt_tokens, "prompt_tokens_lyra": len(ids)}
                            for p, r, ids in zip(probes, result.replies, prompts)],
            })
            problems = []
            if not entry["prompt_ids_equal"]:
                problems.append(f"prompt ids differ on {n - entry['prompt_ids_equal_count']}/{n} probes")
            if ref_ok and name != reference:
                differ = [p.id for p, same in zip(probes, same_text) if not same]
                if differ:
                    problems.append(f"{len(differ)}/{n} replies differ from {reference} (first: {differ[0]})")
                stops = [p.id for p, same in zip(probes, same_stop) if not same]
                if stops:
                    problems.append(f"stops differently on {len(stops)}/{n} probes (first: {stops[0]})")
            problems += [note for note in result.notes if "does not end a generation" in note or "built-in" in note]
            if problems:
                disagreements.append(f"{name} disagrees: " + "; ".join(problems))
        elif result.status == "failed":
            disagreements.append(f"{name} failed: {result.reason}")
        report_targets[name] = entry
    ran = [name for name, result in results.items() if result.status == "ok"]
    return {
        "reference": reference,
        "num_probes": len(probes),
        "generation": dict(generation),
        "gguf_type": gguf_type if "gguf" in results else None,
        "targets": report_targets,
        "skipped": {name: r.reason for name, r in results.items() if r.status == "skipped"},
        "disagreements": disagreements,
        "agree": not disagreements and len(ran) >= 2,
        "language": str(persona["language"]),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_parity(report: Mapping[str, Any]) -> str:
    """The per-target table, then one line per skipped target and per disagreeing target."""
    metrics = list(metric_names(report["language"]))
    columns = ["target", "prompt ids", "same reply", "same tokens", "same stop", *metrics]
    rows = []
    for name, entry in report["targets"].items():
        if entry["status"] != "ok":
            rows.append([name, entry["status"].upper(), *["-"] * (len(columns) - 2)])
            continue
        rows.append([name, _cell(entry["prompt_ids_equal"]), _cell(entry["exact_match_rate"]),
                     _cell(entry["token_match_rate"]), _cell(entry["eos_match_rate"]),
                     *(_cell(entry["metrics"].get(key)) for key in metrics)])
    widths = [max(len(str(row[i])) for row in [columns, *rows]) for i in range(len(columns))]
    line = lambda row: "  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(row, widths)))  # noqa: E731
    out = [f"parity over {report['num_probes']} probes, greedy, against {report['reference']}:",
           line(columns), "-" * len(line(columns)), *map(line, rows)]
    out += [f"{name} skipped: {reason}" for name, reason in report["skipped"].items()]
    out += report["disagreements"]
    if report["agree"]:
        out.append(f"all {sum(e['status'] == 'ok' for e in report['targets'].values())} targets agree")
    return "\n".join(out)
