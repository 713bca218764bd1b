"""Training precision: which autocast dtype each ``--precision`` means, bf16 on a CPU, and the
frozen LoRA weights kept in bf16 (margin.training.precision.FrozenCasts) computing exactly what
autocast does.

torch.cuda and the CPU probes are patched where a test needs a GPU or a CPU feature, so each test
means the same on every machine.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from margin.devices import native_bf16
from margin.errors import MarginError
from margin.training.precision import FrozenCasts, autocast_dtype

CPU = torch.device("cpu")


def test_precision_names_on_the_cpu():
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("auto", CPU) is None  # auto stays fp32 on a CPU
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(MarginError, match="fp16 needs a GPU; use fp32, bf16 or auto"):
        autocast_dtype("fp16", CPU)


def test_precision_names_on_a_gpu(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert autocast_dtype("auto", gpu) is torch.bfloat16
    assert autocast_dtype("fp16", gpu) is torch.float16
    assert autocast_dtype("fp32", gpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert autocast_dtype("auto", gpu) is torch.float16  # an older GPU: fp16, with a scaler
    assert autocast_dtype("bf16", gpu) is torch.bfloat16  # asked for by name


@pytest.mark.parametrize("avx512_bf16, amx, native", [(True, False, True), (False, True, True),
                                                     (False, False, False)])
def test_native_bf16_reads_the_cpu(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bf16(CPU) is native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert native_bf16(torch.device("cuda")) is False
    assert native_bf16(torch.device("mps")) is False


def lora_llama(tied: bool):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                         tie_word_embeddings=tied, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(True)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    wrapped = peft.get_peft_model(model, lora)
    for name, p in wrapped.named_parameters():  # adapters start at B = 0: give them a value
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model, wrapped


def loss_and_grads(model, ids, casts=None):
    model.zero_grad(set_to_none=True)
    with casts.active() if casts else nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_casts_compute_what_autocast_computes(tied):
    model, _ = lora_llama(tied)
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    plain_loss, plain_grads = loss_and_grads(model, ids)
    before = {n: (p, p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    casts = FrozenCasts(model, torch.bfloat16)
    cast_loss, cast_grads = loss_and_grads(model, ids, casts)

    assert torch.equal(cast_loss, plain_loss)  # the same bf16 values autocast would have made
    assert plain_grads.keys() == cast_grads.keys() and plain_grads  # only the adapters learn
    assert all("lora_" in n for n in plain_grads)
    for name in plain_grads:
        assert torch.equal(cast_grads[name], plain_grads[name]), name
    # every frozen linear weight is kept in bf16 except one tied to the embedding
    kept = {id(w) for w, _, _ in casts.pairs}
    frozen_linears = [m.weight for m in model.modules()
                      if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    embedding = model.get_input_embeddings().weight
    assert {id(w) for w in frozen_linears if w is not embedding} == kept
    assert (id(embedding) in kept) is False
    assert len(frozen_linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down a layer, and lm_head
    # outside active() the model is exactly as it was: fp32, the same tensors
    for name, p in model.named_parameters():
        assert (p, p.dtype, p.data_ptr()) == before[name], name


def test_frozen_casts_restore_fp32_when_the_step_fails():
    model, _ = lora_llama(tied=False)
    casts = FrozenCasts(model, torch.bfloat16)
    weight = casts.pairs[0][0]
    with pytest.raises(RuntimeError, match="boom"), casts.active():
        assert weight.dtype is torch.bfloat16
        raise RuntimeError("boom")
    assert weight.dtype is torch.float32
