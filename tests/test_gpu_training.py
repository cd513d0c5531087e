"""CUDA-only checks (marker `gpu`; skipped without a GPU, collected by scripts/gpu_check.sh): lyra's
fused supervised loss and padding-free batches on the GPU, in bf16, through a 4-bit model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lora_setup

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    return tiny_lora_setup(tmp_path_factory.mktemp("g"))


def test_fused_loss_equals_full_logits_loss_on_gpu(gpu_setup, tmp_path):
    from transformers import TrainingArguments

    from lyra.data.tokenization import IGNORE_INDEX
    from lyra.loss import shifted_targets
    from lyra.trainer import build_trainer

    cfg, tokenizer, splits, model, dtype = gpu_setup
    assert dtype in (torch.bfloat16, torch.float16) and model.device.type == "cuda"
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", bf16=dtype == torch.bfloat16,
                             fp16=dtype == torch.float16, per_device_train_batch_size=4)
    trainer = build_trainer(model, args, tokenizer, splits.train, None, padding_free=False)
    batch = trainer._prepare_inputs(trainer.data_collator([splits.train[i] for i in range(4)]))
    model.eval()
    with torch.no_grad():
        standard = model(**batch).loss.item()
        lyra = trainer.compute_loss(model, dict(batch)).item()
    model.train()
    assert lyra == pytest.approx(standard, rel=1e-2)
    assert int((shifted_targets(batch["labels"]) != IGNORE_INDEX).sum()) > 0


def test_padding_free_equals_padded_on_gpu(gpu_setup, tmp_path):
    from transformers import DataCollatorWithFlattening, TrainingArguments

    from lyra.data.tokenization import IGNORE_INDEX
    from lyra.trainer import build_trainer

    cfg, tokenizer, splits, model, dtype = gpu_setup
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", bf16=dtype == torch.bfloat16,
                             fp16=dtype == torch.float16)
    trainer = build_trainer(model, args, tokenizer, splits.train, None, padding_free=False)
    examples = [splits.train[i] for i in (0, 5, 9)]
    padded = trainer._prepare_inputs(trainer.data_collator(examples))
    flat = trainer._prepare_inputs(DataCollatorWithFlattening(return_position_ids=True,
                                                              separator_id=IGNORE_INDEX)(examples))
    model.eval()
    with torch.no_grad():
        assert trainer.compute_loss(model, flat).item() == pytest.approx(trainer.compute_loss(model, padded).item(),
                                                                         rel=1e-2)
    model.train()
