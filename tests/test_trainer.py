"""lyra.trainer, lyra.loss, lyra.data.collate: the supervised-only loss is the standard masked loss (also across gradient
accumulation and in eval), and the collators pad, group and flatten as promised."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import compose, tiny_lora_setup
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from lyra.attention import use_tree_attention
from lyra.errors import UserError
from lyra.data.collate import PrefixSharingCollator, attention_implementation, build_collator
from lyra.data.tokenization import IGNORE_INDEX
from lyra.loss import linear_cross_entropy, shifted_targets, token_mask
from lyra.trainer import build_trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny 4-bit Qwen3 + LoRA (no dropout, non-zero B so every LoRA weight gets a gradient) + data."""
    cfg, tokenizer, splits, model, _ = tiny_lora_setup(tmp_path_factory.mktemp("t"))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return cfg, tokenizer, splits, model


EVAL_EXAMPLES = 4


def make_trainers(setup, tmp_path, **arg_overrides):
    cfg, tokenizer, splits, model = setup
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=2,
                             per_device_eval_batch_size=2, gradient_accumulation_steps=2, **arg_overrides)
    eval_subset = splits.eval.select(range(EVAL_EXAMPLES))  # keeps eval to 2 batches
    lyra = build_trainer(model, args, tokenizer, splits.train, eval_subset, padding_free=False)
    stock = Trainer(model=model, args=args, train_dataset=splits.train, eval_dataset=eval_subset,
                    data_collator=lyra.data_collator, processing_class=tokenizer)
    return lyra, stock


class HeadRows:
    """Counts the rows the LM head produces logits for, and the rows the last layer's MLP computes."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.mlp_rows: list[int] = []
        self.handles = [model.get_output_embeddings().register_forward_hook(
                            lambda _m, _i, out: self.rows.append(out.shape[:-1].numel())),
                        model.get_base_model().model.layers[-1].mlp.register_forward_hook(
                            lambda _m, _i, out: self.mlp_rows.append(out.shape[:-1].numel()))]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def full_logits_ce_sums(model, batches) -> list[float]:
    """The textbook objective's pieces: summed CE over each micro-batch's supervised next tokens."""
    sums = []
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            sums.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted_targets(batch["labels"]).flatten(),
                                                          ignore_index=IGNORE_INDEX, reduction="sum").item())
    return sums


def accumulate(trainer, model, batches):
    """One optimizer step's worth of training_step calls: (per-micro-batch losses, LoRA grads)."""
    model.zero_grad(set_to_none=True)
    num_items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    losses = [trainer.training_step(model, dict(batch), num_items).item() for batch in batches]
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return losses, grads


def test_supervised_loss_equals_full_logits_loss_across_gradient_accumulation(setup, tmp_path):
    cfg, tokenizer, splits, model = setup
    lyra, stock = make_trainers(setup, tmp_path)
    # among the 12 shortest examples (fast), the two shortest and the two longest replies: a mean of
    # per-batch means would differ from the token mean
    short = sorted(range(len(splits.train)), key=lambda i: len(splits.train[i]["input_ids"]))[:12]
    by_reply = sorted(short, key=lambda i: sum(label != IGNORE_INDEX for label in splits.train[i]["labels"]))
    batches = [lyra.data_collator([splits.train[i] for i in by_reply[:2]]),
               lyra.data_collator([splits.train[i] for i in by_reply[-2:]])]
    counts = [int((shifted_targets(b["labels"]) != IGNORE_INDEX).sum()) for b in batches]
    assert abs(counts[0] - counts[1]) >= 0.2 * max(counts)

    head = HeadRows(model)
    lyra_losses, lyra_grads = accumulate(lyra, model, batches)
    head.remove()
    stock_losses, stock_grads = accumulate(stock, model, batches)

    assert head.rows == counts  # logits only at supervised positions, never batch x seq
    assert head.mlp_rows == counts  # and the last layer's MLP, whose output feeds only the head
    assert len(lyra_grads) == 8 and all(g.abs().sum() > 0 for g in lyra_grads.values())  # q/v A and B, 2 layers
    # the fused loss sums the softmax gradient in another order (both within ~3e-9 of an fp64 reference
    # at the head's input); the random tiny model's norms amplify that to ~1e-3 of the largest LoRA grad
    for name, grad in stock_grads.items():
        torch.testing.assert_close(lyra_grads[name], grad, rtol=1e-3, atol=2e-3 * grad.abs().max().item())
    assert lyra_losses == pytest.approx(stock_losses, abs=1e-5)
    # each micro-batch contributes its CE sum over ALL supervised tokens of the step (mean of the
    # accumulated batch), not its own mean / accumulation steps
    sums = full_logits_ce_sums(model, batches)
    assert lyra_losses == pytest.approx([total / sum(counts) for total in sums], abs=1e-5)
    assert lyra_losses[0] != pytest.approx(sums[0] / counts[0] / 2, abs=0.1)


