"""lyra.compiled_decode: the compiled decode step gives the eager path's greedy replies, runs on fresh
caches reply after reply, never answers with another model's or a swapped-out weight, and says why
it stays eager where it cannot compile. Compiling SmolLM2 takes ~1 min on 2 cores (once per module)."""

from __future__ import annotations

import pytest
import torch

from conftest import compose

PROMPTS = ["I had a long day at work. Any advice for a quiet evening?", "What is your name?",
           "Tell me about the sea, the ships you have seen and the storms you remember."]
SETTINGS = {"do_sample": False, "repetition_penalty": 1.1, "max_new_tokens": 48}


def _count_compiled_steps(decoder) -> list[int]:
    """Wrap the decoder's compiled callable: the test must see the compiled step run, not just pass."""
    calls = [0]
    compiled = decoder.compiled

    def counted(**kwargs):
        calls[0] += 1
        return compiled(**kwargs)

    decoder.compiled = counted
    return calls


@pytest.fixture(scope="module")
def smollm2_compiled(smollm2_dir, smollm2_tokenizer):
    """Real SmolLM2 fp32 as the apps load it (prepacked), its eager replies, then compile_decode."""
    from lyra.compiled_decode import compile_decode
    from lyra.generation import build_prompt_ids, generate_replies
    from lyra.modeling import build_model
    from lyra.prepack import prepack_linears

    model = build_model(compose(["model=smollm2_135m"]).model, None, torch.float32, "cpu").eval()
    assert prepack_linears(model).layers > 200
    prompts = [build_prompt_ids(text, smollm2_tokenizer, system_prompt="You are Pippa, a lighthouse keeper.")
               for text in PROMPTS]
    eager = [generate_replies([ids], model, smollm2_tokenizer, **SETTINGS)[0].token_ids for ids in prompts]
    report = compile_decode(model, smollm2_tokenizer, max_length=2304)
    assert not report.reason, str(report)
    return model, prompts, eager


def test_greedy_replies_on_real_smollm2_weights_are_token_identical(smollm2_compiled, smollm2_tokenizer):
    """What a user sees: the same greedy reply, token for token, for prompts of three lengths, each on
    a fresh cache of the same compiled length (a graph bound to the first cache would fail or drift)."""
    from lyra.compiled_decode import GUARDED_STEPS, compiled_decode_of
    from lyra.generation import generate_replies

    model, prompts, eager = smollm2_compiled
    decoder = compiled_decode_of(model)
    calls, unguarded = _count_compiled_steps(decoder), decoder.unguarded_steps
    compiled = [generate_replies([ids], model, smollm2_tokenizer, **SETTINGS)[0].token_ids for ids in prompts]
    assert compiled == eager and min(len(ids) for ids in eager) > 8
    assert calls[0] == sum(len(ids) for ids in compiled) - len(compiled)  # every step after the prompt's
    # all but each reply's first GUARDED_STEPS ran with only the guards that tell graphs apart
    assert decoder.unguarded_steps - unguarded == calls[0] - GUARDED_STEPS * len(compiled)


def test_a_swapped_or_edited_weight_sends_replies_back_to_the_eager_path(smollm2_compiled, smollm2_tokenizer):
    """The compiled graph holds the weights as constants: after the web page's base toggle (a weight
    swapped by pointer) or an in-place edit, a reply must not come from the stale constants."""
    from lyra.compiled_decode import compiled_decode_of
    from lyra.generation import generate_replies

    model, prompts, eager = smollm2_compiled
    decoder = compiled_decode_of(model)

    def fits(batch: int = 1, length: int = 100) -> bool:
        with torch.inference_mode():
            return decoder.cache_for(batch, length) is not None

    assert fits() and not fits(batch=2) and not fits(length=10_000)  # batches and over-long replies: eager
    assert decoder.cache_for(1, 100) is None  # autograd on: eager
    down = model.model.layers[0].mlp.down_proj
    original = down.weight
    try:
        down.weight = torch.nn.Parameter(original.detach() * 2, requires_grad=False)
        assert not fits()
        calls = _count_compiled_steps(decoder)
        changed = generate_replies([prompts[0]], model, smollm2_tokenizer, **SETTINGS)[0].token_ids
        assert calls[0] == 0 and changed != eager[0]  # the new weight answered, eagerly
    finally:
        down.weight = original
    assert fits()  # the weights it compiled are back
    with torch.no_grad():
        original.mul_(1.0)  # an in-place edit, even a no-op one, bumps the version
    assert not fits()


def _tiny_qwen3(seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         pad_token_id=151643, eos_token_id=151645, tie_word_embeddings=True)
    return Qwen3ForCausalLM(config).eval()


