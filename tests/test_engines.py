"""lyra.engines: the llamacpp engine answers as the transformers engine does, or refuses to serve.

On a copy of the smoke run (the session's run stays read-only): the run's f16 GGUF is made once and
cached by adapter hash, greedy replies (ids, text, streamed deltas) equal the transformers engine's,
a second start neither exports nor re-checks, a difference refuses engine=llamacpp and sends auto
back to transformers, and `python -m lyra.serve engine=llamacpp` answers the official `openai`
client. lyra's token rules on llama.cpp logits are checked against transformers' own processors on
random logits. Needs llama-cpp-python for all but the choice and the token rules.

    PYTHONPATH=$PWD python -m pytest -q tests/test_engines.py
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from lyra.engines import TokenPicker, check_engine, check_llamacpp_generation, resolve_engine
from lyra.errors import UserError

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
GREEDY = {"do_sample": False, "repetition_penalty": 1.1, "max_new_tokens": 16}
PROMPTS = ("Hello there, how are you?", "I had a long day at work.")


# ---------------------------------------------------------------- choosing (no model)

def test_auto_picks_transformers_when_llama_cpp_is_not_importable(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert resolve_engine("auto", "cpu") == "transformers"
    assert resolve_engine("transformers", "cpu") == "transformers"
    with pytest.raises(UserError) as error:
        resolve_engine("llamacpp", "cpu")
    assert error.value.key == "engine" and "pip install 'lyra[gguf-runtime]'" in error.value.message


@needs_llama_cpp
def test_auto_picks_llamacpp_on_cpu_only():
    assert resolve_engine("auto", "cpu") == "llamacpp"
    assert resolve_engine("auto", "cuda:0") == "transformers"


def test_bad_engine_and_unmappable_settings_are_one_line():
    with pytest.raises(UserError) as error:
        check_engine("vllm")
    assert str(error.value) == "engine: must be one of transformers, llamacpp, auto, got 'vllm'"
    check_llamacpp_generation({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": None})
    with pytest.raises(UserError) as error:
        check_llamacpp_generation({"num_beams": 4})
    assert error.value.key == "generation.num_beams" and "engine=transformers" in error.value.message


# ---------------------------------------------------------------- token rules (no model)

def test_greedy_rule_equals_transformers_processors_with_both_penalties():
    import numpy as np
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from lyra.engines import openai_penalties

    rng = np.random.default_rng(0)
    prompt, vocab = [3, 5, 7, 5], 50
    picker = TokenPicker(prompt, stops=[0], penalties=(0.4, 0.3), do_sample=False, repetition_penalty=1.3)
    reply: list[int] = []
    for _ in range(12):
        logits = rng.normal(size=vocab).astype(np.float32) * 2
        ids = torch.tensor([prompt + reply])
        scores = RepetitionPenaltyLogitsProcessor(1.3)(ids, torch.tensor(logits)[None].clone())
        scores = openai_penalties(0.4, 0.3, prompt_length=len(prompt))(ids, scores)
        token = picker(logits, reply)
        assert token == int(scores.argmax())
        reply.append(token)


def test_sampling_keeps_the_tokens_transformers_warpers_keep():
    import numpy as np
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(1)
    logits = rng.normal(size=40).astype(np.float32) * 3
    scores = torch.tensor(logits)[None]
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        scores = warper(None, scores)
    kept = set(torch.nonzero(torch.isfinite(scores[0])).flatten().tolist())
    picker = TokenPicker([], stops=[0], seed=0, do_sample=True, temperature=0.7, top_k=10, top_p=0.8)
    drawn = {picker(logits, []) for _ in range(400)}
    assert drawn <= kept and len(drawn) > 1
    again = TokenPicker([], stops=[0], seed=0, do_sample=True, temperature=0.7, top_k=10, top_p=0.8)
    first = TokenPicker([], stops=[0], seed=0, do_sample=True, temperature=0.7, top_k=10, top_p=0.8)
    assert [again(logits, []) for _ in range(20)] == [first(logits, []) for _ in range(20)]  # seed repeats


# ---------------------------------------------------------------- the engine on the smoke run

@pytest.fixture(scope="module")
def engine_run(smoke_run, tmp_path_factory):
    """A writable copy of the smoke run, loaded (the GGUF cache goes into its exports/)."""
    from lyra.runs import load_run

    run_dir = tmp_path_factory.mktemp("engine") / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    return load_run(run_dir)


@pytest.fixture(scope="module")
def llamacpp(engine_run):
    from lyra.engines import open_engine

    engine = open_engine(engine_run, "llamacpp", generation=GREEDY)
    yield engine
    engine.close()


@pytest.mark.slow  # the first use makes the GGUF (a lyra.export subprocess)
@needs_llama_cpp
def test_llamacpp_greedy_replies_equal_transformers_streamed_and_not(engine_run, llamacpp):
    from lyra.engines import LlamaCppEngine, TransformersEngine
    from lyra.generation import build_prompt_ids

    assert isinstance(llamacpp, LlamaCppEngine) and llamacpp.gguf_file.name == "model-f16.gguf"
    transformers = TransformersEngine(engine_run)
    for text in PROMPTS:
        ids = build_prompt_ids(text, engine_run.tokenizer, system_prompt=engine_run.system_prompt)
        ours, theirs = llamacpp.generate(ids, **GREEDY), transformers.generate(ids, **GREEDY)
        assert ours.token_ids == theirs.token_ids and ours.text == theirs.text
        assert ours.ended_by_eos == theirs.ended_by_eos and ours.prompt_tokens == len(ids)
        streamer = llamacpp.streamer()
        assert "".join(llamacpp.stream(ids, streamer=streamer, **GREEDY)) == theirs.text
        assert streamer.generated == theirs.token_ids  # what the server counts as completion tokens


@needs_llama_cpp
def test_second_start_reuses_the_gguf_and_the_verdict(engine_run, llamacpp, monkeypatch, caplog):
    import lyra.engines

    def no(*args, **kwargs):
        raise AssertionError("a second start must not export or check again")

    monkeypatch.setattr(lyra.engines.subprocess, "run", no)
    monkeypatch.setattr(lyra.engines, "greedy_parity", no)
    with caplog.at_level("INFO", logger="lyra.engines"):
        again = lyra.engines.open_engine(engine_run, "llamacpp", generation=GREEDY)
    again.close()
    assert again.gguf_file == llamacpp.gguf_file
    assert (llamacpp.gguf_file.parent / "engine_parity.json").is_file()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("engine: llamacpp"))
    assert "GGUF f16 cached at" in line and "parity 3/3" in line and "cached verdict" in line


def test_auto_without_llama_cpp_says_what_installing_it_gives_on_cpu(engine_run, monkeypatch, caplog):
    import lyra.engines

    monkeypatch.setattr(lyra.engines, "llama_cpp_installed", lambda: False)
    hint = "on CPU llama.cpp replies ~4x faster: pip install 'lyra[gguf-runtime]'"
    for quantized in (False, True):  # auto keeps a 4-bit run on transformers anyway: no hint there
        monkeypatch.setattr(lyra.engines, "is_quantized", lambda model, quantized=quantized: quantized)
        caplog.clear()
        with caplog.at_level("INFO", logger="lyra.engines"):
            engine = lyra.engines.open_engine(engine_run, "auto", generation=GREEDY)
        assert isinstance(engine, lyra.engines.TransformersEngine)
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("engine: transformers"))
        assert "auto: llama-cpp-python is not installed" in line and (hint in line) is not quantized


def test_compile_decode_that_cannot_compile_says_why_as_a_warning(engine_run, caplog):
    """compile_decode=true on a run it cannot compile (the smoke run's 4-bit base): the reason is a
    warning, which chat shows (it shows warnings only), and replies stay on the eager engine."""
    from omegaconf import OmegaConf

    from lyra.compiled_decode import compiled_decode_of
    from lyra.engines import open_app_engine

    cfg = OmegaConf.create({"engine": "transformers", "gguf_type": "f16", "compile_decode": True, "generation": GREEDY,
                            "device": None})
    with caplog.at_level("INFO", logger="lyra.engines"):
        _, _, engine = open_app_engine(cfg, n_ctx=256, run=engine_run)
    assert engine.name == "transformers" and compiled_decode_of(engine_run.model) is None
    reasons = [r for r in caplog.records if r.getMessage().startswith("decode not compiled: ")]
    assert [r.levelname for r in reasons] == ["WARNING"] and "quantized" in reasons[0].getMessage()


@needs_llama_cpp
def test_llamacpp_releases_the_transformers_models_packed_copies(engine_run, llamacpp, caplog):
    """Chat, web and serve load the run prepacked; once llama.cpp serves, transformers answers only the
    adapter-off toggle, so its packed copies are dropped (and made again on its first reply)."""
    import torch

    import lyra.engines
    from lyra.runs import load_run

    packed = load_run(engine_run.run_dir, prepack=True)
    layers = [module for module in packed.model.modules() if hasattr(module, "_lyra_packs")]
    assert layers and all(module._lyra_packs for module in layers)
    with caplog.at_level("INFO", logger="lyra.engines"):
        engine = lyra.engines.open_engine(packed, "llamacpp", generation=GREEDY)  # GGUF and verdict cached
    engine.close()
    assert all(module._lyra_packs == {} for module in layers)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("engine: llamacpp"))
    assert "released the transformers model's" in line and "MB of prepacked weights" in line
    with torch.no_grad():
        packed.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert all(module._lyra_packs for module in layers)


@needs_llama_cpp
def test_a_different_reply_refuses_llamacpp_and_sends_auto_back_to_transformers(engine_run, llamacpp, monkeypatch,
                                                                               caplog):
    import lyra.engines
    from lyra.generation import Reply

    real = lyra.engines.LlamaCppEngine.generate

    def off_by_one(self, prompt_ids, **generation):  # a runtime that picks another first token
        reply = real(self, prompt_ids, **generation)
        return Reply(text="x", raw="x", token_ids=[reply.token_ids[0] + 1, *reply.token_ids[1:]])

    monkeypatch.setattr(lyra.engines.LlamaCppEngine, "generate", off_by_one)
    other = {**GREEDY, "repetition_penalty": 1.2}  # another verdict key: the cached agreement does not apply
    with pytest.raises(UserError) as error:
        lyra.engines.open_engine(engine_run, "llamacpp", generation=other, parity_tokens=8)
    assert error.value.key == "engine"
    assert "differs from transformers' on probe(s) 1, 2, 3 of 3" in error.value.message
    monkeypatch.setattr(lyra.engines, "is_quantized", lambda model: False)  # auto skips 4-bit runs otherwise
    with caplog.at_level("WARNING", logger="lyra.engines"):
        engine = lyra.engines.open_engine(engine_run, "auto", generation=other, parity_tokens=8)
    assert engine.name == "transformers"
    assert any("auto fell back from llamacpp" in r.getMessage() for r in caplog.records)


@needs_llama_cpp
def test_auto_keeps_a_4bit_run_on_transformers(engine_run):
    from lyra.engines import open_engine

    assert open_engine(engine_run, "auto", generation=GREEDY).name == "transformers"


@pytest.mark.slow  # a lyra.serve subprocess
@needs_llama_cpp
def test_server_on_llamacpp_answers_the_openai_client(engine_run, llamacpp, tmp_path):
    from openai import OpenAI
    from test_serve import Server

    from lyra.engines import TransformersEngine
    from lyra.generation import build_prompt_ids

    server = Server(engine_run.run_dir, tmp_path / "server.log", "engine=llamacpp", "generation.max_new_tokens=16",
                    "generation.do_sample=false", "generation.repetition_penalty=1.1")
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        expected = TransformersEngine(engine_run).generate(
            build_prompt_ids(PROMPTS[0], engine_run.tokenizer, system_prompt=engine_run.system_prompt), **GREEDY)
        model = client.models.list().data[0].id
        response = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)
        assert response.choices[0].message.content == expected.text
        assert response.usage.completion_tokens == len(expected.token_ids)
        stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16,
                                                stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected.text
        base = client.chat.completions.create(model=f"{model}-base", messages=messages, temperature=0, max_tokens=4)
        assert base.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()
    log = server.log()
    assert "engine: llamacpp (GGUF f16 cached at" in log and f"{model}-base runs on transformers" in log
