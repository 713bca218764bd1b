"""The causal QA prompt: exact renderings worked out by hand, demonstrations, answer clean-up."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from margin.errors import MarginError
from margin.generation.prompting import (
    DEFAULT_TEMPLATE,
    Demonstration,
    PromptTemplate,
    load_demonstrations,
    postprocess_answer,
    prompt_fn,
)
from margin.retrieval.passages import Passage

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATE = PromptTemplate(
    system="SYS",
    closed_book_system="CB",
    demonstrations=(
        Demonstration(question="q1?", title="T1", text="text one", answer="a1"),
        Demonstration(question="q2?", title="T2", text="text two", answer="a2"),
    ),
)
PASSAGE = Passage(id="p", title="Title X", text="body")


def _tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>", "body", "q"])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def chat_tok() -> PreTrainedTokenizerFast:
    return _tokenizer(CHATML)


@pytest.fixture(scope="module")
def plain_tok() -> PreTrainedTokenizerFast:
    return _tokenizer(None)


def test_chat_rendering(chat_tok) -> None:
    expected = (
        "<|im_start|>system\nSYS<|im_end|>\n"
        "<|im_start|>user\nContext: Title: T1\ntext one\nQuestion: q1?<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nContext: Title: T2\ntext two\nQuestion: q2?<|im_end|>\n"
        "<|im_start|>assistant\na2<|im_end|>\n"
        "<|im_start|>user\nContext: Title: Title X\nbody\nQuestion: q?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert TEMPLATE.render(chat_tok, "q?", PASSAGE) == expected


def test_plain_rendering(plain_tok) -> None:
    expected = (
        "SYS\n\n"
        "Context: Title: T1\ntext one\nQuestion: q1?\nAnswer: a1\n\n"
        "Context: Title: T2\ntext two\nQuestion: q2?\nAnswer: a2\n\n"
        "Context: Title: Title X\nbody\nQuestion: q?\nAnswer:"
    )
    assert TEMPLATE.render(plain_tok, "q?", PASSAGE) == expected


def test_chat_template_can_be_turned_off(chat_tok, plain_tok) -> None:
    off = dataclasses.replace(TEMPLATE, use_chat_template=False)
    assert off.render(chat_tok, "q?", PASSAGE) == TEMPLATE.render(plain_tok, "q?", PASSAGE)


def test_closed_book_drops_every_passage(chat_tok, plain_tok) -> None:
    plain = TEMPLATE.render(plain_tok, "q?", None)
    assert (
        plain
        == "CB\n\nQuestion: q1?\nAnswer: a1\n\nQuestion: q2?\nAnswer: a2\n\nQuestion: q?\nAnswer:"
    )
    chat = TEMPLATE.render(chat_tok, "q?", None)
    assert chat.startswith("<|im_start|>system\nCB<|im_end|>\n")
    assert chat.endswith("<|im_start|>user\nQuestion: q?<|im_end|>\n<|im_start|>assistant\n")
    for text in (plain, chat):
        assert "Context" not in text and "text one" not in text and "Title" not in text


def test_demonstrations_appear_in_order(chat_tok) -> None:
    text = TEMPLATE.render(chat_tok, "q?", PASSAGE)
    positions = [text.index(s) for s in ("q1?", "a1", "q2?", "a2", "Question: q?")]
    assert positions == sorted(positions)
    turns = TEMPLATE.messages("q?", PASSAGE)
    roles = [t["role"] for t in turns]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]


def test_untitled_passage_and_empty_system(plain_tok) -> None:
    bare = PromptTemplate(system="")
    untitled = Passage(id="u", title="", text="body")
    assert bare.render(plain_tok, "q?", untitled) == "Context: body\nQuestion: q?\nAnswer:"
    assert bare.messages("q?", untitled) == [
        {"role": "user", "content": "Context: body\nQuestion: q?"}
    ]


def test_target_follows_the_prompt(chat_tok, plain_tok) -> None:
    assert TEMPLATE.target(chat_tok, "Canberra") == "Canberra"  # after "assistant\n"
    assert TEMPLATE.target(plain_tok, "Canberra") == " Canberra"  # after "Answer:"
    assert DEFAULT_TEMPLATE.target(chat_tok, "Canberra") == " Canberra"  # default is plain


def test_default_template_and_prompt_fn(chat_tok) -> None:
    demos = DEFAULT_TEMPLATE.demonstrations
    assert len(demos) == 3
    assert all(d.answer in d.text for d in demos)  # extractive: the answer is copied from the text
    assert prompt_fn(chat_tok, "q?", PASSAGE) == DEFAULT_TEMPLATE.render(chat_tok, "q?", PASSAGE)
    text = prompt_fn(chat_tok, "q?", PASSAGE)
    assert text.endswith("Context: Title: Title X\nbody\nQuestion: q?\nAnswer:")
    assert "<|im_start|>" not in text  # the default template is plain few-shot (see prompting.py)


def test_load_demonstrations_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "demos.jsonl"
    row = {"question": "q", "title": "t", "text": "x y", "answer": "y"}
    path.write_text(json.dumps(row) + "\n\n" + json.dumps({**row, "answer": "x"}) + "\n")
    assert [d.answer for d in load_demonstrations(path)] == ["y", "x"]


def test_a_unicode_line_separator_inside_a_demonstration_is_text(tmp_path: Path) -> None:
    path = tmp_path / "demos.jsonl"  # JSON written without ASCII escaping keeps U+2028 raw
    row = {"question": "q", "title": "t", "text": "x\u2028y", "answer": "y"}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [d.text for d in load_demonstrations(path)] == ["x\u2028y"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q"}\n', r"demos\.jsonl:1: a demonstration needs string fields"),
        ('\n{"question": "q",\n', r"demos\.jsonl:2: not valid JSON \("),
        ("[1, 2]\n", r"demos\.jsonl:1: a demonstration needs"),
    ],
)
def test_bad_demonstrations_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "demos.jsonl"
    path.write_text(content)
    with pytest.raises(MarginError, match=message):
        load_demonstrations(path)


def test_missing_demonstrations_file(tmp_path: Path) -> None:
    with pytest.raises(MarginError, match="cannot read demonstrations"):
        load_demonstrations(tmp_path / "absent.jsonl")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (" Canberra\n\nContext: Title: Spider\n", "Canberra"),  # plain format runs on
        ("Canberra<|im_end|>\n<|im_start|>user", "Canberra"),  # chat end of turn
        (' "Jane Austen".', "Jane Austen"),
        ("'eight'", "eight"),
        ("\u201cAlbert Einstein\u201d", "Albert Einstein"),
        ("Answer: 1969.", "1969"),
        ("William Shakespeare!?", "William Shakespeare"),
        ('"Canberra."', "Canberra"),
        ("Washington, D.C.", "Washington, D.C."),  # an abbreviation keeps its dot
        ("It's 42", "It's 42"),
        ("\n", ""),
        ("<|im_end|>", ""),
        ("", ""),
    ],
)
def test_postprocess_answer(raw: str, clean: str) -> None:
    assert postprocess_answer(raw) == clean


@pytest.mark.slow
def test_default_model_copies_the_answer_from_the_context() -> None:
    """Greedy SmolLM2-135M-Instruct with the default template answers from the passage."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from margin.generation.default_generator import default_generator_dir

    path = default_generator_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    passage = Passage(id="au", title="Australia", text="The capital of Australia is Canberra.")
    prompt = prompt_fn(tok, "What is the capital of Australia?", passage)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids  # (1, S)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)  # (1, S + new)
    answer = postprocess_answer(tok.decode(out[0, ids.shape[1] :]))
    print(f"answer: {answer!r}")
    assert "Canberra" in answer
