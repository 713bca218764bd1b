"""How a fine-tuning run is laid out in optimizer steps: how many (``total_steps``, or fewer to
fit a time budget, ``steps_within`` and ``TimeBudget``, the cut said by ``said_cut``), the
learning rate at each (``lr_factor``), the examples of each micro-batch (``epoch_order``,
``micro_batches``) and the answer each trains on (``pick_target``).

Small pure functions of the config, the step and the seed, so that the loop
(margin.training.train) reads as the loop, and so that a resumed run, or every process of a
data-parallel one (margin.training.data_parallel), sees the very same data in the same order.
``TimeBudget`` alone keeps a little state, the time of the first step; the retriever's loop
(margin.training.contrastive) uses it and ``lr_factor`` too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import numpy as np

from margin.training.config import TrainConfig


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def steps_within(budget_s: float, elapsed_s: float, step: int, step_s: float, total: int) -> int:
    """The run's length in optimizer steps under a time budget: ``step`` steps are done after
    ``elapsed_s`` of ``budget_s`` seconds and a step takes ``step_s``; ``total`` if the rest
    fits, else the steps that do (never fewer than ``step``: a run stops, it is not undone)."""
    fit = step + int(max(0.0, budget_s - elapsed_s) // max(step_s, 1e-9))
    return max(step, min(total, fit))


class TimeBudget:
    """A run's length under a budget of ``minutes``, asked again after every optimizer step.

    The first step pays one-off costs (allocations, caches filling), so steps are timed from its
    end; once two more are done, :meth:`steps` cuts the run to the steps that fit at the mean
    step time so far (``steps_within``: never longer than asked, never shorter than done).
    """

    def __init__(self, minutes: float):
        self.minutes = minutes
        self.step_s = float("nan")  # seconds a step takes, once timed
        self._timed_from: tuple[int, float] | None = None  # (step, elapsed s) after the first

    def steps(self, step: int, elapsed_s: float, total: int) -> int:
        """The run's length once ``step`` steps are done ``elapsed_s`` seconds into the budget."""
        if self._timed_from is None:
            self._timed_from = (step, elapsed_s)
            return total
        first_step, first_s = self._timed_from
        if step - first_step < 2:
            return total
        self.step_s = (elapsed_s - first_s) / (step - first_step)
        return steps_within(60 * self.minutes, elapsed_s, step, self.step_s, total)


def said_cut(steps: int, planned: int, max_minutes: float | None) -> str:
    """How a summary line says a run was cut to its time budget: "4 of the 6 steps asked for
    (the rest did not fit --max-minutes 2.25)"; ``max_minutes`` None: a resumed run, cut by an
    earlier call's budget."""
    budget = ("an earlier call's --max-minutes" if max_minutes is None
              else f"--max-minutes {max_minutes:g}")
    return f"{steps} of the {planned} steps asked for (the rest did not fit {budget})"


def pick_target(answers: Sequence[str], choice: str, rng: random.Random) -> str:
    """The training target among gold answers: the first, or one sampled (per epoch).

    Answers with no letter or digit (junk such as a lone emoji in TriviaQA) are passed over
    whenever a real one exists.
    """
    real = [a for a in answers if any(c.isalnum() for c in a)] or list(answers)
    return real[0] if choice == "first" else rng.choice(real)


def total_steps(n_examples: int, config: TrainConfig) -> int:
    """Optimizer steps of the run: ``steps``, or ``epochs`` passes of the data."""
    if config.steps is not None:
        return config.steps
    per_epoch = math.ceil(n_examples / (config.batch_size * config.grad_accum))
    return config.epochs * per_epoch


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batches(
    n: int, config: TrainConfig, epoch: int, position: int
) -> Iterator[tuple[np.ndarray, int, int]]:
    """Example indices of each micro-batch from (epoch, position) on, forever.

    Yields (indices, epoch, position after the batch); an epoch's last batch may be short.
    """
    while True:
        order = epoch_order(n, config.seed, epoch)
        while position < n:
            rows = order[position : position + config.batch_size]
            position += len(rows)
            yield rows, epoch, position
        epoch, position = epoch + 1, 0
