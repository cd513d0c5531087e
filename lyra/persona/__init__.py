"""What a persona is measured by: its metrics, their directions, its languages, and the text checks.

    from lyra.persona import PERSONA_METRICS, metric_direction, persona_metrics, LANGUAGES
    metrics = persona_metrics(replies, persona)       # replies: lyra.generation.Reply (text, flags)

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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

# Every persona metric, in report order; a persona reports the ones of its language (metric_names).
PERSONA_METRICS = ("think_leak_rate", "eos_rate", "address_rate", "self_name_rate", "language_rate",
                   "simplified_rate", "avg_reply_chars")
# Persona metrics where less is better; every other rate (address_rate, self_name_rate, ...) is maximized.
LOWER_IS_BETTER = ("think_leak_rate", "simplified_rate")
ENGLISH_MIN_ASCII = 0.9  # share of a reply's letters that must be ASCII: a quoted foreign word is fine
CHINESE_MIN_HAN = 0.5  # share of a reply's letters that must be Han characters: names like "Wi-Fi" are fine


def metric_direction(metric: str) -> str:
    """minimize for losses, perplexity and the failure rates, maximize for the persona rates."""
    if "loss" in metric or "perplexity" in metric or metric in LOWER_IS_BETTER:
        return "minimize"
    return "maximize" if metric.endswith("_rate") else "minimize"


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

def persona_metrics(replies: Sequence, persona: Mapping) -> dict[str, float]:
    """The persona metrics of a list of `lyra.generation.Reply`, counted in the persona's words."""
    language = str(persona["language"])
    names = metric_names(language)
    n = len(replies)
    if n == 0:
        return {name: 0.0 for name in names}

    def rate(flags) -> float:
        return sum(bool(flag) for flag in flags) / n

    in_language = LANGUAGES[language]
    address, name = str(persona["user_address"]), str(persona["name"])
    metrics = {
        "think_leak_rate": rate(r.think_leak for r in replies),
        "eos_rate": rate(r.ended_by_eos for r in replies),
        "address_rate": rate(address in r.text for r in replies),
        "self_name_rate": rate(name in r.text for r in replies),
        "language_rate": rate(in_language(r.text) for r in replies),
        "simplified_rate": rate(has_simplified(r.text) for r in replies) if "simplified_rate" in names else None,
        "avg_reply_chars": sum(len(r.text) for r in replies) / n,
    }
    return {key: metrics[key] for key in names}


# ---------------------------------------------------------------- per-reply checks

# The persona checks one reply can fail, named as `python -m lyra.data pairs` reports them.
PERSONA_CHECKS = ("address", "name", "language", "think")


def failed_checks(text: str, persona: Mapping, raw: str | None = None) -> list[str]:
    """The persona checks one reply fails, in PERSONA_CHECKS order: the per-reply form of address_rate,
    self_name_rate, language_rate and think_leak_rate. `raw`: the reply before think blocks were removed."""
    failed = {
        "address": str(persona["user_address"]) not in text,
        "name": str(persona["name"]) not in text,
        "language": not LANGUAGES[str(persona["language"])](text),
        "think": any(tag in (raw if raw is not None else text) for tag in ("<think>", "</think>")),
    }
    return [check for check in PERSONA_CHECKS if failed[check]]