def test_eval_loss_uses_supervised_logits_and_matches_stock(setup, tmp_path):
    cfg, tokenizer, splits, model = setup
    lyra, stock = make_trainers(setup, tmp_path)
    head = HeadRows(model)
    lyra_eval = lyra.evaluate()["eval_loss"]
    head.remove()
    stock_eval = stock.evaluate()["eval_loss"]
    assert lyra_eval == pytest.approx(stock_eval, abs=1e-5)
    supervised = sum(int((shifted_targets(torch.tensor(e["labels"])) != IGNORE_INDEX).sum())
                     for e in splits.eval.select(range(EVAL_EXAMPLES)))
    assert sum(head.rows) == supervised == sum(head.mlp_rows)


def test_full_logits_when_predictions_are_requested(setup, tmp_path):
    cfg, tokenizer, splits, model = setup
    lyra, _ = make_trainers(setup, tmp_path)
    batch = lyra.data_collator([splits.eval[0]])
    loss, logits, labels = lyra.prediction_step(model, batch, prediction_loss_only=False)
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.vocab_size)
    loss_only, no_logits, _ = lyra.prediction_step(model, batch, prediction_loss_only=True)
    assert no_logits is None and loss_only.item() == pytest.approx(loss.item(), abs=1e-5)


def test_flattened_batch_gives_the_padded_loss(setup, tmp_path):
    """Padding-free packing: restarting position ids keep samples apart, boundaries are unsupervised."""
    cfg, tokenizer, splits, model = setup
    lyra, _ = make_trainers(setup, tmp_path)
    examples = [splits.train[i] for i in (0, 5, 9)]
    padded = lyra.data_collator(examples)
    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)(examples)
    assert flat["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    model.eval()
    with torch.no_grad():
        padded_loss = lyra.compute_loss(model, padded).item()
        flat_loss = lyra.compute_loss(model, flat).item()
    model.train()
    assert flat_loss == pytest.approx(padded_loss, abs=1e-5)


def same_conversation_pair(splits) -> tuple[int, int]:
    """Two consecutive examples that are turns 1 and 2 of one conversation (they share more than the system prompt)."""
    data = splits.train
    system = PrefixSharingCollator._shareable(*(np.asarray(data[i][k]) for i in (0, 1) for k in ("input_ids", "labels")))
    for i in range(len(data) - 1):
        a, b = data[i], data[i + 1]
        shared = PrefixSharingCollator._shareable(np.asarray(a["input_ids"]), np.asarray(a["labels"]),
                                                  np.asarray(b["input_ids"]), np.asarray(b["labels"]))
        if shared > system + 5 and len(b["input_ids"]) < 200:
            return i, i + 1
    raise AssertionError("no two-turn conversation in the corpus")


def batch_loss_and_grads(trainer, model, batch):
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_prefix_sharing_gives_the_padded_loss(setup, tmp_path):
    """Shared prompt tokens are run once, and the tiny 4-bit model's loss is the padded batch's."""
    cfg, tokenizer, splits, model = setup
    lyra, stock = make_trainers(setup, tmp_path)
    first, second = same_conversation_pair(splits)
    examples = [splits.train[i] for i in (first, second, 7, 7)]  # a 2-turn conversation, another, a duplicate
    padded = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)(examples)
    shared = PrefixSharingCollator(tokenizer, max_row_tokens=4096)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert shared["input_ids"].shape[0] == 1  # all four start with the system prompt: one row
    real = int(token_mask(shared["attention_mask"]).sum())
    assert real < sum(lengths) - 3 * 40  # the system prompt (and more) is run once, not four times
    assert int((shared["shift_labels"] != IGNORE_INDEX).sum()) == int((shifted_targets(padded["labels"]) != IGNORE_INDEX).sum())
    model.eval()
    with torch.no_grad():
        padded_loss = lyra.compute_loss(model, dict(padded)).item()
        assert lyra.compute_loss(model, dict(shared)).item() == pytest.approx(padded_loss, abs=1e-5)
        # the model's own full-logits loss takes the tree mask and shift_labels too (predict, label smoothing)
        assert stock.compute_loss(model, dict(shared)).item() == pytest.approx(padded_loss, abs=1e-5)
        # and the same rows under lyra.attention's gathered paths (on the 4-bit model, PEFT-wrapped)
        gathered = PrefixSharingCollator(tokenizer, max_row_tokens=4096, tree_attention=True)(examples)
        use_tree_attention(model)
        try:
            assert lyra.compute_loss(model, dict(gathered)).item() == pytest.approx(padded_loss, abs=1e-5)
            assert stock.compute_loss(model, dict(gathered)).item() == pytest.approx(padded_loss, abs=1e-5)
            # a batch without tree metadata falls back to sdpa under the same implementation, and so does
            # generation with a KV cache (persona probes generate from the training model mid-training)
            assert lyra.compute_loss(model, dict(padded)).item() == pytest.approx(padded_loss, abs=1e-5)
            prompt = torch.tensor([examples[0]["input_ids"][:20]])
            tree_tokens = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
        finally:
            model.set_attn_implementation("sdpa")
        assert torch.equal(tree_tokens, model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False))
    model.train()


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("tree_attention", [True, False], ids=["gathered_paths", "dense_mask"])
def test_prefix_sharing_gives_each_examples_own_loss_and_gradients_in_float64(setup, tmp_path, family, tree_attention):
    """Exact equivalence: in float64 the tree rows give the loss and gradients of one pass per example,
    under lyra.attention's gathered paths and under the dense tree mask, on Qwen3 and on Llama (SmolLM2)."""
    from test_lean import random_causal_lm

    cfg, tokenizer, splits, _ = setup
    model = random_causal_lm(family).double()
    vocab = model.config.vocab_size
    first, second = same_conversation_pair(splits)
    examples = [{"input_ids": [token % vocab for token in splits.train[i]["input_ids"]],
                 "labels": [label if label == IGNORE_INDEX else label % vocab for label in splits.train[i]["labels"]]}
                for i in (first, second, 7, 7, 3, 12)]
    examples[-1]["input_ids"][0] = (examples[-1]["input_ids"][0] + 1) % vocab  # shares nothing: a row of its own
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    lyra = build_trainer(model, args, tokenizer, None, None, padding_free=False, prefix_sharing=True,
                         tree_attention=tree_attention)
    assert lyra.data_collator.tree_attention is tree_attention
    assert attention_implementation(model) == ("lyra_tree" if tree_attention else "sdpa")

    class PadZero:
        pad_token_id = 0

    shared = PrefixSharingCollator(PadZero(), max_row_tokens=300, tree_attention=tree_attention)(examples)  # budget: 3 rows
    real = int(token_mask(shared["attention_mask"]).sum())
    assert shared["input_ids"].shape[0] >= 3 and real < sum(len(e["input_ids"]) for e in examples)
    lengths = token_mask(shared["attention_mask"]).sum(-1)
    assert int(lengths.min()) < shared["input_ids"].shape[1]  # a padded row
    if tree_attention:  # branches of different lengths, several in one row, and a row without any
        tree = shared["tree"]
        own = (tree["queries"] != 0).sum(-1)  # padded query slots hold 0, the first root's first position
        assert len(set(own.tolist())) > 1
        branch_rows = (tree["queries"][:, 0] // shared["input_ids"].shape[1]).tolist()
        assert max(branch_rows.count(r) for r in branch_rows) >= 2
        assert len(set(branch_rows)) < shared["input_ids"].shape[0]
        # the gathered paths alone give each token its context: the dense mask keeps only its diagonal,
        # which the loss reads as the real tokens (were it used for attention, no token would see another)
        eye = torch.eye(shared["input_ids"].shape[1], dtype=torch.bool)
        shared["attention_mask"] = shared["attention_mask"] & eye
    model.zero_grad(set_to_none=True)
    shared_loss = lyra.compute_loss(model, dict(shared))
    shared_loss.backward()
    shared_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    count = sum(int((shifted_targets(torch.tensor(e["labels"])) != IGNORE_INDEX).sum()) for e in examples)
    total = 0
    for example in examples:
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
        logits = model(input_ids=ids).logits
        total = total + torch.nn.functional.cross_entropy(logits[0], shifted_targets(labels)[0], reduction="sum")
    (total / count).backward()
    assert shared_loss.item() == pytest.approx((total / count).item(), rel=1e-9)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            # transformers' RMSNorm computes in fp32 even for a float64 model: agreement to ~1e-8 of the largest
            # gradient; a token seeing a wrong context would be off by orders of magnitude more
            torch.testing.assert_close(shared_grads[name], parameter.grad, rtol=0,
                                       atol=1e-6 * parameter.grad.abs().max().item())
    assert shared_grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}


