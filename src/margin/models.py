"""Loading and saving RAG models: the default, margin's own checkpoints, transformers' RAG.

A margin checkpoint is a plain directory (never pickle)::

    DIR/margin_model.json          format + version, generator kind and formatting, the document
                                   score scale, decoding defaults, the question encoder's spec, and
                                   the fingerprint of the passage encoder its indexes must use
    DIR/generator/                 save_pretrained model (safetensors) + tokenizer
    DIR/question_encoder/          the question encoder's model directory (safetensors)
    DIR/index/                     optional: the index the model was trained against, when the
                                   default index will not do (another passage encoder)

``RAG.load(model=...)`` accepts ``"default"`` (SmolLM2-135M-Instruct over the default corpus with
the all-MiniLM-L6-v2 retriever), such a directory, the name of one installed in
``$MARGIN_HOME/models`` (``margin finetune`` and :func:`install_model` install them), or a
directory written by transformers' ``RagSequenceForGeneration``/``RagTokenForGeneration
.save_pretrained`` plus ``RagTokenizer.save_pretrained`` (see margin.hf_rag). Its ``index="auto"``
(the default) is the index the model carries, else the default index (:func:`resolve_model_index`);
any index named explicitly is checked against the model's passage encoder fingerprint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from margin._io import atomic_path
from margin.devices import resolve_device
from margin.errors import MarginError
from margin.generation.causal import CausalFormat, CausalGenerator
from margin.generation.decoding import DecodeConfig
from margin.generation.generator import Generator
from margin.generation.seq2seq import Seq2SeqGenerator
from margin.model_config import (
    AUTO_INDEX,
    DEFAULT_COSINE_SCALE,
    MODEL_FILE,
    MODEL_FORMAT,
    MODEL_INDEX,
    MODEL_VERSION,
    ModelConfig,
)
from margin.rag import RAG
from margin.retrieval.encoders import Encoder, load_encoder, load_encoder_from_spec, save_pairing
from margin.retrieval.manifest import MANIFEST, Manifest
from margin.retrieval.reader import open_index
from margin.retrieval.retriever import Retriever, resolve_index

# ----------------------------------------------------------------------------- generators


def make_generator(path: str | Path, kind: str, config: ModelConfig | None = None) -> Generator:
    """Load a generator directory (or hub name) of the given kind."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = config or ModelConfig(generator_kind=kind)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if kind == "seq2seq":
        model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
        return Seq2SeqGenerator(model, tokenizer, config.seq2seq)
    if kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompt, target = _prompt_fns(config.prompt)
        newline = newline_token_ids(tokenizer) if config.stop_at_newline else []
        # the plain few-shot template's answers end at a line break, and so do its targets
        end = tokenizer.get_vocab().get(_NEWLINE) if newline and target is not None else None
        fmt = CausalFormat(prompt_fn=prompt, target_fn=target, end_token_id=end)
        gen = CausalGenerator(model, tokenizer, fmt)
        if newline:
            gen.eos_token_ids = tuple(sorted({*gen.eos_token_ids, *newline}))
        return gen
    raise MarginError(f"unknown generator kind {kind!r}; use 'causal' or 'seq2seq'")


