"""Prompts for decoder-only generators: how (question, passage) becomes text, and answers come back.

Why: the paper's generator is BART, a seq2seq model that reads ``title / text // question``
(Sec. 2.3) and was fine-tuned to answer. A small decoder (the default SmolLM2-135M-Instruct) was
never fine-tuned on that format; it answers best when told to copy a short span and shown a few
worked examples. Everything about that prompt lives in one typed, documented
:class:`PromptTemplate` so it can be changed without touching the generator.

Chat template or plain text? A template renders through the tokenizer's chat template when it has
one and ``use_chat_template`` is on (the class default, right for larger instruct models). The
shipped ``DEFAULT_TEMPLATE`` turns it OFF: on eight hand-written (passage, question) pairs, greedy
SmolLM2-135M-Instruct gave the exact short answer for 6/8 with the plain few-shot format but 1/8
in chat form, where it ignores the demonstrations and answers in full sentences ("Canberra is the
capital of Australia"). In the plain format the answer follows ``Answer:`` after one space and
ends at a newline: score targets with :meth:`PromptTemplate.target` (which adds the space) and
cut generations with :func:`postprocess_answer`.

Rendering, with a chat template (the tokenizer's ``chat_template`` is set)::

    system:     <system instruction>
    user:       Context: Title: <title>\\n<text>\\nQuestion: <question>     } one pair per
    assistant:  <answer>                                                  } demonstration
    user:       Context: Title: <title>\\n<text>\\nQuestion: <question>
    assistant:  (generation starts here: add_generation_prompt=True)

and without one, the same turns as plain text::

    <system instruction>

    Context: Title: <title>\\n<text>\\nQuestion: <question>\\nAnswer: <answer>

    Context: ...\\nQuestion: <question>\\nAnswer:

``passage=None`` is the closed-book prompt (the paper's "BART" baseline): the same template with
every passage removed, the demonstrations' included, and the closed-book system instruction.
A rendered chat prompt already holds its special tokens; tokenise it with
``add_special_tokens=False`` (``margin.generation.causal.CausalGenerator`` does).

Example::

    from margin.generation.prompting import DEFAULT_TEMPLATE, postprocess_answer
    prompt = DEFAULT_TEMPLATE.render(tokenizer, "What is the capital of Australia?", passage)
    answer = postprocess_answer(tokenizer.decode(generated_ids))
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from margin.errors import MarginError
from margin.retrieval.passages import Passage

PromptFn = Callable[[Any, str, Passage | None], str]  # (tokenizer, question, passage) -> prompt

DEMONSTRATIONS_FILE = "qa_demonstrations.jsonl"  # package data in margin/data/
END_OF_TURN = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|eot_id|>", "</s>")  # cut here
QUOTES = "\"'`\u201c\u201d\u2018\u2019"  # stripped when they surround an answer
TRAILING_PUNCTUATION = ".,;:!?"  # trimmed from the end of an answer (abbreviations keep their dot)


@dataclass(frozen=True)
class Demonstration:
    """One worked example: a question, the passage that answers it, and the short answer."""

    question: str  # the question, as a user would ask it
    title: str  # title of the demonstration passage
    text: str  # passage text containing the answer verbatim
    answer: str  # the short span copied from ``text``


@dataclass(frozen=True)
class PromptTemplate:
    """A decoder-only QA prompt: an instruction, worked demonstrations, then the question."""

    system: str = (  # instruction when a passage is given
        "Answer the question with a short phrase copied from the context. Do not write a sentence."
    )
    closed_book_system: str = (  # instruction when there is no passage (closed book)
        "Answer the question with a short phrase. Do not write a sentence."
    )
    demonstrations: tuple[Demonstration, ...] = ()  # worked examples, shown in this order
    passage_format: str = "Title: {title}\n{text}"  # how a passage is shown; "{text}" if no title
    question_format: str = "Context: {context}\nQuestion: {question}"  # user turn with a passage
    closed_book_format: str = "Question: {question}"  # user turn without a passage
    answer_prefix: str = "Answer:"  # plain-text format only: the model's answer follows this
    use_chat_template: bool = True  # use the tokenizer's chat template when it has one

    def render(self, tokenizer: Any, question: str, passage: Passage | None) -> str:
        """The prompt string for ``question`` (with ``passage``, or closed book when None)."""
        if self.uses_chat(tokenizer):
            return tokenizer.apply_chat_template(
                self.messages(question, passage), tokenize=False, add_generation_prompt=True
            )
        return self.plain(question, passage)

    def messages(self, question: str, passage: Passage | None) -> list[dict[str, str]]:
        """Chat turns: system, one user/assistant pair per demonstration, the final user turn."""
        closed = passage is None
        system = self.closed_book_system if closed else self.system
        turns = [{"role": "system", "content": system}] if system else []
        for demo in self.demonstrations:
            shown = None if closed else Passage(id="demo", title=demo.title, text=demo.text)
            turns.append({"role": "user", "content": self.user_turn(demo.question, shown)})
            turns.append({"role": "assistant", "content": demo.answer})
        turns.append({"role": "user", "content": self.user_turn(question, passage)})
        return turns

    def plain(self, question: str, passage: Passage | None) -> str:
        """The same turns as plain text, for tokenizers without a chat template."""
        turns = self.messages(question, passage)
        blocks = [t["content"] for t in turns if t["role"] == "system"]
        pairs = [t for t in turns if t["role"] != "system"]
        for user, assistant in zip(pairs[0:-1:2], pairs[1::2], strict=True):
            blocks.append(f"{user['content']}\n{self.answer_prefix} {assistant['content']}")
        blocks.append(f"{pairs[-1]['content']}\n{self.answer_prefix}")
        return "\n\n".join(blocks)

    def target(self, tokenizer: Any, answer: str) -> str:
        """The text a model must produce right after :meth:`render`'s prompt to give ``answer``.

        The chat format's generation prompt ends a line, so the answer follows as is; the plain
        format ends with ``Answer:`` and the answer follows after one space (BPE tokenisers fold
        that space into the next word: " Canberra" is one token, "Canberra" two).
        """
        return answer if self.uses_chat(tokenizer) else f" {answer}"

    def uses_chat(self, tokenizer: Any) -> bool:
        """Whether :meth:`render` goes through ``tokenizer``'s chat template."""
        return self.use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    def user_turn(self, question: str, passage: Passage | None) -> str:
        """The user's message: the passage (if any) and the question."""
        if passage is None:
            return self.closed_book_format.format(question=question)
        return self.question_format.format(context=self.show_passage(passage), question=question)

    def show_passage(self, passage: Passage) -> str:
        """A passage as the model sees it: ``Title: <title>\\n<text>`` by default."""
        if not passage.title:
            return passage.text
        return self.passage_format.format(title=passage.title, text=passage.text)