def test_4bit_layers_still_pass_gradients_after_an_evaluation(setup, tmp_path):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval-mode no-grad pass, after which
    they pass no gradient: lyra.modeling.keep_4bit_weights_trainable stops that for training models."""
    cfg, tokenizer, splits, model = setup
    lyra, _ = make_trainers(setup, tmp_path)
    batch = lyra.data_collator([splits.train[i] for i in (0, 1)])
    model.eval()
    with torch.no_grad():
        lyra.compute_loss(model, dict(batch))
    model.train()
    _, grads = batch_loss_and_grads(lyra, model, batch)
    assert len(grads) == 8 and all(grad.abs().sum() > 0 for grad in grads.values())  # q/v A and B, 2 layers


def test_prefix_sharing_rows_respect_the_token_budget(setup):
    cfg, tokenizer, splits, model = setup
    examples = [splits.train[i] for i in range(4)]
    longest = max(len(e["input_ids"]) for e in examples)
    separate = PrefixSharingCollator(tokenizer, max_row_tokens=longest)(examples)
    assert separate["input_ids"].shape[0] >= 2
    assert all(int(row.sum()) <= longest for row in token_mask(separate["attention_mask"]))
    padding = separate["attention_mask"][0, 0].diagonal() == 0
    assert bool(separate["attention_mask"][0, 0][padding].any(-1).all())  # padding attends to something: no NaN


def test_prefix_sharing_eval_loss_equals_stock(setup, tmp_path):
    cfg, tokenizer, splits, model = setup
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=4)
    eval_subset = splits.eval.select(range(8))
    lyra = build_trainer(model, args, tokenizer, splits.train, eval_subset, padding_free=False, prefix_sharing=True)
    assert isinstance(lyra.data_collator, PrefixSharingCollator)
    stock = Trainer(model=model, args=args, eval_dataset=eval_subset, processing_class=tokenizer,
                    data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX))
    assert lyra.evaluate(eval_subset)["eval_loss"] == pytest.approx(stock.evaluate(eval_subset)["eval_loss"], abs=1e-5)


def test_prefix_sharing_falls_back_without_sdpa(setup, caplog, monkeypatch):
    cfg, tokenizer, splits, model = setup
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    with caplog.at_level(logging.WARNING, logger="lyra.data.collate"):
        collator = build_collator(tokenizer, model, padding_free=False, prefix_sharing=True)
    assert isinstance(collator, DataCollatorForSeq2Seq)
    assert ("data.prefix_sharing=true is not available: it needs attn_implementation sdpa (a boolean tree mask), "
            "not 'flash_attention_2'; one row per example instead") in caplog.text


def test_padding_free_falls_back_without_a_packed_sequence_attention(setup, caplog, monkeypatch):
    cfg, tokenizer, splits, model = setup
    assert isinstance(build_collator(tokenizer, model, padding_free=True), DataCollatorWithFlattening)  # sdpa
    monkeypatch.setattr(model.config, "_attn_implementation", "paged|sdpa", raising=False)
    with caplog.at_level(logging.WARNING, logger="lyra.data.collate"):
        collator = build_collator(tokenizer, model, padding_free=True)
    assert isinstance(collator, DataCollatorForSeq2Seq)
    assert ("data.padding_free=true is not available: attention 'paged|sdpa' neither has a variable-length kernel "
            "nor takes the block-diagonal mask transformers builds from restarting position ids "
            "(use sdpa, eager or flash_attention_2); falling back to dynamic padding") in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_chunked_cross_entropy_matches_full_logits(dtype):
    """linear_cross_entropy: the loss and every gradient (hidden, weight, bias) of linear + CE, in chunks."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True).to(dtype)
    hidden = torch.randn(7, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    fused = linear_cross_entropy(hidden, head, targets, chunk_bytes=3 * 50 * 4) / 7  # 3 rows per chunk
    fused.backward()
    fused_grads = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    standard = torch.nn.functional.cross_entropy(head(hidden).float(), targets)
    standard.backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(fused, standard, **tolerance)
    for got, want in zip(fused_grads, (hidden.grad, head.weight.grad, head.bias.grad)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tolerance)
    with torch.no_grad():  # eval: the loss only
        assert linear_cross_entropy(hidden, head, targets).item() / 7 == pytest.approx(standard.item(), rel=1e-2)


def test_cross_entropy_chunks_are_even():
    """No short last chunk: one that re-reads the whole head for a handful of rows costs as much as a full one."""
    from lyra.loss import even_chunks

    assert even_chunks(220, 216) == [(0, 110), (110, 220)]
    assert even_chunks(216, 216) == [(0, 216)]
    assert even_chunks(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert even_chunks(0, 3) == []


def test_padding_free_flattens_with_flash_attention(setup, monkeypatch):
    cfg, tokenizer, splits, model = setup
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    assert isinstance(build_collator(tokenizer, model, padding_free=True), DataCollatorWithFlattening)
    with pytest.raises(UserError, match="data.padding_free: must be true or false, got 'yes'"):
        build_collator(tokenizer, model, padding_free="yes")


def test_dynamic_padding_to_longest_and_multiple_of_8_on_gpu(setup, monkeypatch):
    cfg, tokenizer, splits, model = setup
    examples = [splits.train[i] for i in (0, 5)]
    lengths = [len(e["input_ids"]) for e in examples]
    batch = build_collator(tokenizer, model, padding_free=False)(examples)
    assert batch["input_ids"].shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    assert batch["input_ids"][short, min(lengths):].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][short, min(lengths):].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum().item() == sum(lengths)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu_batch = build_collator(tokenizer, model, padding_free=False)(examples)
    assert gpu_batch["input_ids"].shape[1] == -(-max(lengths) // 8) * 8 > max(lengths) - 8


def test_default_config_groups_batches_by_length(setup, tmp_path):
    """trainer.train_sampling_strategy=group_by_length: fewer pad tokens than a random order."""
    cfg, tokenizer, splits, model = setup
    default = compose(["logger=none", f"paths.output_dir={tmp_path}"])
    assert default.trainer.train_sampling_strategy == "group_by_length"
    lyra, _ = make_trainers(setup, tmp_path, train_sampling_strategy="group_by_length")
    sampler = lyra._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)

    def pad_tokens(order):
        lengths = [len(splits.train[i]["input_ids"]) for i in order]
        batches = [lengths[i:i + 4] for i in range(0, len(lengths), 4)]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    assert pad_tokens(list(sampler)) < pad_tokens(torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0)).tolist())


def test_padding_free_must_be_a_bool_before_anything_heavy(tmp_path):
    from lyra.config import validate

    with pytest.raises(UserError) as error:
        validate(compose(["experiment=smoke", "logger=none", f"paths.output_dir={tmp_path}", "data.padding_free=yes"]))
    assert str(error.value) == "data.padding_free: must be true or false, got 'yes'"
