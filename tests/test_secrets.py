"""Secrets never reach disk: planted env values are masked in config, metrics, logs and W&B.

The end-to-end check (a real CLI run with W&B offline and planted values, every written byte
grepped) lives in test_secrets_concurrent_runs.py, where it shares its run with the concurrency test.
"""

from __future__ import annotations

import io
import logging

import pytest
from omegaconf import OmegaConf

from lyra.secrets import MASK, install_log_scrubber, scrub, scrub_config, scrub_files, secret_values

PLANTED = {
    "WANDB_API_KEY": "planted0wandb0key0000000000000000000000000",
    "HF_TOKEN": "hf_plantedHubToken1234567890",
    "LYRA_TEST_DB_PASSWORD": "planted-db-password-42",
    "MY_SERVICE_SECRET": "planted-service-secret-99",
}


@pytest.fixture
def planted(monkeypatch):
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # named like a token, but a flag
    monkeypatch.setenv("LYRA_TEST_PLAIN_VALUE", "plain-value-not-hidden")
    return PLANTED


def test_secret_values_are_env_values_named_like_credentials(planted):
    values = secret_values()
    assert set(planted.values()) <= set(values)
    assert "false" not in values and "plain-value-not-hidden" not in values
    assert secret_values({"GITHUB_TOKEN": "ghp_abcdefgh", "HOME": "/root/secret-home", "API_KEY": "short"}) == \
        ["ghp_abcdefgh"]


def test_scrub_masks_nested_values_and_keeps_everything_else(planted):
    token = planted["HF_TOKEN"]
    data = {"model": {"token": token, "url": f"https://user:{token}@hub/x", "r": 8},
            "tags": ["a", token], "loss": 1.5}
    assert scrub(data) == {"model": {"token": MASK, "url": f"https://user:{MASK}@hub/x", "r": 8},
                           "tags": ["a", MASK], "loss": 1.5}
    assert data["model"]["token"] == token  # a copy; the live config keeps working


def test_a_secret_containing_another_is_masked_whole():
    assert scrub("xx abcdefgh-12345678 yy", ["abcdefgh-12345678", "abcdefgh"]) == f"xx {MASK} yy"


def test_scrub_config_masks_an_env_interpolation(planted):
    config = OmegaConf.create({"hub": {"token": "${oc.env:HF_TOKEN}"}, "plain": "${oc.env:LYRA_TEST_PLAIN_VALUE}"})
    assert OmegaConf.to_container(scrub_config(config)) == {"hub": {"token": MASK},
                                                            "plain": "plain-value-not-hidden"}


def test_log_records_are_masked_for_every_handler(planted):
    install_log_scrubber()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("lyra.test_secrets")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("login with %s and %s", planted["HF_TOKEN"], planted["LYRA_TEST_DB_PASSWORD"])
        logger.warning(f"key={planted['WANDB_API_KEY']}")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == f"login with {MASK} and {MASK}\nkey={MASK}\n"


def test_web_passwords_are_masked_in_logs_configs_and_wandb_summaries(monkeypatch):
    """The web page's logins: LYRA_WEB_AUTH (whole value and each password alone) and the passwords
    lyra.web registers from auth= / auth_file=, in log records and in what resolved_config.yaml and
    W&B get (scrub_config / scrub)."""
    from lyra.web import parse_credentials

    monkeypatch.setenv("LYRA_WEB_AUTH", "ana:env-password-1\nbo:env-password-2")
    monkeypatch.setattr("lyra.secrets._registered", set())
    assert parse_credentials("cy:file-password-3", "auth_file", "users.txt") == [("cy", "file-password-3")]
    install_log_scrubber()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("lyra.test_secrets.web")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("login %s / %s / %s", "env-password-2", "file-password-3", "ana:env-password-1\nbo:env-password-2")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == f"login {MASK} / {MASK} / {MASK}\n"
    config = OmegaConf.create({"web": {"auth": "cy:file-password-3", "env": "${oc.env:LYRA_WEB_AUTH}"}})
    assert OmegaConf.to_container(scrub_config(config)) == {"web": {"auth": f"cy:{MASK}", "env": MASK}}
    assert scrub({"note": "bo:env-password-2"}) == {"note": f"bo:{MASK}"}
    assert "file-password-3" not in secret_values({})  # registered values are this process's own, not any env's


def test_hydra_records_of_shell_expanded_overrides_are_masked(planted, tmp_path):
    (tmp_path / "overrides.yaml").write_text(f"- +hub.token={planted['HF_TOKEN']}\n- lora.r=8\n")
    scrub_files(tmp_path)
    assert (tmp_path / "overrides.yaml").read_text() == f"- +hub.token={MASK}\n- lora.r=8\n"


def test_a_failed_sweep_jobs_record_masks_secrets(planted, tmp_path):
    from lyra.errors import UserError
    from lyra.sweep import FAILED_FILE, record_failure

    error = UserError("data.train_file", f"file not found: /data/{planted['HF_TOKEN']}.jsonl")
    record_failure(tmp_path, error, [f"+hub.token={planted['HF_TOKEN']}", "lora.r=8"])
    written = (tmp_path / FAILED_FILE).read_text()
    assert planted["HF_TOKEN"] not in written
    assert f"+hub.token={MASK}" in written and "lora.r=8" in written and '"key": "data.train_file"' in written


def test_weights_are_saved_and_loaded_as_safetensors_only(smoke_run, tmp_path):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lyra.modeling import build_model

    for directory in [smoke_run / "adapter", *(smoke_run / "checkpoints").iterdir()]:
        assert [p.name for p in directory.glob("adapter_model.*")] == ["adapter_model.safetensors"], directory
    # A base model that only ships pickled weights is refused rather than unpickled.
    pickled = tmp_path / "pickled"
    config = Qwen3Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    config.save_pretrained(pickled)
    torch.save(Qwen3ForCausalLM(config).state_dict(), pickled / "pytorch_model.bin")
    model_cfg = OmegaConf.create({"name_or_path": str(pickled), "trust_remote_code": False,
                                  "attn_implementation": "sdpa", "build": None})
    with pytest.raises(OSError, match="no file named model.safetensors"):
        build_model(model_cfg, None, torch.float32, device="cpu")


def test_trust_remote_code_is_off_by_default_and_logged_when_on(caplog):
    import torch

    from conftest import compose
    from lyra.modeling import build_model

    for model in ("qwen3_0_6b", "tiny_qwen3"):
        assert compose([f"model={model}"]).model.trust_remote_code is False
    model_cfg = compose(["experiment=smoke", "model.trust_remote_code=true"]).model
    caplog.set_level("WARNING", logger="lyra.modeling")
    build_model(model_cfg, None, torch.float32, device="cpu")
    assert f"model.trust_remote_code=true: code from {model_cfg.name_or_path} will run on this machine" in caplog.text
