"""GGUF -> safetensors conversion of the default generator: exact, atomic, idempotent, stale-aware.

Fast tests write a tiny random Llama GGUF (fp32 tensors, a byte-level BPE vocabulary, a ChatML
chat template) with the ``gguf`` package and convert it; the slow test converts the real
SmolLM2-135M-Instruct and checks greedy tokens against the GGUF-loaded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import margin.generation.default_generator as dg
from margin.errors import MarginError

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the base vocabulary of byte-level BPE)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tiny_gguf(path: Path, seed: int = 0, hidden: int = 16, layers: int = 2) -> Path:
    """A 2-layer Llama GGUF with tied embeddings (no ``output.weight``) and random weights."""
    import gguf

    heads, kv_heads, ffn = 4, 2, 32
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = SPECIALS + _byte_alphabet() + ["ĠC", "ĠCa"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(["Ġ C", "ĠC a"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    rng = np.random.default_rng(seed)

    def rand(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    rand("token_embd.weight", len(tokens), hidden)
    kv = kv_heads * hidden // heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        rand(f"blk.{i}.attn_q.weight", hidden, hidden)
        rand(f"blk.{i}.attn_k.weight", kv, hidden)
        rand(f"blk.{i}.attn_v.weight", kv, hidden)
        rand(f"blk.{i}.attn_output.weight", hidden, hidden)
        rand(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_up.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def converted(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dg.ensure_converted(tiny_gguf, tmp_path_factory.mktemp("cache") / "tiny", progress=False)


@pytest.fixture
def count_conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every call of convert_gguf (still converting for real)."""
    calls: list[Path] = []
    real = dg.convert_gguf

    def spy(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path)
        real(gguf_path, out_dir)

    monkeypatch.setattr(dg, "convert_gguf", spy)
    return calls


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 40, 77, 3, 120, 250, 9]])  # (1, 7) arbitrary in-vocabulary ids


def test_converted_model_is_the_gguf_model(tiny_gguf: Path, converted: Path) -> None:
    source = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    with torch.no_grad():
        assert torch.equal(source(_ids()).logits, model(_ids()).logits)  # (1, 7, vocab)
        kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 2}
        assert torch.equal(source.generate(_ids(), **kw), model.generate(_ids(), **kw))


def test_tied_embeddings_survive_and_are_stored_once(converted: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with safe_open(converted / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


def test_tokenizer_keeps_chat_template_and_special_tokens(converted: Path) -> None:
    tok = AutoTokenizer.from_pretrained(converted)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>") + (
        "<|im_end|>",
    )
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.tokenize(" Ca") == ["ĠCa"]  # the BPE merges came through


def test_manifest_records_the_source(tiny_gguf: Path, converted: Path) -> None:
    import transformers

    manifest = json.loads((converted / dg.MANIFEST).read_text())
    assert manifest["format"] == dg.MANIFEST_FORMAT
    assert manifest["source"]["size"] == tiny_gguf.stat().st_size
    assert manifest["source"]["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert manifest["transformers"] == transformers.__version__


def test_second_call_reuses_the_cache(
    tiny_gguf: Path, converted: Path, count_conversions: list[Path], capsys
) -> None:
    assert dg.ensure_converted(tiny_gguf, converted) == converted
    assert count_conversions == []
    assert capsys.readouterr().err == ""


def test_first_conversion_prints_one_line(tiny_gguf: Path, tmp_path: Path, capsys) -> None:
    dg.ensure_converted(tiny_gguf, tmp_path / "m", progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("converting")]
    assert lines == ["converting default generator (one-time, ~30 s)..."]


def test_changed_gguf_is_reconverted(tmp_path: Path, count_conversions: list[Path]) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "g" / "m.gguf", seed=0)
    target = tmp_path / "m"
    dg.ensure_converted(gguf_path, target, progress=False)
    before = AutoModelForCausalLM.from_pretrained(target).model.embed_tokens.weight.clone()
    write_tiny_gguf(gguf_path, seed=1)  # same size, new weights, new mtime
    os.utime(gguf_path, ns=(time.time_ns(), time.time_ns() + 10**9))
    dg.ensure_converted(gguf_path, target, progress=False)
    after = AutoModelForCausalLM.from_pretrained(target).model.embed_tokens.weight
    assert len(count_conversions) == 2
    assert not torch.equal(before, after)


def test_other_transformers_major_is_stale(
    tiny_gguf: Path, tmp_path: Path, count_conversions: list[Path]
) -> None:
    target = dg.ensure_converted(tiny_gguf, tmp_path / "m", progress=False)
    manifest = json.loads((target / dg.MANIFEST).read_text())
    manifest["transformers"] = "0.1.0"
    (target / dg.MANIFEST).write_text(json.dumps(manifest))
    dg.ensure_converted(tiny_gguf, target, progress=False)
    assert len(count_conversions) == 2
    assert json.loads((target / dg.MANIFEST).read_text())["transformers"] != "0.1.0"


def _crash_midway(gguf_path: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text("{")  # half-written, then the process dies
    raise KeyboardInterrupt


def test_interrupted_conversion_leaves_no_loadable_dir(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dg, "convert_gguf", _crash_midway)
    with pytest.raises(KeyboardInterrupt):
        dg.ensure_converted(tiny_gguf, tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary left behind


def test_interrupted_reconversion_keeps_the_old_dir(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = dg.ensure_converted(tiny_gguf, tmp_path / "m", progress=False)
    (target / dg.MANIFEST).write_text("{}")  # force a reconversion
    monkeypatch.setattr(dg, "convert_gguf", _crash_midway)
    with pytest.raises(KeyboardInterrupt):
        dg.ensure_converted(tiny_gguf, target, progress=False)
    assert AutoModelForCausalLM.from_pretrained(target).config.model_type == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_dead_temporaries_are_removed_young_ones_kept(tiny_gguf: Path, tmp_path: Path) -> None:
    dead, live = tmp_path / ".m.dead.tmp", tmp_path / ".m.live.tmp"  # as atomic_path names them
    for leftover in (dead, live):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"partial")
    old = time.time() - dg.STALE_TMP_SECONDS - 60
    os.utime(dead, (old, old))
    dg.ensure_converted(tiny_gguf, tmp_path / "m", progress=False)
    assert not dead.exists() and live.exists()


def test_resolve_generator(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FakeAsset:
        def path(self) -> Path:
            return tiny_gguf

    monkeypatch.setenv("MARGIN_HOME", str(tmp_path))
    monkeypatch.setattr(dg, "DEFAULT_GENERATOR_GGUF", FakeAsset())
    resolved = dg.resolve_generator("default")
    assert resolved == tmp_path / "models" / "smollm2-135m-instruct"
    assert (Path(resolved) / "model.safetensors").is_file()
    assert dg.resolve_generator("HuggingFaceTB/SmolLM2-360M-Instruct") == (
        "HuggingFaceTB/SmolLM2-360M-Instruct"
    )
    assert dg.resolve_generator("./my-model") == "./my-model"


def test_missing_gguf_is_a_margin_error(tmp_path: Path) -> None:
    with pytest.raises(MarginError, match="GGUF file not found"):
        dg.ensure_converted(tmp_path / "absent.gguf", tmp_path / "m")


@pytest.mark.slow
def test_real_default_generator_matches_its_gguf() -> None:
    """The cached SmolLM2 gives the GGUF-loaded model's greedy tokens (converts on first run)."""
    path = dg.default_generator_dir()
    gguf_path = dg.DEFAULT_GENERATOR_GGUF.path()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    source = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids  # (1, S)
    kw = {"max_new_tokens": 16, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), source.generate(ids, **kw))
