"""lyra.prepack: oneDNN-packed linear weights give the eager path's replies, follow weight swaps, and
step aside for autograd and for bitsandbytes layers."""

from __future__ import annotations

import pytest
import torch

from conftest import compose, smoke_overrides

PROMPTS = ["I had a long day at work. Any advice for a quiet evening?", "What is your name?",
           "Tell me about the sea."]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """2 smoke steps on a full-precision base with a high learning rate: the merged adapter moves logits."""
    from lyra.data import corpus_file
    from lyra.train import train

    run_dir = tmp_path_factory.mktemp("prepack-run")
    eval_file = tmp_path_factory.mktemp("prepack-data") / "eval.jsonl"
    eval_file.write_text("".join(corpus_file("eval").read_text(encoding="utf-8").splitlines(True)[:2]), encoding="utf-8")
    train(compose(smoke_overrides(run_dir, "quantization=none", "trainer.max_steps=2", "trainer.eval_steps=2",
                                  "trainer.save_steps=2", "trainer.learning_rate=0.05", "eval=none",
                                  f"data.eval_file={eval_file}")))
    return run_dir


def _last_logits(run, text: str) -> torch.Tensor:
    from lyra.generation import build_prompt_ids

    ids = torch.tensor([build_prompt_ids(text, run.tokenizer, system_prompt=run.system_prompt)])
    with torch.inference_mode():
        return run.model(ids).logits[0, -1].float()


def test_a_prepacked_merged_run_follows_the_base_toggle(plain_run):
    """The web page's base toggle swaps weights by pointer: a stale pack would keep answering as the
    merged model. Packed logits must track eager ones both ways round."""
    from lyra.runs import load_run

    eager, packed = load_run(plain_run, device="cpu"), load_run(plain_run, device="cpu", prepack=True)
    assert eager.merged and packed.merged
    assert any(hasattr(module, "_lyra_packs") for module in packed.model.modules())
    merged_logits = _last_logits(eager, PROMPTS[0])
    torch.testing.assert_close(_last_logits(packed, PROMPTS[0]), merged_logits, rtol=1e-4, atol=1e-4)
    with eager.adapter_disabled(), packed.adapter_disabled():
        base_logits = _last_logits(eager, PROMPTS[0])
        torch.testing.assert_close(_last_logits(packed, PROMPTS[0]), base_logits, rtol=1e-4, atol=1e-4)
    assert (base_logits - merged_logits).abs().max() > 1e-2  # the toggle changed something to follow
    torch.testing.assert_close(_last_logits(packed, PROMPTS[0]), merged_logits, rtol=1e-4, atol=1e-4)


def test_autograd_runs_the_original_weight_and_unpack_restores_the_class_forward():
    from lyra.prepack import prepack_linears, unpack_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    x = torch.randn(3, 64)
    expected = model(x)
    assert prepack_linears(model).layers == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected.detach(), rtol=1e-5, atol=1e-5)
    out = model(x)  # autograd on: eager F.linear, bit for bit, with gradients reaching the weights
    assert torch.equal(out, expected)
    out.sum().backward()
    assert model[0].weight.grad is not None
    assert unpack_linears(model) == 2
    assert all("forward" not in module.__dict__ and not hasattr(module, "_lyra_packs") for module in model)


def test_released_packs_are_made_again_on_the_next_inference_call():
    """With llama.cpp serving, the engines drop the transformers model's packed copies; a later reply
    from it (the adapter-off toggle) packs again instead of falling back to eager F.linear for good."""
    from lyra.prepack import prepack_linears, release_packs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    x = torch.randn(3, 64)
    assert release_packs(model) == 0  # nothing packed, nothing released
    prepack_linears(model)
    with torch.no_grad():
        packed_out = model(x)
    assert release_packs(model) == (64 * 32 + 32 * 8) * 4
    assert all(module._lyra_packs == {} and "forward" in module.__dict__ for module in model)
    with torch.no_grad():
        assert torch.equal(model(x), packed_out)  # the same packed product, packed anew
    assert all(len(module._lyra_packs) == 1 for module in model)


def _tiny_lora_qwen3():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   lora_dropout=0.0))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give A's gradient something to be
            torch.nn.init.normal_(parameter, std=0.1)
    return model.train()


