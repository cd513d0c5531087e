"""Checks that text is Traditional Chinese as written in Taiwan, using OpenCC's own dictionaries.

    from lyra.data.zh_tw import simplified_only_characters, non_taiwan_variants
    simplified_only_characters("今天发薪水")   # ['发']
    non_taiwan_variants("裏面")                # [('裏', '裡')]

A character is *Simplified-only* when OpenCC's Simplified->Traditional table (STCharacters) lists
it and none of its Traditional candidates, nor their Taiwan forms (OpenCC `t2tw`), is the
character itself: 发 -> 發/髮 is Simplified-only, while 干 -> 幹/乾/干, 台 -> 臺/檯/颱/台 and
床 -> 牀 (written 床 in Taiwan) are not. Converting text with `s2t` and comparing would wrongly
flag those. OpenCC errs on the strict side for a few characters both scripts share (霉 -> 黴).
`non_taiwan_variants` adds the Traditional variants Taiwan writes differently (裏 -> 裡, 着 -> 著).
"""

from __future__ import annotations

import functools
from pathlib import Path

SIMPLIFIED_ONLY_TABLE = Path(__file__).parent / "assets" / "simplified_only.txt"


@functools.cache
def _simplified_only() -> frozenset[str]:
    # OpenCC's wheels ship compiled .ocd2 dictionaries only, so the table is derived from its text
    # dictionary once, at development time (scripts/build_zh_tw_table.py), and shipped with lyra.
    lines = SIMPLIFIED_ONLY_TABLE.read_text(encoding="utf-8").splitlines()
    return frozenset("".join(line for line in lines if not line.startswith("#")))


@functools.cache
def _t2tw():
    import opencc

    return opencc.OpenCC("t2tw.json")


def simplified_only_characters(text: str) -> list[str]:
    """Characters of `text` that exist only in Simplified Chinese, in order of appearance, unique."""
    table = _simplified_only()
    return list(dict.fromkeys(char for char in text if char in table))


def non_taiwan_variants(text: str) -> list[tuple[str, str]]:
    """(character, Taiwan form) for Traditional characters OpenCC's t2tw would rewrite."""
    converted = _t2tw().convert(text)
    if converted == text or len(converted) != len(text):  # t2tw maps character for character
        return [] if converted == text else [(text, converted)]
    return list(dict.fromkeys((a, b) for a, b in zip(text, converted) if a != b))