def load_demonstrations(path: Path | None = None) -> tuple[Demonstration, ...]:
    """Read demonstrations from a JSONL file (one object per line: question, title, text, answer).

    ``path=None`` reads the three hand-written general-knowledge examples shipped with margin
    (``margin/data/qa_demonstrations.jsonl``; none come from any evaluation data set).
    """
    if path is None:
        name = f"margin/data/{DEMONSTRATIONS_FILE}"
        text = resources.files("margin").joinpath("data", DEMONSTRATIONS_FILE).read_text("utf-8")
    else:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise MarginError(f"{path}: cannot read demonstrations ({exc.strerror})") from exc
    fields = ("question", "title", "text", "answer")
    demos = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not U+2028 & co.
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MarginError(
                f"{name}:{lineno}: not valid JSON ({exc.msg}); fix that line or remove it"
            ) from exc
        if not isinstance(row, dict) or any(not isinstance(row.get(f), str) for f in fields):
            raise MarginError(
                f"{name}:{lineno}: a demonstration needs string fields {', '.join(fields)}; "
                "fix that line or remove it"
            )
        demos.append(Demonstration(**{f: row[f] for f in fields}))
    return tuple(demos)


def postprocess_answer(text: str) -> str:
    """Clean a generated answer: first line of the first turn, no surrounding quotes or end dot.

    Cuts at the first end-of-turn marker or newline, drops a leading ``Answer:`` the model may
    repeat, then strips whitespace, surrounding quotes and trailing punctuation until nothing
    changes. A final dot after a one-letter abbreviation is kept (``Washington, D.C.``).
    """
    for marker in END_OF_TURN:
        text = text.split(marker, 1)[0]
    text = text.strip().split("\n", 1)[0]
    text = re.sub(r"^answer\s*:", "", text.strip(), flags=re.IGNORECASE)
    previous = None
    while text != previous:
        previous = text
        text = text.strip()
        if len(text) >= 2 and text[0] in QUOTES and text[-1] in QUOTES:
            text = text[1:-1]
        if text and text[-1] in TRAILING_PUNCTUATION and not _ends_with_abbreviation(text):
            text = text[:-1]
    return text


def _ends_with_abbreviation(text: str) -> bool:
    """True for ``D.C.``, ``U.S.`` or ``J. R. R.``: a one-letter word followed by a dot."""
    return re.search(r"(?:^|[\s.])\w\.$", text) is not None


# Plain few-shot, not chat: SmolLM2-135M-Instruct answers in sentences in chat form (see top).
DEFAULT_TEMPLATE = PromptTemplate(demonstrations=load_demonstrations(), use_chat_template=False)


def prompt_fn(tokenizer: Any, question: str, passage: Passage | None) -> str:
    """The default causal prompt (``DEFAULT_TEMPLATE``), as ``margin.generation.causal`` expects
    it."""
    return DEFAULT_TEMPLATE.render(tokenizer, question, passage)


def target_fn(tokenizer: Any, answer: str) -> str:
    """The default template's answer text after the prompt (``DEFAULT_TEMPLATE.target``)."""
    return DEFAULT_TEMPLATE.target(tokenizer, answer)
