"""Ops a RAG-Token beam-search step launches beyond the floor's (issue 28, the GPU item).

On a GPU at batch 16 the beam search is launch-bound: every op that runs a kernel costs the host
~10-20 us whatever its size. This counts them with torch.profiler on the CPU (no GPU needed), on
a small random BART: margin's RAG-Token decoding against the floor (benchmarks/decoding.py: the
model's work alone), ops that launch a kernel on a GPU (views, reshapes and composite wrappers
excluded), divided by the decoder steps. Run it with another checkout first on PYTHONPATH to
count that one:

    python benchmarks/beam_ops.py
    PYTHONPATH=/tmp/old/src python benchmarks/beam_ops.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import decoding as D  # noqa: E402

# ops that launch no kernel of their own (views, metadata) or only call other counted ops
NO_KERNEL = {
    "aten::as_strided", "aten::view", "aten::transpose", "aten::resolve_conj", "aten::reshape",
    "aten::expand", "aten::slice", "aten::unsqueeze", "aten::select", "aten::t",
    "aten::_reshape_alias", "aten::narrow", "aten::flatten", "aten::to", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::dropout", "aten::linear", "aten::layer_norm",
    "aten::scaled_dot_product_attention", "aten::new_empty", "aten::resize_", "aten::detach",
    "aten::alias", "aten::squeeze", "aten::permute", "aten::contiguous", "aten::result_type",
    "aten::lift_fresh", "aten::item", "aten::_local_scalar_dense", "aten::unbind", "aten::split",
    "aten::chunk", "aten::lift_fresh_copy", "aten::matmul", "aten::_unsafe_view",
    "aten::is_nonzero", "aten::broadcast_tensors", "aten::clone", "aten::repeat_interleave",
    "aten::isin", "aten::logsumexp", "aten::log_softmax", "aten::_to_copy", "aten::index_put",
    "aten::gelu", "aten::embedding",
}
STEPS = 12


def launches(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages()
               if e.key.startswith("aten::") and e.key not in NO_KERNEL)


def main() -> None:
    torch.set_num_threads(1)
    m = D.build_models(k=5, d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128,
                       decoder_ffn_dim=128, encoder_attention_heads=2, decoder_attention_heads=2)
    inputs, scores = D.make_inputs(4, 5, length=32)
    cfg = D.DecodeConfig(num_beams=4, max_new_tokens=STEPS)
    margin = launches(lambda: D.margin_token(m, inputs, scores, cfg))
    floor = launches(lambda: D.floor(m, inputs, scores, 4, STEPS - 1, [], True))
    print(f"margin from {D.decode_rag_token.__module__} ({sys.modules['margin'].__file__}): "
          f"{margin} kernel-launching ops, the floor {floor}; beyond the floor "
          f"{(margin - floor) / STEPS:.1f} a step (batch 4, k 5, 4 beams, {STEPS} steps)")


if __name__ == "__main__":
    main()