def test_two_models_in_one_process_each_answer_with_their_own_weights(tokenizer):
    """Both models run the same forward code: the second must get its own graph and constants, never
    the first one's (same shapes, other weights)."""
    from lyra.compiled_decode import compile_decode, compiled_decode_of
    from lyra.generation import generate_replies

    prompt = tokenizer("Hello there, who are you?")["input_ids"]
    settings = {"do_sample": False, "max_new_tokens": 12, "min_new_tokens": 12}
    models = [_tiny_qwen3(seed) for seed in (1, 2)]
    eager = [generate_replies([prompt], model, tokenizer, **settings)[0].token_ids for model in models]
    assert eager[0] != eager[1]  # else the test could not tell the models apart
    for model in models:
        assert not compile_decode(model, tokenizer, max_length=1024).reason
    calls = [_count_compiled_steps(compiled_decode_of(model)) for model in models]
    for _ in range(2):  # alternating, as two runs served from one process would
        assert [generate_replies([prompt], model, tokenizer, **settings)[0].token_ids for model in models] == eager
    assert [count[0] for count in calls] == [22, 22]
    # most of those steps skipped the full guards: the graphs were still told apart by model
    assert [compiled_decode_of(model).unguarded_steps for model in models] == [18, 18]


def test_cache_lengths_each_get_their_own_graph_reply_after_reply(tokenizer):
    """A long reply compiles the next cache length; replies then alternate between the two graphs,
    each step past a reply's first two checking only the guards that tell them apart (the length)."""
    from lyra.compiled_decode import compile_decode, compiled_decode_of
    from lyra.generation import generate_replies

    model = _tiny_qwen3(3)
    short = tokenizer("Hello there, who are you?")["input_ids"]
    long = (tokenizer("Tell me about the sea and the ships. ")["input_ids"] * 60)[:600]  # needs the 1024 cache
    settings = {"do_sample": False, "max_new_tokens": 8, "min_new_tokens": 8}
    eager = [generate_replies([ids], model, tokenizer, **settings)[0].token_ids for ids in (short, long)]
    assert not compile_decode(model, tokenizer, max_length=1024).reason
    decoder = compiled_decode_of(model)
    for _ in range(2):
        assert [generate_replies([ids], model, tokenizer, **settings)[0].token_ids for ids in (short, long)] == eager
    assert decoder.lengths == {512, 1024} and decoder.unguarded_steps == 4 * (7 - 2)


def test_a_step_that_differs_from_the_last_checks_every_guard():
    """The step signature sees what guards would: another shape, dtype or grad mode is another step."""
    from lyra.compiled_decode import _step_signature

    step = {"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([7]), "use_cache": True,
            "attention_mask": {"full_attention": torch.ones(1, 1, 1, 512, dtype=torch.bool)}}
    with torch.inference_mode():
        same = _step_signature(step)
        assert _step_signature({**step, "input_ids": torch.tensor([[9]])}) == same  # values are graph inputs
        assert _step_signature({**step, "attention_mask": {"full_attention": torch.zeros(1, 1, 1, 512,
                                                                                         dtype=torch.bool)}}) == same
        assert _step_signature({**step, "attention_mask": {"full_attention": torch.ones(1, 1, 1, 1024,
                                                                                        dtype=torch.bool)}}) != same
        assert _step_signature({**step, "input_ids": torch.tensor([[5, 6]])}) != same
        assert _step_signature({**step, "cache_position": torch.tensor([7.0])}) != same
        assert _step_signature({**step, "use_cache": False}) != same
        assert _step_signature({**step, "logits_to_keep": 1}) != same
    assert _step_signature(step) != same  # autograd on


def test_where_it_cannot_compile_it_says_why_and_replies_stay_eager(tokenizer):
    from lyra.compiled_decode import compile_decode, compiled_decode_of

    model = _tiny_qwen3(0).to(torch.float16)
    report = compile_decode(model, tokenizer, max_length=1024)
    assert "weights are float16" in str(report) and compiled_decode_of(model) is None
    assert "forward" not in model.__dict__


def test_cache_lengths_come_in_few_sizes():
    from lyra.compiled_decode import bucket_length

    assert [bucket_length(n, 2304) for n in (1, 110, 512, 513, 1500, 2100, 2304)] == [
        512, 512, 512, 1024, 2048, 2304, 2304]
    assert bucket_length(100, 300) == 300  # a context shorter than the smallest length


def test_compile_decode_takes_true_or_false():
    from omegaconf import OmegaConf

    from lyra.engines import check_engine_keys
    from lyra.errors import UserError

    cfg = OmegaConf.create({"engine": "auto", "gguf_type": "f16", "compile_decode": "yes"})
    with pytest.raises(UserError) as error:
        check_engine_keys(cfg)
    assert error.value.key == "compile_decode"
    check_engine_keys(OmegaConf.merge(cfg, {"compile_decode": True}))
