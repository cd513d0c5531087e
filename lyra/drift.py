"""Persona drift over long chats: does the character still say its name and address the user at turn 8?

    python -m lyra.evaluate run_dir=R drift.turns=8                     # per-turn table + persona_hold
    python -m lyra.evaluate run_dir=R drift.turns=8 drift.scripts=37 drift.source=probes

    from lyra.drift import plan_drift, format_drift_table
    plan = plan_drift(cfg.drift, data_cfg, cfg.eval, persona)   # None when drift.turns=0; no model needed
    results = plan.run(model, tokenizer, persona, system_prompt)  # persona_hold, <metric>_hold, "drift"
    print(format_drift_table(results["drift"]))

Each chat is a script of `drift.turns` user turns, replayed turn by turn with the model answering
every turn itself: its own greedy replies go into the history the next turn sees. At each turn
depth all chats are generated together in batches (eval.batch_size), each prompt fitted to the
model's context (older turns dropped, counted). The persona metrics (lyra.persona) are computed per
turn depth, over the chats' replies at that depth; `persona_hold` sums the table up (lyra.persona:
last turn / turn 1 per metric, the mean capped at 1).

Scripts (drift.source): `eval` = the user turns of eval-split conversations that have at least
`drift.turns` of them (untagged: every rate counts them); `probes` = the probes chained: the first
`drift.scripts` probes of the probe file, chat j asking probe (j + k) mod S at turn k, so every turn
depth asks the same S probes (only the history before them differs) and each probe keeps its
"checks"; `auto` = eval when it holds `drift.scripts` such conversations, else probes.

A module of its own (not lyra.probes): probes.py holds the probe files and the training callback;
drift adds script sources, growing histories fitted to the context and a per-turn report, and
reuses lyra.probes' reader and lyra.generation's batched generation unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lyra.errors import UserError
from lyra.persona import PERSONA_METRICS, persona_hold, persona_metrics
from lyra.probes import Probe, load_probes, probes_path

log = logging.getLogger(__name__)

SOURCES = ("auto", "eval", "probes")


@dataclass
class Script:
    """One chat to replay: its user turns, in order (eval-split turns are untagged Probes)."""

    id: str
    turns: list[Probe]
    system: list[dict[str, str]] = field(default_factory=list)  # the conversation's own system message, if any


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_drift(drift_cfg: DictConfig) -> None:
    """One line naming the bad drift.* knob, before any model is loaded."""
    turns = drift_cfg.turns
    if not (isinstance(turns, int) and not isinstance(turns, bool) and turns >= 0):
        raise UserError("drift.turns", f"must be an integer >= 0 (0 = off), got {turns}")
    if not _positive_int(drift_cfg.scripts):
        raise UserError("drift.scripts", f"must be an integer >= 1, got {drift_cfg.scripts}")
    if drift_cfg.source not in SOURCES:
        raise UserError("drift.source", f"must be one of {', '.join(SOURCES)}, got {drift_cfg.source!r}")
    if not _positive_int(drift_cfg.max_new_tokens):
        raise UserError("drift.max_new_tokens", f"must be an integer >= 1, got {drift_cfg.max_new_tokens}")
    limit = drift_cfg.max_prompt_tokens
    if limit is not None and not _positive_int(limit):
        raise UserError("drift.max_prompt_tokens", f"must be an integer >= 1 or null (the model's context), got {limit}")


# ---------------------------------------------------------------- scripts

def eval_scripts(data_cfg: DictConfig, turns: int) -> tuple[list[Script], str]:
    """Scripts from the eval conversations with >= `turns` user turns, and a note on what was used."""
    from lyra.data import data_labels, load_conversations
    from lyra.paths import resolve_user_path

    if not data_cfg.get("eval_file"):
        return [], "the run has no eval split"
    path = resolve_user_path(data_cfg.eval_file)
    conversations = load_conversations(path, key="data.eval_file", on_invalid=data_cfg.get("on_invalid", "error"),
                                       labels=data_labels(data_cfg))
    scripts, longest = [], 0
    for conversation in conversations:
        users = [m["content"] for m in conversation.messages if m["role"] == "user"]
        longest = max(longest, len(users))
        if len(users) >= turns:
            system = [{"role": "system", "content": m["content"]} for m in conversation.messages[:1]
                      if m["role"] == "system"]
            scripts.append(Script(conversation.id, [Probe(f"{conversation.id}#{k + 1}", text)
                                                    for k, text in enumerate(users[:turns])], system))
    return scripts, (f"{path.name}: {len(scripts)} of {len(conversations)} conversations have >= {turns} user turns "
                     f"(the longest has {longest})")


def probe_scripts(probes: Sequence[Probe], turns: int, count: int) -> list[Script]:
    """The first `count` probes chained: chat j asks probe (j + k) mod S at turn k (S chats)."""
    pool = list(probes[:count])
    return [Script(f"chain-{pool[j].id}", [pool[(j + k) % len(pool)] for k in range(turns)])
            for j in range(len(pool))]


def select_scripts(drift_cfg: DictConfig, data_cfg: DictConfig, eval_cfg: DictConfig,
                   persona: Mapping) -> tuple[list[Script], str]:
    """(scripts, source used) for drift.source; says why auto chose what it chose."""
    turns, wanted, source = drift_cfg.turns, drift_cfg.scripts, drift_cfg.source
    if source in ("auto", "eval"):
        scripts, note = eval_scripts(data_cfg, turns)
        if source == "eval" and not scripts:
            raise UserError("drift.source", f"eval: {note}; use drift.source=probes or fewer drift.turns")
        if source == "eval" or len(scripts) >= wanted:
            if len(scripts) < wanted:
                log.warning("drift: %s; replaying %d chats, not drift.scripts=%d", note, len(scripts), wanted)
            return scripts[:wanted], "eval"
        log.info("drift: %s, fewer than drift.scripts=%d: chaining the probes instead", note, wanted)
    key = "eval.probes_file" if eval_cfg.get("probes_file") else "persona.probes_file"
    probes = load_probes(probes_path(eval_cfg, persona), key)
    if len(probes) < wanted:
        log.warning("drift: drift.scripts=%d but the probe file holds %d probes: %d chats", wanted, len(probes),
                    len(probes))
    scripts = probe_scripts(probes, turns, wanted)
    if turns > len(scripts):
        log.info("drift: %d turns over %d chained probes: each chat asks its probes again after turn %d", turns,
                 len(scripts), len(scripts))
    return scripts, "probes"


# ---------------------------------------------------------------- replay

@dataclass
class DriftPlan:
    """What `python -m lyra.evaluate drift.turns=N` replays, checked and loaded before the model."""

    scripts: list[Script]
    source: str
    turns: int
    generation: dict[str, Any]
    batch_size: int
    max_prompt_tokens: int | None = None

    def run(self, model, tokenizer, persona: Mapping, system_prompt: str | None) -> dict[str, Any]:
        """Replay every script; the holds (HOLD_KEYS) and the per-turn report under "drift"."""
        from lyra.generation import context_budget, fit_prompt, generate_in_batches

        budget = context_budget(model, self.generation["max_new_tokens"], self.max_prompt_tokens)
        histories = [list(script.system) for script in self.scripts]
        by_turn, transcripts = [], [{"id": s.id, "turns": []} for s in self.scripts]
        fitted_prompts = dropped = cut = 0
        for depth in range(self.turns):
            asked = [script.turns[depth] for script in self.scripts]
            prompts = []
            for turn, history in zip(asked, histories):
                fitted = fit_prompt(turn.prompt, tokenizer, history, system_prompt, budget)
                fitted_prompts += bool(fitted.dropped_messages or fitted.cut)
                dropped, cut = dropped + fitted.dropped_messages, cut + fitted.cut
                prompts.append(fitted.ids)
            replies = generate_in_batches(prompts, model, tokenizer, self.batch_size, **self.generation)
            for turn, reply, history, transcript in zip(asked, replies, histories, transcripts):
                history += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": reply.text}]
                transcript["turns"].append({"id": turn.id, "prompt": turn.prompt,
                                            "checks": None if turn.checks is None else list(turn.checks),
                                            "reply": reply.text, "ended_by_eos": reply.ended_by_eos,
                                            "prompt_tokens": reply.prompt_tokens})
            by_turn.append({"turn": depth + 1, **persona_metrics(replies, persona, [t.checks for t in asked])})
            log.info("drift turn %d/%d: %s", depth + 1, self.turns,
                     ", ".join(f"{k}={v:.3g}" for k, v in by_turn[-1].items() if k != "turn"))
        if fitted_prompts:
            log.warning("drift: %d of %d prompts exceeded %d tokens: %d old messages dropped, %d inputs cut",
                        fitted_prompts, self.turns * len(self.scripts), budget, dropped, cut)
        report = {"turns": self.turns, "chats": len(self.scripts), "source": self.source,
                  "max_new_tokens": self.generation["max_new_tokens"], "prompt_budget": budget,
                  "prompts_fitted": fitted_prompts, "messages_dropped": dropped, "inputs_cut": cut,
                  "per_turn": by_turn, "transcripts": transcripts}
        return {**persona_hold(by_turn), "drift": report}


def plan_drift(drift_cfg: DictConfig, data_cfg: DictConfig, eval_cfg: DictConfig, persona: Mapping) -> DriftPlan | None:
    """The checked drift replay (scripts read), or None with drift.turns=0 (off)."""
    check_drift(drift_cfg)
    if not drift_cfg.turns:
        return None
    scripts, source = select_scripts(drift_cfg, data_cfg, eval_cfg, persona)
    generation = OmegaConf.to_container(eval_cfg.generation, resolve=True)  # the probes' decoding (greedy)
    generation["max_new_tokens"] = drift_cfg.max_new_tokens
    log.info("drift: %d chats of %d turns from the %s, %d new tokens per reply", len(scripts), drift_cfg.turns,
             "eval split" if source == "eval" else "probes chained", drift_cfg.max_new_tokens)
    return DriftPlan(scripts, source, drift_cfg.turns, generation, eval_cfg.batch_size, drift_cfg.max_prompt_tokens)


# ---------------------------------------------------------------- report

def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_drift_table(report: Mapping[str, Any], holds: Mapping[str, Any] | None = None) -> str:
    """Rows = turn 1..N, columns = the persona metrics; then the holds when given."""
    rows = report["per_turn"]
    columns = [name for name in PERSONA_METRICS if any(name in row for row in rows)]
    widths = [max(len(name), 7) + 2 for name in columns]
    lines = [f"persona drift: {report['chats']} chats x {report['turns']} turns ({report['source']})",
             "turn" + "".join(f"{name:>{width}}" for name, width in zip(columns, widths)),
             "-" * (4 + sum(widths))]
    for row in rows:
        lines.append(f"{row['turn']:<4}" + "".join(f"{_cell(row.get(name)):>{width}}"
                                                   for name, width in zip(columns, widths)))
    if holds:
        lines.append(", ".join(f"{key}={_cell(value)}" for key, value in holds.items()))
    return "\n".join(lines)
