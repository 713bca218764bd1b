"""`margin train`'s flags are TrainConfig's fields (margin.training.config): the same names, the
same defaults, each one reaching the config, and the fields that are not flags exactly those
TrainConfig's docstring names. `margin finetune`'s help states the recipe's own values.

The flags are written out by hand in margin.cli (typer reads them from the command's signature);
these tests are what keeps the two copies from drifting apart.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import typer.main

import margin.training.train
from margin.cli import app, main
from margin.training.config import TrainConfig
from margin.training.recipe import (
    FINETUNE_RECIPE,
    FINETUNE_UNGROUNDED,
    HELDOUT,
    RETRIEVER_STAGES,
)
from margin.training.train import TrainResult

FIELDS = {f.name: f for f in fields(TrainConfig)}
# a valid value other than the default, for the fields that hold a name
OTHER_NAME = {"mode": "sequence", "target": "sample", "precision": "fp32", "device": "cpu",
              "passage_encoder": "train"}
# a flag that works only beside another: that one's field and value
NEEDS = {"refresh_every": ("passage_encoder", "train")}


def options(command: str) -> dict:
    """The command's options by parameter name (``--batch-size`` is ``batch_size``)."""
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


def python_only() -> set[str]:
    """The fields TrainConfig's docstring says are not flags: the names after its "except"."""
    doc = TrainConfig.__doc__ or ""
    assert "except" in doc, doc
    return set(re.findall(r"``(\w+)``", doc.split("except", 1)[1]))


def test_the_fields_that_are_not_flags_are_the_ones_the_docstring_names():
    flags = set(options("train"))
    named = python_only()
    assert named and named <= set(FIELDS), named - set(FIELDS)
    assert set(FIELDS) - flags == named


def test_every_train_flag_of_a_field_has_its_name_and_default():
    train = options("train")
    for name in set(FIELDS) & set(train):
        assert f"--{name.replace('_', '-')}" in train[name].opts, (name, train[name].opts)
        assert train[name].default == FIELDS[name].default, name


def other_value(name: str) -> tuple[list[str], object]:
    """Command-line words giving field ``name`` a valid value other than its default, and it."""
    default, kind = FIELDS[name].default, get_type_hints(TrainConfig)[name]
    flag = f"--{name.replace('_', '-')}"
    if kind is bool:
        assert default is False, name
        return [flag], True
    if isinstance(default, str):
        return [flag, OTHER_NAME[name]], OTHER_NAME[name]
    value = 2.5 if float in getattr(kind, "__args__", (kind,)) else 2
    value = value if default is None else default + value
    return [flag, str(value)], value


def test_every_train_flag_of_a_field_reaches_the_config(tmp_path, monkeypatch):
    """Each flag alone, set to another value, arrives in the TrainConfig `margin train` runs."""
    seen: list[TrainConfig] = []

    def run(train_path, out, config, **kwargs):
        seen.append(config)
        return TrainResult(1, 0.0, None, None, 0.0, Path(out)), 0

    monkeypatch.setattr(margin.training.train, "run", run)
    base = ["train", "--train", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "out")]
    for name in sorted(set(FIELDS) & set(options("train"))):
        words, value = other_value(name)
        needed = dict([NEEDS[name]]) if name in NEEDS else {}
        for field, given in needed.items():
            words += [f"--{field.replace('_', '-')}", given]
        assert main([*base, *words]) == 0, name
        assert getattr(seen[-1], name) == value != FIELDS[name].default, name
        others = {f: getattr(seen[-1], f) for f in FIELDS if f != name}
        assert others == {f: needed.get(f, FIELDS[f].default) for f in others}, name


def test_finetune_flags_default_to_the_recipe_and_say_its_values():
    finetune = options("finetune")
    for name in set(FIELDS) & set(finetune):  # None: the recipe's value
        expected = FINETUNE_RECIPE.device if name == "device" else None
        assert finetune[name].default == expected, name
    stated = {name: re.search(r"\(recipe: ([^;)]+)", finetune[name].help or "")
              for name in finetune}
    stated = {name: m.group(1) for name, m in stated.items() if m}
    recipe = {name: getattr(FINETUNE_RECIPE, name) for name in stated if name in FIELDS}
    assert set(stated) == {"k", "mode", "precision", "max_minutes", "ungrounded", "retriever"}
    assert stated["retriever"] == finetune["retriever"].default == RETRIEVER_STAGES[0]
    for name, value in recipe.items():
        assert stated[name] == (value if isinstance(value, str) else f"{value:g}"), name
    assert float(stated["ungrounded"]) == FINETUNE_UNGROUNDED
    assert finetune["heldout"].default == HELDOUT

