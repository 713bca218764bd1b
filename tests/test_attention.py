"""Grouped-query attention without the per-head key/value copy (margin.generation.attention)
gives transformers' SDPA results: the same arithmetic per query row, scheduled in another block,
so equal to float rounding (on CPU most shapes give the same bits, not all: a 1e-7 difference
was seen at head dim 8)."""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache

from helpers import tiny_llama
from margin.generation.attention import GROUPED_SDPA, grouped_sdpa_forward, use_grouped_sdpa


class Grouped(torch.nn.Module):
    num_key_value_groups = 3


def _repeated(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def test_grouped_attention_is_sdpa_over_repeated_heads_by_hand():
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 6, 5, 8), torch.randn(4, 2, 11, 8), torch.randn(4, 2, 11, 8)
    keep = torch.rand(4, 1, 5, 11) > 0.3
    keep[..., 0] = True
    for mask in (keep, torch.where(keep, 0.0, torch.finfo(torch.float32).min)):
        got, _ = grouped_sdpa_forward(Grouped(), q, k, v, mask)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, _repeated(k, 3), _repeated(v, 3), attn_mask=mask
        ).transpose(1, 2)
        assert got.shape == (4, 5, 6, 8)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # a row that may read only key 0 gets exactly value 0 of its key/value head
    only = torch.zeros(4, 1, 5, 11, dtype=torch.bool)
    only[..., 0] = True
    got, _ = grouped_sdpa_forward(Grouped(), q, k, v, only)
    torch.testing.assert_close(got[1, 2, 4], v[1, 4 // 3, 0])


@torch.no_grad()
def test_a_grouped_model_gives_the_same_logits_and_cache():
    """A padded batch over a cached prompt (mask on, several query positions): the switched
    model's logits and KV are transformers' SDPA ones."""
    model = copy.deepcopy(tiny_llama()[0])  # the shared one is left as it is
    model.set_attn_implementation("sdpa")
    torch.manual_seed(1)
    past_ids = torch.randint(5, 30, (3, 7))
    ids = torch.randint(5, 30, (3, 4))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :2] = mask[2, :5] = 0  # left padding of two rows

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        first = model(input_ids=past_ids, attention_mask=mask[:, :7],
                      position_ids=positions[:, :7], cache=DynamicCache(), use_cache=True)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions[:, 7:],
                    cache=first.cache, use_cache=True)
        return out.logits, [layer.keys for layer in out.cache.layers]

    want_logits, want_keys = run()
    assert use_grouped_sdpa(model) and model.config._attn_implementation == GROUPED_SDPA
    got_logits, got_keys = run()
    torch.testing.assert_close(got_logits, want_logits, atol=1e-6, rtol=1e-6)
    for a, b in zip(got_keys, want_keys, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_models_without_grouped_heads_or_sdpa_are_left_alone():
    model = copy.deepcopy(tiny_llama()[0])
    model.set_attn_implementation("sdpa")
    model.config.num_key_value_heads = model.config.num_attention_heads
    assert not use_grouped_sdpa(model) and model.config._attn_implementation == "sdpa"
    model = copy.deepcopy(tiny_llama()[0])
    model.set_attn_implementation("eager")
    assert not use_grouped_sdpa(model) and model.config._attn_implementation == "eager"


def test_a_saved_model_does_not_name_the_grouped_attention(tmp_path):
    """Checkpoints stay loadable where margin is not installed: the switch is not saved."""
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(tiny_llama()[0])
    model.set_attn_implementation("sdpa")
    assert use_grouped_sdpa(model)
    model.save_pretrained(tmp_path)
    assert GROUPED_SDPA not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