def test_q_k_v_and_gate_up_run_as_one_product_with_each_members_own_output(monkeypatch):
    """Siblings that read the same input share one stacked product (PEFT LoRA layers' bases included):
    the logits equal the one-product-per-layer packing bit for bit, nothing is held between calls,
    and a member called with another input computes its own product, never a sibling's stale slice."""
    from lyra import prepack
    from lyra.prepack import prepack_linears, release_packs

    model = _tiny_lora_qwen3().eval()
    ids = torch.randint(0, 97, (2, 9))
    monkeypatch.setattr(prepack, "SIBLING_GROUPS", ())
    report = prepack_linears(model)
    assert report.sibling_sets == 0
    with torch.inference_mode():  # a prompt's rows, and one row as in decoding
        separate = [model(input_ids=ids).logits, model(input_ids=ids[:, :1]).logits]
    prepack.unpack_linears(model)
    monkeypatch.undo()
    report = prepack_linears(model)
    assert report.sibling_sets == 4 and "4 q/k/v and gate/up sets" in str(report)  # 2 layers x (q/k/v, gate/up)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, separate[0])
        assert torch.equal(model(input_ids=ids[:, :1]).logits, separate[1])
    attention = model.base_model.model.model.layers[0].self_attn
    q_proj, k_proj = attention.q_proj.base_layer, attention.k_proj
    siblings = k_proj._lyra_siblings
    assert q_proj._lyra_siblings is siblings and siblings.held is None
    first, second = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        q_proj(first)  # k's and v's slices for `first` wait
        assert siblings.held[0] is first and set(siblings.held[2]) == {1, 2}
        torch.testing.assert_close(k_proj(second), torch.nn.functional.linear(second, k_proj.weight), rtol=1e-5,
                                   atol=1e-5)
    linear_bytes = sum(module.weight.numel() * 4 for module in model.modules() if type(module) is torch.nn.Linear)
    assert release_packs(model) == linear_bytes and siblings.packs == {} and siblings.held is None


def _loss_and_lora_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_frozen_linears_train_on_onednn_with_eager_losses_and_gradients():
    """model.onednn_linears: every frozen nn.Linear (LoRA's base layers, the MLP, the head) runs oneDNN,
    forward and input gradient; LoRA's own layers and a layer unfrozen later stay on F.linear."""
    from lyra.prepack import onednn_frozen_linears

    model = _tiny_lora_qwen3()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads = _loss_and_lora_grads(model, ids)
    frozen = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    assert onednn_frozen_linears(model).startswith(f"{len(frozen)} frozen linear layers run on oneDNN")
    assert len(frozen) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m) is torch.nn.Linear and m.weight.requires_grad)
    x = torch.randn(3, 64, requires_grad=True)
    assert "OneDNNFrozenLinear" in type(frozen[0](x).grad_fn).__name__  # the test below compares two paths
    loss, grads = _loss_and_lora_grads(model, ids)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and len(grads) == 2 * 2 * 2
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    frozen[0].weight.requires_grad_(True)  # unfrozen after the switch: eager F.linear, weight gradient too
    frozen[0](x).sum().backward()
    assert frozen[0].weight.grad is not None


def test_a_switched_head_runs_the_fused_loss_on_onednn_with_the_same_loss_and_gradient(monkeypatch):
    from lyra import loss as loss_module
    from lyra.loss import linear_cross_entropy
    from lyra.prepack import onednn_frozen_linears, uses_onednn

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(9, 32, requires_grad=True)
    targets = torch.randint(0, 300, (9,))

    def loss_and_grad():
        loss = linear_cross_entropy(hidden, head, targets, chunk_bytes=4 * 300 * 4)  # 3 chunks of 3 rows
        (grad,) = torch.autograd.grad(loss, hidden)
        return loss.detach(), grad

    eager = loss_and_grad()
    assert onednn_frozen_linears(torch.nn.Sequential(head)).startswith("1 frozen linear") and uses_onednn(head)
    calls = []
    monkeypatch.setattr(loss_module, "onednn_linear", lambda *args: calls.append(1) or torch.ops.mkldnn._linear_pointwise(
        *args, *([None] * (3 - len(args))), "none", [], ""))
    switched = loss_and_grad()
    assert len(calls) == 3 * 2  # the forward and input-gradient product of each chunk
    torch.testing.assert_close(switched[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(switched[1], eager[1], rtol=1e-4, atol=1e-6)


def test_bitsandbytes_layers_are_never_packed(smoke_run):
    pytest.importorskip("bitsandbytes")
    from lyra.runs import load_run

    run = load_run(smoke_run, device="cpu", prepack=True)
    quantized = [m for m in run.model.modules() if type(m).__module__.startswith("bitsandbytes")]
    assert quantized and not any(hasattr(m, "_lyra_packs") for m in quantized)
    reply = run.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert reply.shape == (1, 5)


def test_a_model_off_the_cpu_is_left_alone():
    from lyra.prepack import prepack_linears

    model = torch.nn.Linear(4, 4).to("meta")
    report = prepack_linears(model)
    assert report.layers == 0 and "not on the CPU" in str(report)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_replies_on_real_smollm2_weights_are_token_identical(smollm2_dir, smollm2_tokenizer, dtype):
    """What a user sees: the same greedy reply, token for token, eager or prepacked."""
    from lyra.generation import build_prompt_ids, generate_replies
    from lyra.modeling import build_model
    from lyra.prepack import prepack_linears, unpack_linears

    model = build_model(compose(["model=smollm2_135m"]).model, None, dtype, "cpu").eval()
    prompts = [build_prompt_ids(text, smollm2_tokenizer, system_prompt="You are Pippa, a lighthouse keeper.")
               for text in PROMPTS]
    settings = {"do_sample": False, "repetition_penalty": 1.1, "max_new_tokens": 48}
    eager = [reply.token_ids for reply in generate_replies(prompts, model, smollm2_tokenizer, **settings)]
    assert prepack_linears(model).layers > 200
    packed = [reply.token_ids for reply in generate_replies(prompts, model, smollm2_tokenizer, **settings)]
    assert unpack_linears(model) > 200
    assert packed == eager and min(len(ids) for ids in eager) > 8
