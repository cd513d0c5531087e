"""What a persona is measured by: its metrics, their directions, its languages, and the text checks.

    from lyra.persona import PERSONA_METRICS, metric_direction, persona_metrics, LANGUAGES
    metrics = persona_metrics(replies, persona)       # replies: lyra.generation.Reply (text, flags)
    metrics = persona_metrics(replies, persona, checks=[("name", "address"), None, ...])  # tagged probes
    holds = persona_hold(metrics_by_turn)             # drift: last turn / turn 1 (lyra.drift)

Pure Python, no transformers import: `lyra.config` validates a persona's language with it before
anything heavy loads, and `lyra.probes`, `lyra.evaluate`, `lyra.results` and `lyra.compare` share its
one list of metrics. Persona metrics (each a fraction of the replies, except avg_reply_chars), counted
with the persona's own words (conf/persona/<name>.yaml):
    think_leak_rate  the raw reply contained <think> or </think> (removed before display)
    eos_rate         the reply ended with a stop token, not by hitting max_new_tokens
    address_rate     the reply addresses the user as persona.user_address
    self_name_rate   the reply uses the character's name, persona.name
    language_rate    the reply is written in persona.language: zh-TW = mostly Han characters and no
                     Simplified-only one (lyra.data.zh_tw); en = mostly ASCII letters
    simplified_rate  zh-TW only: the reply contains Simplified-only characters
    avg_reply_chars  mean length of the clean reply in characters

Tagged probes: a probe may say which persona checks it is meant to test (`"checks": ["name",
"address", "language"]`, CHECKS). self_name_rate is then the share over the replies to probes that
ask for "name" (address_rate: "address", language_rate: "language"), so "what's the weather?" is
not scored on the character's name. A reply without checks (None) counts in every rate; the other
metrics (think_leak_rate, eos_rate, simplified_rate, avg_reply_chars) always count every reply. A
rate no reply asks for is left out of the result (it was not measured, which is not 0).

Drift (lyra.drift): the metrics per turn of long chats, summed up by the holds: `<metric>_hold` =
the metric at the last turn / at turn 1 (None when turn 1 is 0: nothing to hold), and
`persona_hold` = the mean of the defined holds of HOLD_METRICS, each capped at 1 so that a gain in
one check cannot hide a loss in another. 1 = the persona held; 0.5 = half of it was lost.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

# Every persona metric, in report order; a persona reports the ones of its language (metric_names).
PERSONA_METRICS = ("think_leak_rate", "eos_rate", "address_rate", "self_name_rate", "language_rate",
                   "simplified_rate", "avg_reply_chars")
# Persona metrics where less is better; every other rate (address_rate, self_name_rate, ...) is maximized.
LOWER_IS_BETTER = ("think_leak_rate", "simplified_rate")
ENGLISH_MIN_ASCII = 0.9  # share of a reply's letters that must be ASCII: a quoted foreign word is fine
CHINESE_MIN_HAN = 0.5  # share of a reply's letters that must be Han characters: names like "Wi-Fi" are fine
# What a probe may ask to be scored on ("checks" in a probe line), and the rate each one selects for.
CHECKS = {"name": "self_name_rate", "address": "address_rate", "language": "language_rate"}
# The rates whose hold over a long chat (lyra.drift) makes up persona_hold.
HOLD_METRICS = ("self_name_rate", "address_rate", "language_rate")


def hold_key(metric: str) -> str:
    """self_name_rate -> self_name_hold: the key of a metric's last-turn / first-turn ratio."""
    return metric.removesuffix("_rate") + "_hold"


# The drift summary keys, in report order (evaluation.json, the W&B summary, lyra.compare).
HOLD_KEYS = ("persona_hold", *map(hold_key, HOLD_METRICS))


def metric_direction(metric: str) -> str:
    """minimize for losses, perplexity and the failure rates; maximize the persona rates and holds."""
    if "loss" in metric or "perplexity" in metric or metric in LOWER_IS_BETTER:
        return "minimize"
    return "maximize" if metric.endswith(("_rate", "_hold")) else "minimize"


def unknown_checks(checks) -> str | None:
    """Why a probe's "checks" value is invalid, or None: a list of CHECKS names."""
    known = ", ".join(CHECKS)
    if not isinstance(checks, list) or not all(isinstance(check, str) for check in checks):
        return f'"checks" must be a list of check names ({known}), got {checks!r}'
    unknown = [check for check in checks if check not in CHECKS]
    if unknown:
        return f"unknown check {unknown[0]!r} in \"checks\" (known: {known})"
    return None


# ---------------------------------------------------------------- languages

def _is_han(char: str) -> bool:
    code = ord(char)
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF or code >= 0x20000


def has_simplified(text: str) -> bool:
    from lyra.data.zh_tw import simplified_only_characters

    return bool(simplified_only_characters(text))


def is_traditional_chinese(text: str) -> bool:
    """Mostly Han characters, none of them Simplified-only."""
    letters = [char for char in text if char.isalpha()]
    if not letters or sum(map(_is_han, letters)) / len(letters) < CHINESE_MIN_HAN:
        return False
    return not has_simplified(text)


