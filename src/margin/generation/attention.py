"""Grouped-query attention over a padded batch without copying the keys and values per head.

Why: in a grouped-query model (Llama, SmolLM2: 9 query heads share 3 key/value heads on the
default model) transformers' SDPA attention can only hand the grouping to the kernel when there
is no attention mask. With one (a padded batch, rows over a cached prompt: every multi-token
forward in margin) it copies each key/value head once per query head that reads it
(``repeat_kv``) before attention, in every layer of every forward. Over cached prompts that
copy is the largest single cost after the matrix products: the question tokens of 40 rows over
their cached 400-token prompts copied 2.2 GB a forward on the default model.

What it does instead: the query heads that share a key/value head are stacked along the query
positions, ``(b, h_kv * g, L, d) -> (b, h_kv, g * L, d)``, with the mask repeated to match, and
one SDPA call reads the key/value heads as they are. Each query row is the same dot products,
softmax and weighted sum as before, only scheduled in a taller block; on CPU the outputs are
bit-identical to transformers' path (tests/test_attention.py).

Where it applies: forwards of more than one query position with a mask and no position bias.
Everything else (one query position, which transformers already packs this way; no mask, which
its kernel groups itself) goes to transformers' own ``sdpa_attention_forward``.
:func:`use_grouped_sdpa` switches a model that uses SDPA to it; ``CausalGenerator`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED_SDPA = "margin_grouped_sdpa"


def grouped_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (b, H, L, d), key and value
    (b, H / g, S, d), mask (b or 1, 1, L, S); returns (b, L, H, d)."""
    groups = getattr(module, "num_key_value_groups", 1)
    b, H, L, d = query.shape
    if (
        groups == 1
        or L == 1
        or attention_mask is None
        or attention_mask.shape[1] != 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    S = attention_mask.shape[-1]
    q = query.reshape(b, H // groups, groups * L, d)  # head h reads key/value head h // groups
    mask = attention_mask.expand(b, 1, L, S)[:, :, None].expand(b, 1, groups, L, S)
    out = F.scaled_dot_product_attention(
        q, key, value, attn_mask=mask.reshape(b, 1, groups * L, S),
        dropout_p=dropout, scale=scaling, is_causal=False,
    )  # (b, H / g, g * L, d)
    return out.reshape(b, H, L, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_forward)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # the masks SDPA gets, built alike


def use_grouped_sdpa(model: torch.nn.Module) -> bool:
    """Switch ``model`` from transformers' SDPA attention to :func:`grouped_sdpa_forward` when
    it groups its query heads; whether it did. Other attention implementations are left alone."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads or kv_heads == heads or not hasattr(model, "set_attn_implementation"):
        return False
    model.set_attn_implementation(GROUPED_SDPA)
    return True
