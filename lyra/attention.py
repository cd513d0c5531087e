"""Gathered-path attention for prefix-shared rows (`data.tree_attention`, `lyra.data.collate.PrefixSharingCollator`).

    from lyra.attention import use_tree_attention
    use_tree_attention(model)   # the model's attention becomes "lyra_tree"; the collator passes `tree` metadata

A prefix-shared row holds a tree: its first example laid out whole from position 0 (the root), each
later example (a branch) only from where it leaves the example it shares most with. With a dense
[rows, 1, L, L] tree mask, sdpa's CPU kernel computes every block of the row, about twice what
causal attention over the examples one by one costs, which gives back much of what sharing saves.
Here each row's root attends causally to itself (one causal sdpa call for all rows, over the longest
root), and every branch's own tokens attend to its gathered path, the keys and values of its shared
prefix followed by its own, causally (one masked sdpa call for all branches, padded to the longest).
The outputs are gathered back into the row layout. Every token sees exactly the context it sees in
the dense tree mask, so the loss and gradients are those of one pass per example (tests/test_trainer.py,
float64, Qwen3 and Llama).

A batch without `tree` metadata (a padded eval batch, generation) runs transformers' own sdpa, so the
implementation is safe to leave on.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TREE_ATTENTION = "lyra_tree"


def tree_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, tree: dict | None = None, **kwargs):
    """AttentionInterface function: query [rows, heads, L, dim], key/value [rows, kv heads, L, dim] ->
    ([rows, L, heads, dim], None). Without `tree`, transformers' sdpa with the given mask."""
    if tree is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    root = tree["root"]
    # the roots: plain causal attention over each row's first `root` positions (a shorter root's tail
    # belongs to branches, and is overwritten below). GQA without a mask stays on the fast kernel.
    root_out = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, :root], key[:, :, :root], value[:, :, :root], dropout_p=dropout, scale=scaling, is_causal=True,
        enable_gqa=groups > 1)
    pieces = [root_out.transpose(1, 2).reshape(rows * root, heads, dim)]
    if "queries" in tree:
        branches, branch_length = tree["queries"].shape

        def gather(states, index):  # [rows, h, L, dim] at flat row positions -> [branches, h, len, dim]
            flat = states.transpose(1, 2).reshape(rows * length, states.shape[1], dim)
            return flat.index_select(0, index.flatten()).view(*index.shape, states.shape[1], dim).transpose(1, 2)

        keys, values = gather(key, tree["keys"]), gather(value, tree["keys"])
        # the CPU flash kernel takes GQA with a mask (~20% faster than repeating K/V); CUDA's masked
        # kernels do not (they fall back to the math kernel), so K/V are repeated there as transformers does
        native_gqa = query.device.type == "cpu"
        if not native_gqa:
            keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
        branch_out = torch.nn.functional.scaled_dot_product_attention(
            gather(query, tree["queries"]), keys, values, attn_mask=tree["mask"], dropout_p=dropout, scale=scaling,
            enable_gqa=native_gqa and groups > 1)
        pieces.append(branch_out.transpose(1, 2).reshape(branches * branch_length, heads, dim))
    output = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return output.index_select(0, tree["output"]).view(rows, length, heads, dim), None


def use_tree_attention(model) -> None:
    """Register lyra_tree (once) and switch `model` (a PEFT model or a transformers one) to it."""
    if TREE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(TREE_ATTENTION, tree_attention_forward)
        # batches without tree metadata get sdpa's mask; tree batches bring their own 4D mask, used as is
        AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(TREE_ATTENTION)