def is_english(text: str) -> bool:
    """Mostly ASCII letters (a reply in Chinese, Cyrillic or accented European text is not)."""
    letters = [char for char in text if char.isalpha()]
    return bool(letters) and sum(char.isascii() for char in letters) / len(letters) >= ENGLISH_MIN_ASCII


LANGUAGES: dict[str, Callable[[str], bool]] = {"zh-TW": is_traditional_chinese, "en": is_english}


def metric_names(language: str) -> tuple[str, ...]:
    """The persona metrics a persona of this language reports (simplified_rate: zh-TW only)."""
    return tuple(name for name in PERSONA_METRICS if name != "simplified_rate" or language == "zh-TW")


# ---------------------------------------------------------------- metrics

def persona_metrics(replies: Sequence, persona: Mapping,
                    checks: Sequence[Collection[str] | None] | None = None) -> dict[str, float]:
    """The persona metrics of a list of `lyra.generation.Reply`, counted in the persona's words.

    checks: one entry per reply, the CHECKS its probe asks for (None = untagged: counted in every
    rate); None = all untagged. A checked rate that no reply asks for is left out.
    """
    language = str(persona["language"])
    names = metric_names(language)
    n = len(replies)
    if n == 0:
        return {name: 0.0 for name in names}
    asks = [None] * n if checks is None else list(checks)
    if len(asks) != n:
        raise ValueError(f"{n} replies but {len(asks)} checks")
    checked_by = {metric: check for check, metric in CHECKS.items()}

    def rate(metric: str, test: Callable[[object], bool]) -> float | None:
        check = checked_by.get(metric)
        pool = [r for r, ask in zip(replies, asks) if check is None or ask is None or check in ask]
        return sum(bool(test(r)) for r in pool) / len(pool) if pool else None

    tests: dict[str, Callable[[object], bool]] = {
        "think_leak_rate": lambda r: r.think_leak,
        "eos_rate": lambda r: r.ended_by_eos,
        "address_rate": lambda r: passes(r.text, persona, "address"),
        "self_name_rate": lambda r: passes(r.text, persona, "name"),
        "language_rate": lambda r: passes(r.text, persona, "language"),
        "simplified_rate": lambda r: has_simplified(r.text),
    }
    metrics = {key: rate(key, tests[key]) for key in names if key in tests}
    metrics["avg_reply_chars"] = sum(len(r.text) for r in replies) / n
    return {key: metrics[key] for key in names if metrics[key] is not None}


def checked_counts(checks: Sequence[Collection[str] | None], language: str) -> dict[str, int]:
    """How many replies each checked rate of `persona_metrics` is computed over."""
    return {metric: sum(ask is None or check in ask for ask in checks)
            for check, metric in CHECKS.items() if metric in metric_names(language)}


# ---------------------------------------------------------------- drift

def persona_hold(by_turn: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    """The HOLD_KEYS of per-turn persona metrics (turn 1 first; see the module doc).

    `<metric>_hold` = last turn / turn 1; None when the metric is missing at either end or is 0 at
    turn 1. persona_hold = the mean of the defined holds, each capped at 1; None when none is defined.
    """
    if not by_turn:
        raise ValueError("persona_hold needs at least one turn")
    first, last = by_turn[0], by_turn[-1]
    holds: dict[str, float | None] = {}
    for metric in HOLD_METRICS:
        start, end = first.get(metric), last.get(metric)
        holds[hold_key(metric)] = end / start if start and end is not None else None
    defined = [min(value, 1.0) for value in holds.values() if value is not None]
    return {"persona_hold": sum(defined) / len(defined) if defined else None, **holds}


# ---------------------------------------------------------------- per-reply checks

# The persona checks one reply can fail, named as `python -m lyra.data pairs` reports them.
PERSONA_CHECKS = ("address", "name", "language", "think")


def passes(text: str, persona: Mapping, check: str) -> bool:
    """Whether one clean reply passes a text check, in the persona's own words: "address" (says
    user_address), "name" (says the character's name), "language" (written in persona.language).
    The one definition behind address_rate, self_name_rate, language_rate and failed_checks."""
    if check == "address":
        return str(persona["user_address"]) in text
    if check == "name":
        return str(persona["name"]) in text
    if check == "language":
        return LANGUAGES[str(persona["language"])](text)
    raise ValueError(f"unknown persona check {check!r}")


def failed_checks(text: str, persona: Mapping, raw: str | None = None) -> list[str]:
    """The persona checks one reply fails, in PERSONA_CHECKS order: the per-reply form of address_rate,
    self_name_rate, language_rate and think_leak_rate. `raw`: the reply before think blocks were removed."""
    think_leak = any(tag in (raw if raw is not None else text) for tag in ("<think>", "</think>"))
    return [check for check in PERSONA_CHECKS
            if (think_leak if check == "think" else not passes(text, persona, check))]
