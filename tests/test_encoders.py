"""Encoders agree with the libraries they wrap, pool as the papers say, and batch without drift.

Every model here is a tiny random BERT built in the session (no downloads): a plain BertModel (kind
hf), a sentence-transformers model assembled from Transformer + Pooling + Normalize, and
DPRContextEncoder / DPRQuestionEncoder. References are computed with the libraries directly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
)

from helpers import TINY_BERT, bert_tokenizer, one_thread
from margin.errors import MarginError
from margin.retrieval.encoders import (
    DPREncoder,
    HFEncoder,
    SentenceTransformerEncoder,
    load_encoder,
    load_encoder_from_spec,
    passage_text,
)
from margin.retrieval.passages import Passage

TEXTS = [
    "paris is the capital of france .",
    "who painted the mona lisa ?",
    "photosynthesis",
    "the cat sat on the mat with the dog in the city of berlin on the river .",
    "berlin",
    "plants and light and energy .",
    "what",
    "the louvre museum is in paris on the seine , the river of paris .",
]
PASSAGES = [
    Passage("p1", "paris", "paris is the capital of france ."),
    Passage("p2", "mona lisa", "the mona lisa was painted by leonardo ; it is in the louvre ."),
    Passage("p3", "", "plants use light energy in photosynthesis ."),
    Passage("p4", "berlin", "berlin is the capital of germany"),
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models saved once per session: hf, st, dpr_ctx, dpr_q."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Normalize,
        Pooling,
        Transformer,
    )

    root = tmp_path_factory.mktemp("encoders")
    with one_thread():
        torch.manual_seed(0)
        hf = root / "hf"
        BertModel(BertConfig(**TINY_BERT)).save_pretrained(hf)
        bert_tokenizer().save_pretrained(hf)

        st = root / "st"
        transformer = Transformer(str(hf), max_seq_length=48)
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(st))

        paths = {"hf": hf, "st": st}
        for key, cls in (("dpr_ctx", DPRContextEncoder), ("dpr_q", DPRQuestionEncoder)):
            cls(DPRConfig(**TINY_BERT)).save_pretrained(root / key)
            bert_tokenizer().save_pretrained(root / key)
            paths[key] = root / key
    return paths


@pytest.fixture(scope="session")
def encoders(models) -> dict[str, object]:
    """One loaded encoder per kind, shared by read-only tests."""
    with one_thread():
        return {
            "st": load_encoder(models["st"]),
            "hf": load_encoder(models["hf"]),
            "dpr_q": load_encoder(models["dpr_q"], role="question"),
            "dpr_ctx": load_encoder(models["dpr_ctx"], role="passage"),
        }


# ----------------------------------------------------------------------------- parity


def test_auto_detection_picks_the_kind(encoders):
    assert isinstance(encoders["st"], SentenceTransformerEncoder)
    assert isinstance(encoders["hf"], HFEncoder)
    assert isinstance(encoders["dpr_q"], DPREncoder)
    assert isinstance(encoders["dpr_ctx"], DPREncoder)
    assert [encoders[k].spec["kind"] for k in ("st", "hf", "dpr_q")] == [
        "sentence-transformers", "hf", "dpr",
    ]


def test_sentence_transformers_matches_encode(models, encoders):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(models["st"]), device="cpu").encode(TEXTS, batch_size=3)
    ours = encoders["st"].encode_queries(TEXTS, batch_size=3)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # Normalize module


def test_sentence_transformers_passage_is_title_space_text(models, encoders):
    from sentence_transformers import SentenceTransformer

    texts = [
        "paris paris is the capital of france .",
        "plants use light energy in photosynthesis .",
    ]
    assert [passage_text(p) for p in (PASSAGES[0], PASSAGES[2])] == texts
    reference = SentenceTransformer(str(models["st"]), device="cpu").encode(texts)
    ours = encoders["st"].encode_passages([PASSAGES[0], PASSAGES[2]])
    np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_dpr_passages_match_rag_embedding(models, encoders):
    """As use_own_knowledge_dataset.py: (title, text) pairs, input_ids only -> pooler_output."""
    ctx = DPRContextEncoder.from_pretrained(models["dpr_ctx"]).eval()
    tok = bert_tokenizer()
    titles, texts = [p.title for p in PASSAGES], [p.text for p in PASSAGES]
    batch = tok(titles, texts, truncation=True, padding="longest", return_tensors="pt")
    with torch.no_grad():
        reference = ctx(batch["input_ids"], return_dict=True).pooler_output.numpy()
        with_types = ctx(**batch).pooler_output.numpy()
    ours = encoders["dpr_ctx"].encode_passages(PASSAGES, batch_size=3)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # The tokenizer's token_type_ids (1 on the text) are NOT what RAG/DPR feed: they change vectors.
    assert not np.allclose(ours, with_types, atol=1e-3)


def test_dpr_questions_match_question_encoder(models, encoders):
    """As modeling_rag.py: question_encoder(input_ids, attention_mask)[0]."""
    q = DPRQuestionEncoder.from_pretrained(models["dpr_q"]).eval()
    batch = bert_tokenizer()(TEXTS, truncation=True, padding="longest", return_tensors="pt")
    with torch.no_grad():
        reference = q(batch["input_ids"], attention_mask=batch["attention_mask"])[0].numpy()
    np.testing.assert_allclose(encoders["dpr_q"].encode_queries(TEXTS), reference, atol=1e-5)


def test_dpr_role_must_match_checkpoint(models):
    with pytest.raises(MarginError, match="DPRContextEncoder, not a DPRQuestionEncoder"):
        load_encoder(models["dpr_ctx"], role="question")
    with pytest.raises(MarginError, match="DPRQuestionEncoder, not a DPRContextEncoder"):
        load_encoder(models["dpr_q"], role="passage")


def _hidden(models, texts):
    model = BertModel.from_pretrained(models["hf"]).eval()
    batch = bert_tokenizer()(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state, batch["attention_mask"]


def test_mean_and_cls_pooling_by_hand(models):
    texts = ["paris is the capital of france .", "berlin"]  # 9 and 3 tokens with [CLS]/[SEP]
    hidden, mask = _hidden(models, texts)
    assert mask.sum(1).tolist() == [9, 3]
    mean = np.stack([hidden[0, :9].mean(0).numpy(), hidden[1, :3].mean(0).numpy()])
    cls = hidden[:, 0].numpy()

    np.testing.assert_allclose(load_encoder(models["hf"]).encode_queries(texts), mean, atol=1e-5)
    np.testing.assert_allclose(
        load_encoder(models["hf"], pooling="cls").encode_queries(texts), cls, atol=1e-5
    )
    normed = load_encoder(models["hf"], pooling="cls", normalize=True).encode_queries(texts)
    np.testing.assert_allclose(normed, cls / np.linalg.norm(cls, axis=1, keepdims=True), atol=1e-5)


def test_max_length_truncates(models):
    enc = load_encoder(models["hf"], max_length=5)  # [CLS] + 3 words + [SEP]
    assert enc.spec["max_length"] == 5
    long, short = enc.encode_queries(["paris is the capital of france .", "paris is the"])
    np.testing.assert_allclose(long, short, atol=1e-5)


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("key", ["st", "hf", "dpr_q", "dpr_ctx"])
def test_batch_size_invariance_and_order(encoders, key):
    enc = encoders[key]
    full = enc.encode_queries(TEXTS, batch_size=64)
    np.testing.assert_allclose(enc.encode_queries(TEXTS, batch_size=1), full, atol=1e-5)
    np.testing.assert_allclose(enc.encode_queries(TEXTS, batch_size=3), full, atol=1e-5)
    one_by_one = np.stack([enc.encode_queries([t])[0] for t in TEXTS])
    np.testing.assert_allclose(one_by_one, full, atol=1e-5)  # rows come back in input order
    np.testing.assert_allclose(enc.encode_queries(TEXTS[::-1]), full[::-1], atol=1e-5)
    assert len({row.tobytes() for row in full}) == len(TEXTS)  # distinct texts, distinct rows
    passages = enc.encode_passages(PASSAGES, batch_size=1)
    np.testing.assert_allclose(enc.encode_passages(PASSAGES[::-1])[::-1], passages, atol=1e-5)


def test_empty_input_gives_zero_rows(encoders):
    for enc in encoders.values():
        for out in (enc.encode_queries([]), enc.encode_passages([])):
            assert out.shape == (0, enc.dim) and out.dtype == np.float32
        assert tuple(enc.embed_queries([]).shape) == (0, enc.dim)


def test_encode_is_deterministic_in_train_mode_and_restores_it(models):
    enc = load_encoder(models["hf"])  # dropout 0.3: train mode would change every call
    expected = enc.encode_queries(TEXTS)
    enc.module.train()
    np.testing.assert_array_equal(enc.encode_queries(TEXTS), expected)
    assert enc.module.training and all(m.training for m in enc.module.modules())
    with torch.no_grad():  # sanity: dropout really is active in train mode
        noisy = enc.embed_queries(TEXTS).numpy()
    assert not np.allclose(noisy, expected, atol=1e-4)


def test_progress_bar_is_opt_in(encoders, capsys):
    encoders["hf"].encode_queries(TEXTS)
    assert "encoding" not in capsys.readouterr().err
    encoders["hf"].encode_passages(PASSAGES, progress=True)
    assert "encoding passages" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("key", ["st", "hf", "dpr_q"])
def test_embed_queries_is_differentiable_and_equals_encode(models, key):
    enc = load_encoder(models[key], role="question")
    vectors = enc.embed_queries(TEXTS)  # eval mode after loading: no dropout
    assert vectors.requires_grad and tuple(vectors.shape) == (len(TEXTS), enc.dim)
    np.testing.assert_allclose(vectors.detach().numpy(), enc.encode_queries(TEXTS), atol=1e-5)

    # A retrieval-style loss: log-softmax of inner products with fixed passage vectors.
    docs = torch.from_numpy(np.random.default_rng(0).normal(size=(3, enc.dim)).astype(np.float32))
    loss = -torch.log_softmax(vectors @ docs.T, dim=-1)[:, 0].mean()
    loss.backward()
    grads = [p.grad for p in enc.module.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


# ----------------------------------------------------------------------------- identity


def test_fingerprint_stable_across_reloads_and_sensitive_to_one_weight(models, tmp_path):
    first, second = load_encoder(models["hf"]), load_encoder(models["hf"])
    assert len(first.fingerprint) == 64 and int(first.fingerprint, 16) >= 0
    assert first.fingerprint == second.fingerprint == first.fingerprint

    model = BertModel.from_pretrained(models["hf"])
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[3, 5] += 1e-3
    changed_dir = tmp_path / "changed"
    model.save_pretrained(changed_dir)
    bert_tokenizer().save_pretrained(changed_dir)
    assert load_encoder(changed_dir).fingerprint != first.fingerprint

    before = second.fingerprint  # cached; an in-place update (an optimizer step) invalidates it
    with torch.no_grad():
        next(second.module.parameters())[0, 0] += 1.0
    assert second.fingerprint != before


def test_fingerprint_differs_between_models(encoders):
    prints = {enc.fingerprint for enc in encoders.values()}
    assert len(prints) == len(encoders)


@pytest.mark.parametrize("key", ["st", "hf", "dpr_q", "dpr_ctx"])
def test_spec_round_trip(encoders, key):
    enc = encoders[key]
    spec = json.loads(json.dumps(enc.spec))  # JSON-able
    again = load_encoder_from_spec(spec)
    assert again.spec == enc.spec and again.fingerprint == enc.fingerprint
    assert set(spec) >= {"kind", "name", "role", "pooling", "max_length"}
    np.testing.assert_allclose(again.encode_passages(PASSAGES), enc.encode_passages(PASSAGES))


def test_spec_keeps_pooling_and_normalize(models):
    enc = load_encoder(models["hf"], pooling="cls", normalize=True, max_length=16)
    again = load_encoder_from_spec(enc.spec)
    assert again.spec == {
        "kind": "hf", "name": str(models["hf"].resolve()), "role": "question",
        "pooling": "cls", "max_length": 16, "normalize": True,
    }
    np.testing.assert_allclose(again.encode_queries(TEXTS), enc.encode_queries(TEXTS))


# ----------------------------------------------------------------------------- errors


def test_errors_are_one_line_margin_errors(models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    not_model = tmp_path / "not_model"
    shutil.copytree(models["hf"], not_model)
    (not_model / "config.json").unlink()
    no_weights = tmp_path / "no_weights"
    shutil.copytree(models["hf"], no_weights)
    (no_weights / "model.safetensors").unlink()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases = [
        (lambda: load_encoder(tmp_path / "missing"), "no such model directory"),
        (lambda: load_encoder("./missing/model"), "no such model directory"),
        (lambda: load_encoder(tmp_path / "empty"), "not a model directory"),
        (lambda: load_encoder(tmp_path / "file.txt"), "not a model directory"),
        (lambda: load_encoder(not_model), "not a model directory"),
        (lambda: load_encoder(no_weights), "cannot load the model"),
        (lambda: load_encoder("no-such-org/no-such-model"), "could not be fetched"),
        (lambda: load_encoder("facebook/dpr-x", kind="dpr", role="passage"), "not be fetched"),
        (lambda: load_encoder(models["hf"], role="answer"), "unknown encoder role"),
        (lambda: load_encoder(models["hf"], kind="bm25"), "unknown encoder kind"),
        (lambda: load_encoder(models["hf"], pooling="max"), "use mean or cls"),
        (lambda: load_encoder(models["st"], pooling="cls"), "use model"),
        (lambda: load_encoder(models["dpr_q"], normalize=True), "normalize applies"),
        (lambda: load_encoder_from_spec({"name": str(models["hf"])}), "lacks kind, role"),
    ]
    for call, message in cases:
        with pytest.raises(MarginError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_a_single_string_is_refused(encoders):
    with pytest.raises(MarginError, match="single string"):
        encoders["hf"].encode_queries("paris")
    with pytest.raises(MarginError, match="batch_size"):
        encoders["hf"].encode_queries(["paris"], batch_size=0)


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_default_encoder_sanity():
    enc = load_encoder("default")
    assert enc.dim == 384 and enc.spec["kind"] == "sentence-transformers"
    q, near, far = enc.encode_queries(
        ["Paris is the capital of France", "capital of France", "photosynthesis"]
    )
    np.testing.assert_allclose(np.linalg.norm([q, near, far], axis=1), 1.0, atol=1e-5)
    assert float(q @ near) > float(q @ far) + 0.3
    passage = enc.encode_passages([Passage("1", "France", "Its capital is Paris.")])
    assert passage.shape == (1, 384) and float(passage[0] @ near) > float(passage[0] @ far)
