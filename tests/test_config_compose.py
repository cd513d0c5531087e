"""Every option of every config group composes, and the defaults are the product's defaults."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import compose

from lyra.paths import CONF_DIR

GROUPS = ["model", "quantization", "lora", "persona", "data", "trainer", "logger", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option",
    [(group, option) for group in GROUPS for option in _options(group)],
)
def test_every_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}", f"paths.output_dir={tmp_path}"]
    if option == "jsonl":
        overrides.append("data.train_file=chats.jsonl")
    cfg = compose(overrides)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert container["lora"]["target_modules"]


def test_default_is_4bit_qwen3_0_6b(tmp_path):
    cfg = compose([f"paths.output_dir={tmp_path}"])
    assert cfg.model.name_or_path == "Qwen/Qwen3-0.6B"
    assert cfg.model.trust_remote_code is False
    assert OmegaConf.to_container(cfg.quantization) == {
        "load_in_4bit": True,
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    assert list(cfg.lora.target_modules) == ["q_proj", "v_proj"]
    assert cfg.persona.name == "萊拉" and cfg.persona.language == "zh-TW"  # the default persona
    assert cfg.data.train_file == cfg.persona.train_file and cfg.data.train_file.endswith("lyra_train.jsonl")
    assert cfg.data.system_prompt == cfg.persona.system_prompt
    assert cfg.logger.project == "lyra"


def test_overrides_are_library_kwargs(tmp_path):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    cfg = compose(["lora=attn", "lora.r=16", "lora.lora_alpha=32", f"paths.output_dir={tmp_path}"])
    lora = LoraConfig(**OmegaConf.to_container(cfg.lora))
    assert (lora.r, lora.lora_alpha) == (16, 32)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    quant = BitsAndBytesConfig(**OmegaConf.to_container(cfg.quantization))
    assert quant.load_in_4bit and quant.bnb_4bit_use_double_quant


def test_smoke_experiment_is_tiny_4bit_and_short(tmp_path):
    cfg = compose(["experiment=smoke", f"paths.output_dir={tmp_path}"])
    assert cfg.model.build.num_hidden_layers <= 2
    assert cfg.quantization.load_in_4bit is True
    assert 0 < cfg.trainer.max_steps <= 10
