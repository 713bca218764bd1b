"""`margin train`'s flags are TrainConfig's fields (margin.training.config), and `margin
train-retriever`'s RetrieverTrainConfig's (margin.training.contrastive): the same names, the same
defaults, each one reaching the config, and the fields that are not flags exactly those the
config's docstring names. `margin finetune`'s help states the recipe's own values.

The flags are written out by hand in margin.cli and margin.cli_retriever (typer reads them from
the command's signature); these tests are what keeps the two copies from drifting apart.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import get_type_hints

import pytest
import typer.main

import margin.training.contrastive
import margin.training.train
from margin.cli import app, main
from margin.training.config import TrainConfig
from margin.training.contrastive import RetrieverTrainConfig, RetrieverTrainResult
from margin.training.recipe import (
    FINETUNE_RECIPE,
    FINETUNE_UNGROUNDED,
    HELDOUT,
    RETRIEVER_STAGES,
)
from margin.training.train import TrainResult

CONFIGS = {"train": TrainConfig, "train-retriever": RetrieverTrainConfig}  # command: its config
FIELDS = {command: {f.name: f for f in fields(config)} for command, config in CONFIGS.items()}
# where each command's run is, patched out, and what it returns, given the output directory
RUNS = {
    "train": (margin.training.train, "run",
              lambda out: (TrainResult(1, 0.0, None, None, 0.0, out), 0)),
    "train-retriever": (margin.training.contrastive, "train_retriever",
                        lambda out: RetrieverTrainResult(1, 1, 0.0, 1, 0, None, None, out, None,
                                                         out, 0, 0.0, out)),
}
# a valid value other than the default, for the fields that hold a name
OTHER_NAME = {"mode": "sequence", "target": "sample", "precision": "fp32", "device": "cpu",
              "passage_encoder": "train", "positives": "bm25"}
# a flag that works only beside another: that one's field and value
NEEDS = {"refresh_every": ("passage_encoder", "train")}


def options(command: str) -> dict:
    """The command's options by parameter name (``--batch-size`` is ``batch_size``)."""
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


def python_only(command: str) -> set[str]:
    """The fields the command's config's docstring says are not flags: the names after its
    "except"."""
    doc = CONFIGS[command].__doc__ or ""
    assert "except" in doc, doc
    return set(re.findall(r"``(\w+)``", doc.split("except", 1)[1]))


@pytest.mark.parametrize("command", CONFIGS)
def test_the_fields_that_are_not_flags_are_the_ones_the_docstring_names(command):
    flags, fields_ = set(options(command)), set(FIELDS[command])
    named = python_only(command)
    assert named and named <= fields_, named - fields_
    assert fields_ - flags == named


@pytest.mark.parametrize("command", CONFIGS)
def test_every_flag_of_a_field_has_its_name_and_default(command):
    flags, fields_ = options(command), FIELDS[command]
    for name in set(fields_) & set(flags):
        assert f"--{name.replace('_', '-')}" in flags[name].opts, (name, flags[name].opts)
        assert flags[name].default == fields_[name].default, name


def other_value(command: str, name: str) -> tuple[list[str], object]:
    """Command-line words giving field ``name`` a valid value other than its default, and it."""
    default = FIELDS[command][name].default
    kind = get_type_hints(CONFIGS[command])[name]
    flag = f"--{name.replace('_', '-')}"
    if kind is bool:
        assert default is False, name
        return [flag], True
    if isinstance(default, str):
        return [flag, OTHER_NAME[name]], OTHER_NAME[name]
    value = 2.5 if float in getattr(kind, "__args__", (kind,)) else 2
    value = value if default is None else default + value
    return [flag, str(value)], value


@pytest.mark.parametrize("command", CONFIGS)
def test_every_flag_of_a_field_reaches_the_config(command, tmp_path, monkeypatch):
    """Each flag alone, set to another value, arrives in the config the command runs."""
    seen: list = []
    module, attribute, result = RUNS[command]

    def run(*args, **kwargs):
        seen.append(next(a for a in args if isinstance(a, CONFIGS[command])))
        return result(tmp_path / "out")

    monkeypatch.setattr(module, attribute, run)
    data = tmp_path / "t.tsv"  # read before the run by train-retriever
    data.write_text("who wrote hamlet ?\t['shakespeare']\n")
    base = [command, "--train", str(data), "--out", str(tmp_path / "out")]
    fields_ = FIELDS[command]
    for name in sorted(set(fields_) & set(options(command))):
        words, value = other_value(command, name)
        needed = dict([NEEDS[name]]) if name in NEEDS else {}
        for field, given in needed.items():
            words += [f"--{field.replace('_', '-')}", given]
        assert main([*base, *words]) == 0, name
        assert getattr(seen[-1], name) == value != fields_[name].default, name
        others = {f: getattr(seen[-1], f) for f in fields_ if f != name}
        assert others == {f: needed.get(f, fields_[f].default) for f in others}, name


def test_finetune_flags_default_to_the_recipe_and_say_its_values():
    finetune, fields_ = options("finetune"), FIELDS["train"]
    for name in set(fields_) & set(finetune):  # None: the recipe's value
        expected = FINETUNE_RECIPE.device if name == "device" else None
        assert finetune[name].default == expected, name
    stated = {name: re.search(r"\(recipe: ([^;)]+)", finetune[name].help or "")
              for name in finetune}
    stated = {name: m.group(1) for name, m in stated.items() if m}
    recipe = {name: getattr(FINETUNE_RECIPE, name) for name in stated if name in fields_}
    assert set(stated) == {"k", "mode", "precision", "max_minutes", "ungrounded", "retriever"}
    assert stated["retriever"] == finetune["retriever"].default == RETRIEVER_STAGES[0]
    for name, value in recipe.items():
        assert stated[name] == (value if isinstance(value, str) else f"{value:g}"), name
    assert float(stated["ungrounded"]) == FINETUNE_UNGROUNDED
    assert finetune["heldout"].default == HELDOUT

