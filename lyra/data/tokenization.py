"""Turning conversations into training examples with assistant-only labels.

Each assistant turn becomes one example: the prompt is exactly what `lyra.chat` feeds the model
for that history (the tokenizer's chat template, `enable_thinking=False`, generation prompt on,
the conversation's `tools=`), and only the reply (its text and its tool calls) plus the template's
end-of-turn token (Qwen3 and SmolLM2: `<|im_end|>`) is supervised. Qwen3's template puts an empty `<think>\n\n</think>\n\n` block only
before the *last* assistant turn, so rendering a whole multi-turn chat as one sequence would train
earlier turns on a context chat never produces.

The reply is rendered as the template writes it right after a generation prompt (`reply_text`), so
an assistant turn right after the system prompt, at the very start, or right after another
assistant turn trains on the prompt chat builds for that history, as every other turn does.
Turns with OpenAI `"weight": 0` are context only.

Nothing here names a model: the end-of-turn token is read off the tokenizer's own template
(`turn_end_ids`), so any HF chat model whose template renders the conversation works.

A turn's texts are `prompt_text` and `reply_text`. `encode_turn` renders and tokenizes them per turn
(the reference, and what single turns use: chat tests, preference pairs); a file's first pass
(`lyra.data.prepare.encode_all`) gets the same texts from `TurnRenderer`, which renders each shape
of turn once and fills in the contents, and tokenizes them a piece at a time (`ChunkTokenizer`).
tests/test_prepare_fast.py holds the two to the same ids and labels.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from lyra.data.records import Conversation

IGNORE_INDEX = -100
_CANONICAL_USER = {"role": "user", "content": "."}  # a neutral turn to render a reply after


@dataclass
class EncodeStats:
    conversations: int = 0
    examples: int = 0
    dropped_turns: int = 0  # assistant turns whose prompt + reply exceed max_length
    truncated_conversations: int = 0  # conversations that lost at least one trailing turn


def inserts_system_prompt(conversation: Conversation, system_prompt: str | None) -> bool:
    """Whether training prepends data.system_prompt: the conversation has none and did not ask for none."""
    messages = conversation.messages
    return bool(system_prompt) and not conversation.no_system_prompt and (not messages or messages[0]["role"] != "system")


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend the configured system prompt unless the conversation brings its own."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def template_with_system_prompt(template: str, system_prompt: str) -> str:
    """The chat template, prefixed so that a chat without a system message gets `system_prompt`:
    the template itself then does what `with_system_prompt` does (what lyra.export ships).

    json.dumps yields a valid Jinja string literal (Jinja reads the same backslash escapes).
    """
    literal = json.dumps(system_prompt, ensure_ascii=False)
    prefix = ("{%- if not messages or messages[0]['role'] != 'system' %}"
              f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
              "{%- endif %}\n")
    return prefix + template


_TURN_END_PROBE = "\u2063lyra\u2063"  # a reply text no template rewrites; what follows it ends the turn


def turn_end_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn token, then eos, then pad.

    The end-of-turn token is the first token the chat template renders after a reply (Qwen3 and
    SmolLM2: <|im_end|>, Llama 3: <|eot_id|>, Gemma: <end_of_turn>); eos and pad end a generation
    too (Qwen3: pad <|endoftext|> ends a document). Cached on the tokenizer. For Qwen3 this is
    [151645, 151643]; for SmolLM2 [2].
    """
    template = tokenizer.chat_template
    cached = getattr(tokenizer, "_lyra_turn_end_ids", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_END_PROBE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
    after = text[text.rindex(_TURN_END_PROBE) + len(_TURN_END_PROBE):]
    following = tokenizer.encode(after, add_special_tokens=False)[:1] if after.strip() else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = [i for i in following if i in special]  # a plain "\n" after the reply is not an end marker
    for candidate in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        if isinstance(candidate, int) and candidate not in ids:
            ids.append(candidate)
    if not ids:
        raise ValueError("the tokenizer has no eos token and its chat template marks no end of turn")
    tokenizer._lyra_turn_end_ids = (template, ids)  # recomputed if the template is replaced
    return ids


def render(messages: list[dict], tokenizer, tools: list[dict] | None = None,
           add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages` (non-thinking), with `tools=` when given."""
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, enable_thinking=False)


def chat_prompt_ids(messages: list[dict[str, str]], tokenizer, tools: list[dict] | None = None) -> list[int]:
    """Token ids the model sees before it writes the next assistant reply (shared with chat)."""
    return list(tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=True,
                                              add_generation_prompt=True, enable_thinking=False,
                                              return_dict=True)["input_ids"])


@functools.lru_cache(maxsize=64)
def _reply_header(tokenizer, tools_json: str) -> str:
    """The text every reply follows: a neutral user turn and the generation prompt."""
    return render([_CANONICAL_USER], tokenizer, json.loads(tools_json), add_generation_prompt=True)


def reply_text(message: dict, tokenizer, tools: list[dict] | None = None) -> str:
    """An assistant message as the template renders it right after a generation prompt: text, tool calls, end.

    Rendered after a neutral user turn rather than inside the conversation's history: the history
    only changes how a reply renders *in* history (Qwen3 drops its think block there), never how the
    model writes it after the generation prompt. Two short renders instead of the whole history.
    """
    tools_json = json.dumps(tools or None)  # key order kept: the template prints tools as given
    header = _reply_header(tokenizer, tools_json)
    rendered = render([_CANONICAL_USER, message], tokenizer, tools)
    if not rendered.startswith(header):
        raise ValueError("the chat template renders a reply differently from its generation prompt; "
                         "this template cannot be trained turn by turn")
    return rendered[len(header):]


def prompt_text(history: list[dict], tokenizer, tools: list[dict] | None = None) -> str:
    """What chat feeds the model before it writes the next assistant reply to `history`, as text."""
    return render(history, tokenizer, tools, add_generation_prompt=True)


def turn_texts(messages: list[dict], tokenizer, tools: list[dict] | None = None) -> tuple[str, str]:
    """(prompt, prompt + reply) as text for the last message of `messages`, an assistant turn.

    The prompt is what chat feeds the model for the history, whatever its order of roles (an
    assistant turn right after the system prompt, or right after another assistant turn, included).
    """
    if len(messages) < 2:
        raise ValueError("the conversation opens with an assistant turn and has no system prompt, so there is no "
                         "prompt to answer: add the user turn it answers, or set a system prompt")
    prompt = prompt_text(messages[:-1], tokenizer, tools)
    return prompt, prompt + reply_text(messages[-1], tokenizer, tools)


def _example(prompt_ids: list[int], full_ids: list[int], tokenizer) -> tuple[list[int], list[int]]:
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("chat template rendered the prompt differently with and without the reply")
    ends = set(turn_end_ids(tokenizer))
    end = next((i for i in range(len(prompt_ids), len(full_ids)) if full_ids[i] in ends), None)
    if end is None:
        raise ValueError("chat template rendered the reply without an end-of-turn or eos token")
    input_ids = full_ids[: end + 1]  # anything the template adds after the end token ("\n") is never generated
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids):]
    return input_ids, labels


def encode_turn(messages: list[dict[str, str]], tokenizer, tools: list[dict] | None = None
                ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for the last message of `messages`, which must be an assistant turn."""
    prompt, full = turn_texts(messages, tokenizer, tools)
    encode = tokenizer(  # the texts hold the template's special tokens already
        [prompt, full], add_special_tokens=False)["input_ids"]
    return _example(list(encode[0]), list(encode[1]), tokenizer)


def encode_conversation(conversation: Conversation, tokenizer, max_length: int,
                        system_prompt: str | None, stats: EncodeStats | None = None) -> list[dict]:
    """One example per supervised assistant turn; a turn that does not fit ends the conversation."""
    turns = [encode_turn(messages, tokenizer, conversation.tools)
             for messages in supervised_prefixes(conversation, system_prompt)]
    return truncate(turns, max_length, stats)


def supervised_turns(conversation: Conversation, system_prompt: str | None) -> tuple[list[dict], list[int]]:
    """The messages training renders (system prompt in) and the index of each assistant turn trained on."""
    messages = with_system_prompt(conversation.messages, None if conversation.no_system_prompt else system_prompt)
    return messages, [index for index, message in enumerate(messages)
                      if message["role"] == "assistant" and message.get("weight", 1) != 0]


def supervised_prefixes(conversation: Conversation, system_prompt: str | None) -> list[list[dict]]:
    """The history up to and including each assistant turn that is trained on."""
    messages, indices = supervised_turns(conversation, system_prompt)
    return [messages[: index + 1] for index in indices]


def fitting_turns(lengths: list[int], max_length: int, stats: EncodeStats) -> int:
    """The truncation rule, the one place it is written: how many of one conversation's turns train.

    A conversation keeps its turns up to the first whose example (prompt + reply) exceeds max_length;
    that turn and every later one are dropped, and counted in `stats`. No reply is cut in the middle.
    """
    stats.conversations += 1
    fits = next((position for position, length in enumerate(lengths) if length > max_length), len(lengths))
    if fits < len(lengths):
        stats.dropped_turns += len(lengths) - fits
        stats.truncated_conversations += 1
    stats.examples += fits
    return fits


def truncate(turns: list[tuple[list[int], list[int]]], max_length: int, stats: EncodeStats | None = None
             ) -> list[dict]:
    """Examples of one conversation's turns, up to the first that exceeds max_length (counted)."""
    stats = stats if stats is not None else EncodeStats()
    fits = fitting_turns([len(input_ids) for input_ids, _ in turns], max_length, stats)
    return [{"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
            for input_ids, labels in turns[:fits]]


def encode_conversations(conversations: list[Conversation], tokenizer, max_length: int,
                         system_prompt: str | None) -> tuple[list[dict], EncodeStats]:
    stats = EncodeStats()
    examples = [example for conversation in conversations
                for example in encode_conversation(conversation, tokenizer, max_length, system_prompt, stats)]
    return examples, stats


Pieces = list  # a text split at the tokenizer's added tokens: token ids (int) and the text between them (str)


class ChunkTokenizer:
    """Batch tokenization that tokenizes each piece of text between added tokens once.

    Consecutive turns of a conversation share their history, so tokenizing every example whole is
    quadratic in the conversation; the tokenizer splits at added tokens before anything else, so
    the pieces between them can be tokenized once and reused. Texts come in as `Pieces` (`split`).
    `encode_pieces` checks the result against whole-text tokenization on the first texts and falls
    back to it on any difference (`exact`).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
        self.added = added
        self.content = {index: text for text, index in added.items()}
        self.pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
        self.memo: dict[str, list[int]] = {}
        self.exact: bool | None = None  # None until verified
        # The Rust tokenizer itself, when there is one: the same ids as tokenizer(...) (checked with `exact`)
        # without building attention masks and a BatchEncoding for every piece.
        backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self.backend = backend if hasattr(backend, "encode_batch") else None

    def split(self, text: str) -> Pieces:
        """`text` as pieces: each added token as its id, the text between them as it is (no empty strings)."""
        if not self.added:
            return [text] if text else []
        parts = self.pattern.split(text)
        return [self.added[part] if position % 2 else part for position, part in enumerate(parts)
                if position % 2 or part]

    def text(self, pieces: Pieces) -> str:
        return "".join(piece if piece.__class__ is str else self.content[piece] for piece in pieces)

    def _whole(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _pieces_ids(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None:
            return self._whole(texts)
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.encode_pieces([self.split(text) for text in texts])

    def encode_pieces(self, sequences: list[Pieces]) -> list[list[int]]:
        if self.exact is False:
            return self._whole([self.text(pieces) for pieces in sequences])
        memo = self.memo
        missing = list({piece for pieces in sequences for piece in pieces
                        if piece.__class__ is str and piece not in memo})
        if missing:
            memo.update(zip(missing, self._pieces_ids(missing)))
        encoded = []
        for pieces in sequences:
            ids: list[int] = []
            for piece in pieces:
                if piece.__class__ is str:
                    ids += memo[piece]
                else:
                    ids.append(piece)
            encoded.append(ids)
        if self.exact is None:
            sample = [self.text(pieces) for pieces in sequences[:32]]
            self.exact = self._whole(sample) == encoded[: len(sample)]
            if not self.exact:
                return self._whole([self.text(pieces) for pieces in sequences])
        return encoded


_SLOT = "\ue000{}\ue001"  # where message N's content goes in a shape's rendering (private-use characters)
_SLOTS = re.compile("\ue000(\\d+)\ue001")
_PROBE = ' a"b\\c\nd\te\rf&g\'h萊 '  # characters a template could escape or rewrite; a cached shape keeps them as is


@dataclass
class RenderCounts:
    rendered: int = 0  # turn texts (prompts, replies) rendered through the chat template
    filled: int = 0  # turn texts filled in from a cached rendering of their shape
    checked: int = 0  # filled texts also rendered and compared (every FILL_CHECK_EVERY-th)
    shapes: int = 0  # shapes cached (each costs three more renders: placeholders, the first conversation, a probe)
    refused: int = 0  # shapes seen twice that filling does not reproduce: their texts are always rendered


class FillMismatch(Exception):
    """A filled-in turn text differs from the template's own rendering: the template reads its contents."""


FILL_CHECK_EVERY = 128  # one filled text in this many is rendered too, to catch that (0.1 of 4 CPU-s on 20 MB)


class _Shape:
    """One rendering with placeholders: its pieces, where a str piece with contents is a list that
    alternates literal text and message numbers."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: Pieces):
        self.pieces = []
        for piece in pieces:
            parts = _SLOTS.split(piece) if piece.__class__ is str else [piece]
            if len(parts) == 1:
                self.pieces.append(parts[0])
            else:
                self.pieces.append([int(part) if position % 2 else part for position, part in enumerate(parts)
                                    if position % 2 or part])

    def fill(self, messages: list[dict]) -> Pieces:
        return ["".join([messages[part]["content"] if part.__class__ is int else part for part in piece])
                if piece.__class__ is list else piece for piece in self.pieces]


class TurnRenderer:
    """`turn_texts` as pieces, rendering the chat template once per distinct shape instead of per turn.

    A turn needs two renders (its prompt: the history with the generation prompt; its reply: the
    message after a generation prompt), and rendering jinja is most of what encoding a file costs.
    Most turns differ from others only in their contents: the *shape* (each message without its
    content, the tools, prompt or reply) repeats. A shape seen a second time is rendered once with
    placeholders for the contents and once with a probe content (quotes, backslash, newline, tab,
    CJK), and cached only if filling in the first conversation's contents gives exactly that
    conversation's own rendering and the probe comes out as it went in (a template that escapes or
    rewrites contents fails this). Every later turn of that shape is filled in, not rendered.

    A content takes part only where the templates lyra knows cannot branch on it (`fillable`): text
    with no surrounding whitespace (templates trim), without '<' or '>' (Qwen3 looks for `</think>`
    and `<tool_response>` in contents) and without the first or last character of an added token (so
    it cannot form or break one). Any other content is part of the shape itself, so such turns are
    rendered whole, as are shapes seen once and shapes the checks refuse (`counts`). Exceptions come
    from the real render, with the real contents, exactly as `turn_texts` raises them.

    A template that branches on other contents (`{% if message.content.startswith('Q') %}`) can pass
    the checks on a shape's first conversation and differ on a later one. So one filled text in
    FILL_CHECK_EVERY is rendered as well, and a difference raises `FillMismatch`: the caller then
    encodes again with `fill=False`, rendering every text.
    """

    def __init__(self, tokenizer, chunks: ChunkTokenizer, fill: bool = True):
        self.tokenizer = tokenizer
        self.chunks = chunks
        self.fill = fill
        edges = {"<", ">", "\ue000", "\ue001"} | {text[0] for text in chunks.added}
        edges |= {text[-1] for text in chunks.added}
        self.unsafe = re.compile("[" + "".join(re.escape(c) for c in sorted(edges)) + "]")
        self.shapes: dict[tuple, _Shape | list[dict] | None] = {}  # a first conversation's messages until cached
        self.counts = RenderCounts()

    def fillable(self, content) -> bool:
        return (content.__class__ is str and content != "" and content.strip() == content
                and not self.unsafe.search(content))

    def shape(self, message: dict) -> tuple:
        """What of a message decides its rendering, its content left out where it can be filled in."""
        fillable = self.fillable(message.get("content"))
        if fillable and len(message) == 2 and "role" in message:  # the common case, without JSON
            return ("role", message["role"])
        try:
            rest = {key: value for key, value in message.items() if key != "content"} if fillable else message
            return ("slot" if fillable else "whole", json.dumps(rest, ensure_ascii=False))
        except (TypeError, ValueError):  # not JSON: never the same shape as another message
            return ("once", object())

    def turns(self, messages: list[dict], indices: list[int], tools: list[dict] | None):
        """(prompt pieces, reply pieces) for each assistant turn `messages[index]`, as `turn_texts` renders them."""
        tools_key = json.dumps(tools, ensure_ascii=False) if tools else None
        shapes = [self.shape(message) for message in messages]
        for index in indices:
            if index < 1:
                turn_texts(messages[: index + 1], self.tokenizer, tools)  # raises why there is no prompt
            prompt = self._pieces(("prompt", tools_key, *shapes[:index]), messages[:index],
                                  lambda history: prompt_text(history, self.tokenizer, tools))
            reply = self._pieces(("reply", tools_key, shapes[index]), [messages[index]],
                                 lambda reply: reply_text(reply[0], self.tokenizer, tools))
            yield prompt, reply

    def _pieces(self, key: tuple, messages: list[dict], render_text) -> Pieces:
        entry = self.shapes.get(key)
        if entry.__class__ is list:  # the second conversation of this shape
            self.shapes[key] = entry = self._cache(entry, render_text)
        if entry.__class__ is _Shape:
            self.counts.filled += 1
            pieces = entry.fill(messages)
            if self.counts.filled % FILL_CHECK_EVERY == 0:
                self._check(pieces, messages, render_text)
            return pieces
        pieces = self.chunks.split(render_text(messages))
        self.counts.rendered += 1
        if self.fill and key not in self.shapes:
            self.shapes[key] = messages
        return pieces

    def _check(self, pieces: Pieces, messages: list[dict], render_text) -> None:
        self.counts.checked += 1
        try:
            same = self.chunks.split(render_text(messages)) == pieces
        except Exception:  # the template raises for these contents where their shape rendered
            same = False
        if not same:
            raise FillMismatch("the chat template renders a turn differently from the other turns of its shape "
                               "(it reads the messages' contents)")

    def _cache(self, first: list[dict], render_text) -> _Shape | None:
        slots = [number for number, message in enumerate(first) if self.fillable(message.get("content"))]
        placeholders, probe = list(first), list(first)
        for number in slots:
            placeholders[number] = dict(first[number], content=_SLOT.format(number))
            probe[number] = dict(first[number], content=f"{number}{_PROBE}{number}")
        try:
            shape = _Shape(self.chunks.split(render_text(placeholders)))
            exact = (shape.fill(first) == self.chunks.split(render_text(first))
                     and shape.fill(probe) == self.chunks.split(render_text(probe)))
        except Exception:  # a template may raise anything; the real render says why, for the real record
            exact = False
        if not exact:
            self.counts.refused += 1
            return None
        self.counts.shapes += 1
        return shape
