"""Turning conversations into training examples with assistant-only labels.

Each assistant turn becomes one example: the prompt is exactly what `lyra.chat` feeds the model
for that history (the tokenizer's chat template, `enable_thinking=False`, generation prompt on),
and only the reply plus the template's end-of-turn token (Qwen3 and SmolLM2: `<|im_end|>`) is
supervised. Qwen3's template puts an empty `<think>\n\n</think>\n\n` block only before the *last*
assistant turn, so rendering a whole multi-turn chat as one sequence would train earlier turns on
a context chat never produces.

Nothing here names a model: the end-of-turn token is read off the tokenizer's own template
(`turn_end_ids`), so any HF chat model whose template renders the conversation works.
"""

from __future__ import annotations

from dataclasses import dataclass

from lyra.data.formats import Conversation

IGNORE_INDEX = -100


@dataclass
class EncodeStats:
    conversations: int = 0
    examples: int = 0
    dropped_turns: int = 0  # assistant turns whose prompt + reply exceed max_length
    truncated_conversations: int = 0  # conversations that lost at least one trailing turn


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend the configured system prompt unless the conversation brings its own."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


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


def chat_prompt_ids(messages: list[dict[str, str]], tokenizer) -> list[int]:
    """Token ids the model sees before it writes the next assistant reply (shared with chat)."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              enable_thinking=False, return_dict=True)["input_ids"])


def encode_turn(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for the last message of `messages`, which must be an assistant turn."""
    prompt = chat_prompt_ids(messages[:-1], tokenizer)
    full = list(tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=False,
                                              return_dict=True)["input_ids"])
    if full[: len(prompt)] != prompt:
        raise ValueError("chat template rendered the prompt differently with and without the reply")
    ends = set(turn_end_ids(tokenizer))
    end = next((i for i in range(len(prompt), len(full)) if full[i] in ends), None)
    if end is None:
        raise ValueError("chat template rendered the reply without an end-of-turn or eos token")
    input_ids = full[: end + 1]  # anything the template adds after the end token ("\n") is never generated
    labels = [IGNORE_INDEX] * len(prompt) + input_ids[len(prompt):]
    return input_ids, labels


def encode_conversation(conversation: Conversation, tokenizer, max_length: int,
                        system_prompt: str | None, stats: EncodeStats | None = None) -> list[dict]:
    """One example per assistant turn; a turn that does not fit ends the conversation."""
    stats = stats if stats is not None else EncodeStats()
    messages = with_system_prompt(conversation.messages, system_prompt)
    examples = []
    stats.conversations += 1
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        input_ids, labels = encode_turn(messages[: index + 1], tokenizer)
        if len(input_ids) > max_length:
            remaining = sum(m["role"] == "assistant" for m in messages[index:])
            stats.dropped_turns += remaining
            stats.truncated_conversations += 1
            break
        examples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    stats.examples += len(examples)
    return examples


def encode_conversations(conversations: list[Conversation], tokenizer, max_length: int,
                         system_prompt: str | None) -> tuple[list[dict], EncodeStats]:
    stats = EncodeStats()
    examples = [example for conversation in conversations
                for example in encode_conversation(conversation, tokenizer, max_length, system_prompt, stats)]
    return examples, stats