def newline_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens whose text contains a line break (they end a short answer)."""
    vocab = tokenizer.get_vocab()
    if any(tok.startswith("Ġ") for tok in list(vocab)[:1000]):  # byte-level BPE: "Ċ" is "\n"
        return sorted(i for tok, i in vocab.items() if "Ċ" in tok)
    texts = tokenizer.batch_decode([[i] for i in range(len(vocab))])
    return [i for i, text in enumerate(texts) if "\n" in text]


_NEWLINE = "Ċ"  # a byte-level BPE's line break: what ends a plain-format answer


def _prompt_fns(name: str):
    """(prompt_fn, target_fn) of a named template; scoring and decoding share both."""
    from margin.generation import prompting

    if name == "qa-default":
        return prompting.prompt_fn, prompting.target_fn
    if name == "chat":
        from margin.generation.causal import default_prompt

        return default_prompt, None
    raise MarginError(f"unknown prompt template {name!r}; use 'qa-default' or 'chat'")


def _postprocess(config: ModelConfig):
    if config.generator_kind == "causal":
        from margin.generation.prompting import postprocess_answer

        return postprocess_answer
    return None


# ----------------------------------------------------------------------------- loading


def load_model(model: str | Path = "default", index: str | Path | None = AUTO_INDEX,
               progress: bool = True, device: str | torch.device = "cpu") -> RAG:
    """A ready RAG: generator, question encoder and (unless ``index`` is None) retriever, the
    networks on ``device`` (checked before anything loads; "auto": CUDA when there is one).

    ``index``: a directory, ``"default"``, ``"auto"`` (the index the model carries, else the
    default one: :func:`resolve_model_index`) or None (no retriever).
    """
    target = resolve_device(device)
    index = resolve_model_index(model, index)
    if str(model) == "default":
        return _load_default(index, progress, str(target)).to(target)
    margin_dir = _margin_dir(model)
    if margin_dir is not None:
        return _load_margin(margin_dir, index, progress).to(target)
    path = Path(model)
    if (path / "config.json").is_file() and _model_type(path) == "rag":
        from margin.hf_rag import load_hf_rag

        return load_hf_rag(path, index, progress=progress).to(target)
    if not path.exists():
        raise MarginError(f"{path}: no such model directory; give 'default' or a model directory")
    raise MarginError(
        f"{path} is neither a margin model (no {MODEL_FILE}) nor a transformers RAG checkpoint "
        "(config.json with model_type 'rag'); give 'default' or one of those"
    )


def resolve_model_index(model: str | Path, index: str | Path | None) -> str | Path | None:
    """The index :func:`load_model` opens for ``model``: ``index`` as given, except ``"auto"``
    (:data:`~margin.model_config.AUTO_INDEX`), which is the index the model carries
    (:func:`carried_index`) or else ``"default"``. Nothing is loaded: it looks at files only."""
    if index is None or str(index) != AUTO_INDEX:
        return index
    own = carried_index(model)
    return "default" if own is None else own


def carried_index(model: str | Path) -> Path | None:
    """``DIR/index`` of margin model ``model`` (a directory or an installed name), if it holds one:
    the index it was trained against, installed with it (:func:`install_model`)."""
    path = _margin_dir(model)
    own = None if path is None else path / MODEL_INDEX
    return own if own is not None and (own / MANIFEST).is_file() else None


def _margin_dir(model: str | Path) -> Path | None:
    """The margin model directory ``model`` names: a directory holding a margin_model.json, or
    else a name installed in $MARGIN_HOME/models (e.g. "finetuned"); None for anything else."""
    if str(model) == "default":
        return None
    path = Path(model)
    return path if (path / MODEL_FILE).is_file() else _installed(str(model))


def _installed(name: str) -> Path | None:
    """The margin model installed as ``name`` in $MARGIN_HOME/models (``margin finetune``)."""
    from margin.assets import margin_home

    if "/" in name or name in ("", ".", ".."):
        return None
    path = margin_home() / "models" / name
    return path if (path / MODEL_FILE).is_file() else None


def _load_default(index: str | Path | None, progress: bool, device: str = "cpu") -> RAG:
    from margin.generation.default_generator import default_generator_dir

    config = ModelConfig(
        doc_score_scale=DEFAULT_COSINE_SCALE, decode=DecodeConfig(max_new_tokens=16)
    )
    generator = make_generator(default_generator_dir(progress=progress), "causal", config)
    retriever = None
    encoder: Encoder | None = None
    if index is not None:
        retriever = Retriever.load(index, progress=progress, device=device)
        encoder = retriever.encoder
    else:
        encoder = load_encoder("default", role="question", device=device)
    return _assemble(generator, retriever, encoder, config)


def _load_margin(path: Path, index: str | Path | None, progress: bool) -> RAG:
    raw = _read_json(path / MODEL_FILE)
    if raw.get("format") != MODEL_FORMAT or int(raw.get("version", 0)) > MODEL_VERSION:
        raise MarginError(
            f"{path / MODEL_FILE} is not a margin model this version can read "
            f"(format {raw.get('format')!r}, version {raw.get('version')}); upgrade margin"
        )
    config = ModelConfig.from_json(raw)
    generator = make_generator(path / "generator", config.generator_kind, config)
    encoder = None
    if config.question_encoder:
        spec = dict(config.question_encoder, name=str(path / "question_encoder"), role="question")
        encoder = load_encoder_from_spec(spec)
    retriever = None
    if index is not None:
        loaded = open_index(resolve_index(index, progress=progress))
        check_index_encoder(loaded.path, loaded.manifest.encoder, config.index_encoder_fingerprint,
                            path, carried_index(path))
        retriever = Retriever(loaded, encoder if loaded.dense is not None else None, check=False)
    return _assemble(generator, retriever, encoder, config)


def check_index_encoder(index: Path | str, built: dict | None, expected: str | None,
                        model: Path | str, own: Path | None = None) -> None:
    """Refuse an index whose passage encoder (its manifest's ``encoder``) is not the one model
    ``model`` was trained against (fingerprint ``expected``); unknown on either side passes.
    ``own``: the index the model carries, if any, which the message then points to."""
    if not built or not expected:
        return
    if built["fingerprint"] != expected:
        fix = ("use an index built with the model's passage encoder" if own is None else
               f"leave the index out (or give 'auto') to use the one the model carries, {own}")
        raise MarginError(
            f"index {index} was built with passage encoder sha256 "
            f"{built['fingerprint'][:12]} but model {model} expects {expected[:12]}; {fix}"
        )


def _assemble(generator, retriever, encoder, config: ModelConfig) -> RAG:
    rag = RAG(
        generator,
        retriever,
        question_encoder=encoder,
        doc_score_scale=config.doc_score_scale,
        default_decode=config.decode,
        postprocess=_postprocess(config),
        default_mode=config.default_mode,
        default_k=config.default_k,
        config=config,
    )
    return rag


# ----------------------------------------------------------------------------- saving


def save_model(rag: RAG, out: str | Path) -> Path:
    """Write ``rag`` as a margin checkpoint directory, atomically."""
    out = Path(out)
    config = rag.config
    encoder = rag.question_encoder
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        rag.generator.model.save_pretrained(tmp / "generator")  # type: ignore[attr-defined]
        rag.generator.tokenizer.save_pretrained(tmp / "generator")  # type: ignore[attr-defined]
        record = asdict(config)
        if encoder is not None:
            encoder.save(tmp / "question_encoder")  # type: ignore[attr-defined]
            record["question_encoder"] = {k: v for k, v in encoder.spec.items() if k != "name"}
        built = rag.retriever.index_encoder if rag.retriever is not None else None
        if built is not None:
            record["index_encoder_fingerprint"] = built["fingerprint"]
            if encoder is not None and encoder.fingerprint != built["fingerprint"]:
                # a trained question encoder: its directory says which passage encoder it goes
                # with, so `margin search --query-encoder DIR` accepts the model's index alone
                save_pairing(tmp / "question_encoder", encoder.fingerprint, built["fingerprint"])
        record.update(format=MODEL_FORMAT, version=MODEL_VERSION)
        (tmp / MODEL_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


# ----------------------------------------------------------------------------- installing

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # installed model names


def check_model_name(name: str) -> None:
    """Refuse a name ``--model NAME`` could not find once installed (before any work is done)."""
    if not MODEL_NAME.match(name) or name == "default":
        raise MarginError(f"model name {name!r}: use 1-64 letters, digits, '.', '_' or '-' "
                          "(and not 'default', the bundled model)")


def install_model(src: str | Path, name: str, index: str | Path | None = None) -> Path:
    """Install margin model directory ``src`` as ``$MARGIN_HOME/models/<name>`` (``--model name``,
    ``RAG.load(name)``), with index ``index`` inside it as ``<name>/index``, the index that
    ``index="auto"`` then opens. Without ``index`` the model keeps the one ``src`` carries, if any.

    The index is checked against the model's passage encoder fingerprint first, and installed
    as hard links where the filesystem allows (an index's files are written once: adding
    passages writes new files and swaps the manifest, margin.retrieval.build), else copied. The
    whole install is atomic: a crash leaves the previous install, if any, as it was.

    >>> install_model("run/last", "mine", index="reencoded-index")  # doctest: +SKIP
    """
    from margin.assets import margin_home

    check_model_name(name)
    src = Path(src)
    if not (src / MODEL_FILE).is_file():
        raise MarginError(f"{src} is not a margin model (no {MODEL_FILE}); give a directory "
                          "written by margin train or save_model")
    index = carried_index(src) if index is None else resolve_index(index)
    loaded = None if index is None else open_index(index)
    if loaded is not None:
        expected = ModelConfig.from_json(_read_json(src / MODEL_FILE)).index_encoder_fingerprint
        check_index_encoder(loaded.path, loaded.manifest.encoder, expected, src)
    target = margin_home() / "models" / name
    with atomic_path(target) as tmp:
        top = os.fspath(src)  # the index goes in below, checked and linked
        shutil.copytree(src, tmp, ignore=lambda where, _: [MODEL_INDEX] if where == top else [])
        if loaded is not None:
            link_index(loaded.path, loaded.manifest, tmp / MODEL_INDEX)
            open_index(tmp / MODEL_INDEX)  # the copy opens, or nothing is installed
    return target


def link_index(src: Path, manifest: Manifest, out: Path) -> None:
    """The manifest and the files it names (not leftovers, nor a sharded layout) of index ``src``,
    hard-linked (else copied) into the new directory ``out``; the manifest itself is copied."""
    out.mkdir()
    for rel in manifest.own_files():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if (src / rel).is_dir():
            shutil.copytree(src / rel, out / rel, copy_function=_link_or_copy)
        else:
            _link_or_copy(src / rel, out / rel)
    shutil.copy2(src / MANIFEST, out / MANIFEST)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MarginError(f"{path} cannot be read ({exc}); restore or re-save the model") from None
    if not isinstance(data, dict):
        raise MarginError(f"{path} is not a JSON object; restore or re-save the model")
    return data


def _model_type(path: Path) -> str | None:
    return _read_json(path / "config.json").get("model_type")
