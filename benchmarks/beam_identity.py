"""Are two checkouts' decodings bit-identical? (issue 28: the beam search's GPU-lean rewrite)

Decodes 90 configurations on small random BARTs (vocabularies of 40 and 300 so EOS is often
chosen; with and without a forced BOS; RAG-Token, Thorough and Fast; 1-4 beams, minimum lengths,
every early-stopping rule, n-best lists) and writes every hypothesis's tokens, log-probability,
posterior and provenance (floats as hex: bits, not rounding) to a JSON file, or compares with one.
Run it once per checkout, ``PYTHONPATH`` naming the checkout's ``src``:

    PYTHONPATH=/tmp/old/src python benchmarks/beam_identity.py --save /tmp/beams.json
    python benchmarks/beam_identity.py --compare /tmp/beams.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration

from margin.generation.decoding import DecodeConfig, decode
from margin.generation.generator import GenInputs

sys.path.insert(0, str(Path(__file__).parent))
from decoding import CountingGenerator, IdTokenizer  # noqa: E402

SEARCHES = [  # beams, early_stopping, min_new_tokens, num_return_sequences, max_new_tokens
    (1, False, 0, 1, 8), (4, False, 0, 2, 10), (3, True, 2, 3, 7), (4, "never", 0, 1, 9),
    (2, False, 3, 2, 6),
]


def decodings() -> dict[str, list]:
    out: dict[str, list] = {}
    for vocab, seed in [(40, 0), (40, 1), (300, 2)]:
        torch.manual_seed(seed)
        cfg = BartConfig(vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=2,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=128, forced_eos_token_id=2,
                         dropout=0.0, pad_token_id=1, eos_token_id=2, bos_token_id=0,
                         decoder_start_token_id=2)
        model = BartForConditionalGeneration(cfg).eval()
        model.generation_config.forced_bos_token_id = None if seed == 1 else 0
        gen = CountingGenerator(model, IdTokenizer())
        gen.scored = []
        for B, k in [(3, 2), (5, 3)]:
            g = torch.Generator().manual_seed(seed + B)
            ids = torch.randint(4, vocab, (B * k, 12), generator=g)
            ids[:, 0], ids[:, -1] = 0, 2
            inputs = GenInputs.from_ids(ids, torch.ones_like(ids), k)
            scores = torch.randn(B, k, generator=g)
            for nb, es, mn, R, L in SEARCHES:
                dc = DecodeConfig(num_beams=nb, max_new_tokens=L, min_new_tokens=mn,
                                  early_stopping=es, num_return_sequences=R)
                for method in ("token", "thorough", "fast"):
                    key = f"v{vocab}-s{seed}-B{B}-k{k}-nb{nb}-{es}-min{mn}-R{R}-L{L}-{method}"
                    out[key] = [[[list(h.token_ids), h.logprob.hex(),
                                  [x.hex() for x in h.doc_posterior],
                                  list(h.token_docs) if h.token_docs else None]
                                 for h in d.nbest]
                                for d in decode(gen, inputs, scores, dc, method)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--save", type=Path, help="write this checkout's decodings here")
    what.add_argument("--compare", type=Path, help="compare this checkout's with these")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = decodings()
    if args.save:
        args.save.write_text(json.dumps(out))
        print(f"saved {len(out)} decodings to {args.save}")
        return 0
    ref = json.loads(args.compare.read_text())
    differ = [k for k in ref if ref[k] != out.get(k)]
    print(f"compared {len(ref)} decodings: {len(differ)} differ {differ[:5]}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
