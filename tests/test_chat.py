"""lyra.chat, lyra.generation and lyra.runs: think stripping, training/chat token identity, history budget, generation,
loading a run dir, and the chat CLI (in-process where possible, subprocesses for real stdin/exit codes).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, compose
from lyra.chat import chat
from lyra.generation import (ThinkFilter, build_prompt_ids, check_generation, fit_prompt, generate_replies,
                             generate_response, generation_config, stream_response, strip_think)
from lyra.data.tokenization import encode_turn, with_system_prompt
from lyra.errors import UserError

SYSTEM = "你是萊拉（Lyra），稱呼使用者為「主人」。"
FAST = {"do_sample": False, "max_new_tokens": 6}


# ---------------------------------------------------------------- think tags

@pytest.mark.parametrize("raw, clean", [
    ("主人好", "主人好"),
    ("<think>\n\n</think>\n\n主人好", "主人好"),
    ("<think>想一想</think>主人好<think>再想</think>，萊拉在", "主人好，萊拉在"),
    ("主人好<think>沒有結束的思考", "主人好"),
    ("<think>只有思考", ""),
    ("</think>\n\n主人好", "主人好"),
    ("  主人\n好  ", "主人\n好"),
    ("a < b <thin", "a < b <thin"),
])
def test_strip_think(raw, clean):
    assert strip_think(raw) == clean


def test_think_filter_streams_exactly_strip_think_for_any_chunking():
    texts = ["<think>想一想</think>\n\n主人好<think>x</think>萊拉", "主人 < 萊拉 </thi", "開始<think>未結束",
             "A</think> B<think></think>C  ", "<<think>>x</think>>"]
    rng = random.Random(0)
    for text in texts:
        for _ in range(30):
            cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))))
            chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            think = ThinkFilter()
            streamed = "".join(think.feed(chunk) for chunk in chunks) + think.finish()
            assert streamed == strip_think(text), (text, chunks)
    think = ThinkFilter()
    assert think.feed("主人<thi") == "主人"  # a possible tag is held back, not shown then retracted
    assert think.feed("nk>秘密") == ""


# ---------------------------------------------------------------- prompt == training

def test_prompt_tokens_are_exactly_what_training_put_before_each_reply(tokenizer):
    conversation = [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "主人您好～"},
        {"role": "user", "content": "我今天有點累"}, {"role": "assistant", "content": "主人辛苦了。"},
        {"role": "user", "content": "晚安"}, {"role": "assistant", "content": "晚安，主人。"},
    ]
    for own_system in (None, [{"role": "system", "content": "自訂系統提示"}]):
        messages = with_system_prompt((own_system or []) + conversation, SYSTEM)
        for index in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
            input_ids, labels = encode_turn(messages[: index + 1], tokenizer)
            n_prompt = labels.index(next(label for label in labels if label != -100))
            history = [m for m in messages[: index - 1] if m["role"] != "system" or own_system]
            ids = build_prompt_ids(messages[index - 1]["content"], tokenizer, history, SYSTEM)
            assert ids == input_ids[:n_prompt]
            assert tokenizer.decode(ids[-6:]).endswith("<think>\n\n</think>\n\n")
    # (user, reply) pairs, the seed/Gradio history shape, give the same tokens
    pairs = [("你好", "主人您好～")]
    assert build_prompt_ids("晚安", tokenizer, pairs, SYSTEM) == build_prompt_ids(
        "晚安", tokenizer, [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "主人您好～"}], SYSTEM)


def test_fit_prompt_drops_oldest_turns_and_never_the_system_prompt(tokenizer):
    history = []
    for turn in range(6):
        history += [{"role": "user", "content": f"第{turn}個問題" * 5}, {"role": "assistant", "content": f"第{turn}個回答" * 5}]
    full = len(build_prompt_ids("新問題", tokenizer, history, SYSTEM))
    budget = full - 20
    fitted = fit_prompt("新問題", tokenizer, history, SYSTEM, budget)
    assert len(fitted.ids) <= budget and not fitted.cut
    assert fitted.dropped_messages == 2 and fitted.history == history[2:]  # exactly one whole turn
    assert tokenizer.decode(fitted.ids).count(SYSTEM) == 1
    assert fitted.ids == build_prompt_ids("新問題", tokenizer, fitted.history, SYSTEM)


def test_fit_prompt_cuts_an_overlong_input_and_keeps_its_start(tokenizer):
    long_input = "".join(f"這是第{i}句話。" for i in range(400))
    fitted = fit_prompt(long_input, tokenizer, [{"role": "user", "content": "舊"}, {"role": "assistant", "content": "舊"}],
                        SYSTEM, 200)
    assert fitted.cut and fitted.history == [] and len(fitted.ids) <= 200
    assert fitted.prompt_text.startswith("這是第0句話。") and len(fitted.prompt_text) < len(long_input)
    assert "\ufffd" not in fitted.prompt_text
    with pytest.raises(UserError, match="cannot even hold the system prompt"):
        fit_prompt("hi", tokenizer, None, SYSTEM * 20, 50)


# ---------------------------------------------------------------- generation config

def test_generation_config_stops_on_both_end_tokens(tokenizer):
    config = generation_config(tokenizer, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1, max_new_tokens=9)
    assert config.eos_token_id == [151645, 151643] and config.pad_token_id == 151643
    assert (config.do_sample, config.temperature, config.top_k, config.max_new_tokens) == (True, 0.7, 20, 9)
    greedy = generation_config(tokenizer, temperature=0, top_p=0.5)
    assert greedy.do_sample is False and greedy.top_p is None  # sampling knobs dropped, not warned about


@pytest.mark.parametrize("knob, value, message", [
    ("temperature", -1, "generation.temperature: must be >= 0 (0 = greedy), got -1"),
    ("top_p", 1.5, "generation.top_p: must be in (0, 1], got 1.5"),
    ("max_new_tokens", 0, "generation.max_new_tokens: must be an integer >= 1, got 0"),
    ("temprature", 1.0, "generation.temprature: not a transformers GenerationConfig option"),
])
def test_check_generation_names_the_bad_knob(knob, value, message):
    with pytest.raises(UserError) as error:
        check_generation({knob: value})
    assert str(error.value) == message


# ---------------------------------------------------------------- a loaded run

@pytest.fixture(scope="module")
def loaded(smoke_run):
    from lyra.runs import load_run

    return load_run(smoke_run)


def test_load_run_rebuilds_the_trained_run(loaded, smoke_run):
    from peft import PeftModel

    assert isinstance(loaded.model, PeftModel) and not loaded.model.training
    assert loaded.system_prompt.startswith("你是萊拉") and loaded.run_dir == smoke_run
    assert loaded.model.base_model.model.config.use_cache is True
    assert getattr(loaded.model.base_model.model, "is_loaded_in_4bit", False)  # as trained (smoke = nf4)
    assert loaded.tokenizer.chat_template == (smoke_run / "adapter" / "chat_template.jinja").read_text()


def test_generate_and_stream_give_the_same_clean_reply(loaded):
    args = ("你好", loaded.model, loaded.tokenizer, [("早安", "主人早安")], loaded.system_prompt)
    reply = generate_response(*args, **FAST)
    streamed = list(stream_response(*args, **FAST))
    assert "".join(streamed) == reply
    assert "<think>" not in reply and "</think>" not in reply and reply == reply.strip()


def test_generation_stops_at_either_end_token(loaded):
    prompt = build_prompt_ids("你好", loaded.tokenizer, system_prompt=loaded.system_prompt)
    free = generate_replies([prompt], loaded.model, loaded.tokenizer, suppress_tokens=[151645, 151643], **FAST)[0]
    assert not free.ended_by_eos and len(free.token_ids) == FAST["max_new_tokens"]
    for stop in (151645, 151643):  # force the end token as the 3rd new token
        forced = generate_replies([prompt], loaded.model, loaded.tokenizer, do_sample=False, max_new_tokens=3,
                                  forced_eos_token_id=stop)[0]
        assert forced.ended_by_eos and forced.token_ids[-1] == stop and len(forced.token_ids) == 3
        assert "<|im_end|>" not in forced.raw and "<|endoftext|>" not in forced.raw


def test_batched_generation_sees_each_prompt_as_if_alone(loaded):
    from lyra.generation import left_padded

    tokenizer = loaded.tokenizer
    short = build_prompt_ids("你好", tokenizer, system_prompt=loaded.system_prompt)
    long = build_prompt_ids("請介紹一下你自己，越詳細越好", tokenizer, system_prompt=loaded.system_prompt)
    config = generation_config(tokenizer, do_sample=False, max_new_tokens=3)
    config.return_dict_in_generate, config.output_logits = True, True

    def step_logits(prompts):
        input_ids, attention_mask = left_padded(prompts, tokenizer.pad_token_id)
        return loaded.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config).logits

    batched, alone = step_logits([short, long]), step_logits([short])
    assert len(long) > len(short)  # so the short prompt really is padded in the batch
    for step in range(3):
        assert (batched[step][0] - alone[step][0]).abs().max() < 1e-4


# ---------------------------------------------------------------- bad run dirs

def _copy_run(smoke_run, target):
    target.mkdir()
    shutil.copy2(smoke_run / "resolved_config.yaml", target)
    shutil.copytree(smoke_run / "adapter", target / "adapter")
    return target


def test_bad_run_dirs_get_one_clear_line(smoke_run, tmp_path):
    from lyra.runs import load_run

    cases = []
    cases.append((tmp_path / "missing", "run_dir: not a directory: {p}"))
    (tmp_path / "empty" / ".hydra").mkdir(parents=True)
    cases.append((tmp_path / "empty", "run_dir: {p} has no resolved_config.yaml (it holds .hydra/ only: the "
                                      "training did not finish); pass the output dir of `python -m lyra.train`"))
    no_weights = _copy_run(smoke_run, tmp_path / "no_weights")
    (no_weights / "adapter" / "adapter_model.safetensors").unlink()
    cases.append((no_weights, "adapter: {p}/adapter has no adapter weights (adapter_model.safetensors)"))
    other_base = _copy_run(smoke_run, tmp_path / "other_base")
    config_file = other_base / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    trained_on, config["base_model_name_or_path"] = config["base_model_name_or_path"], "Qwen/Qwen3-1.7B"
    config_file.write_text(json.dumps(config))
    cases.append((other_base, "adapter: {p}/adapter was trained on base model 'Qwen/Qwen3-1.7B', but the run's config "
                              f"uses '{trained_on}'; pass the run dir the adapter came from"))
    for path, message in cases:
        with pytest.raises(UserError) as error:
            load_run(path)
        assert str(error.value) == message.format(p=path)
    with pytest.raises(UserError, match=r"^adapter: no adapter directory .*checkpoint-8"):
        load_run(smoke_run, adapter="checkpoints/checkpoint-99")


def test_adapter_none_loads_the_bare_base_with_the_runs_tokenizer(smoke_run):
    from peft import PeftModel

    from lyra.runs import load_run

    base = load_run(smoke_run, adapter="none")
    assert not isinstance(base.model, PeftModel) and base.adapter == "none"
    assert base.system_prompt.startswith("你是萊拉") and base.tokenizer.pad_token_id == 151643


# ---------------------------------------------------------------- the chat app, in-process

def _chat_cfg(run_dir, *extra):
    return compose([f"run_dir={run_dir}", "generation.do_sample=false", "generation.max_new_tokens=4", *extra],
                   config_name="chat")


def test_chat_session_multi_turn_reset_and_eof(smoke_run, loaded, monkeypatch):
    from lyra import chat as chat_module

    seen = []
    real_fit = chat_module.fit_prompt

    def spy(prompt_text, tokenizer, history, *args, **kwargs):  # every turn's prompt is fitted, then streamed
        seen.append((prompt_text, [m["content"] for m in history]))
        return real_fit(prompt_text, tokenizer, history, *args, **kwargs)

    monkeypatch.setattr(chat_module, "fit_prompt", spy)
    stdout, stderr = io.StringIO(), io.StringIO()
    chat(_chat_cfg(smoke_run), stdin=io.StringIO("你好\n\n我今天有點累\n/reset\n晚安\n"), stdout=stdout, stderr=stderr, run=loaded)
    out = stdout.getvalue()
    assert out.count("萊拉：") == 3 and out.count("您：") == 6  # 5 lines + the prompt shown at EOF
    assert "您：你好\n萊拉：" in out and "<think>" not in out
    assert [prompt for prompt, _ in seen] == ["你好", "我今天有點累", "晚安"]
    assert seen[1][1][0] == "你好" and len(seen[1][1]) == 2  # the first turn is remembered...
    assert seen[2][1] == []  # ...until /reset
    assert "對話已重置" in stderr.getvalue()


def test_one_shot_prompt_prints_only_the_reply(smoke_run, loaded):
    from lyra.chat import quote_text_overrides

    argv = quote_text_overrides([f"run_dir={smoke_run}", "prompt=你好，主人！", "generation.temperature=1.0",
                                 "generation.top_k=0", "generation.max_new_tokens=8"])  # as __main__ does
    stdout = io.StringIO()
    chat(compose(argv, config_name="chat"), stdin=io.StringIO("exit\n"), stdout=stdout, stderr=io.StringIO(), run=loaded)
    out = stdout.getvalue()
    assert out.endswith("\n") and out.count("\n") >= 1 and out.strip() and "萊拉：" not in out and "您：" not in out
    assert "<think>" not in out


def test_chat_cuts_overlong_input_with_a_notice(smoke_run, loaded):
    stdout, stderr = io.StringIO(), io.StringIO()
    chat(_chat_cfg(smoke_run, "max_prompt_tokens=120"), stdin=io.StringIO("很長的話" * 300 + "\nexit\n"),
         stdout=stdout, stderr=stderr, run=loaded)
    assert "輸入過長，已截斷" in stderr.getvalue() and stdout.getvalue().count("萊拉：") == 1


# ---------------------------------------------------------------- the chat CLI, as users run it

def _cli(args, cwd, stdin=""):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "lyra.chat", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_cli_piped_stdin_two_replies_then_exit(smoke_run, tmp_path):
    result = _cli([f"run_dir={smoke_run}", "generation.max_new_tokens=8"], tmp_path, "你好\n我今天有點累\nexit\n還在嗎\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("萊拉：") == 2 and "還在嗎" not in result.stdout
    assert result.stdout.startswith("您：你好\n萊拉：") and "<think>" not in result.stdout
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log file in the cwd


@pytest.mark.parametrize("text", ["你好，主人！", "it's", "${oops}", "a=b c", "end\\", "123", "null", "'"])
def test_free_text_overrides_reach_the_app_verbatim(text):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from lyra.chat import quote_text_overrides

    argv = quote_text_overrides([f"prompt={text}", "run_dir=r"])
    assert argv[1] == "run_dir=r"
    value = OverridesParser.create().parse_override(argv[0]).value()
    assert OmegaConf.create({"prompt": value}).prompt == text


def test_cli_bad_run_dir_is_one_line_and_exit_2(tmp_path):
    result = _cli(["run_dir=no/such/run"], tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"lyra: error: run_dir: not a directory: {tmp_path / 'no/such/run'}\n"
    assert result.stdout == ""
