"""Regularized evolution (Real et al., AAAI 2019; the search of SPOS and CMP-NAS) as an
Optuna sampler.

The population is the last ``population`` completed *feasible* trials (aging: the oldest
leave first). A child is the winner of a tournament of ``tournament`` random members,
uniformly crossed with a second winner with probability ``crossover_prob``, then mutated:
each layer, with probability ``mutation_prob``, gets a random op and channel scale. Until
the population is full, children are uniform random archs.

Under a latency budget (``fits``, the predictor's check), every child is drawn until it
fits, as in SPOS's constrained evolution: the initial population from ``init`` (random
feasible archs), and a mutated child redrawn up to ``max_redraws`` times (then a fresh
draw from ``init``, where no child of the population fits). Without this, at
a tight budget (0.4% of uniform archs fit at 30% of the quickstart's range) the population
took over 3,000 over-budget trials to fill.

Both samplers here decide the whole arch in ``before_trial`` and answer
``sample_independent`` from it, so they work with the conditional parameters of
``SearchSpace.suggest``.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hwnas.space import SKIP, Arch, SearchSpace


def _feasible(t: FrozenTrial) -> bool:
    return all(v <= 0 for v in t.constraints.values())


class WholeArchSampler(BaseSampler):
    """A sampler that proposes one whole arch per trial (``propose``)."""

    def __init__(self, space: SearchSpace, seed: int | None = None):
        self.space, self.seed = space, seed
        self.rng = random.Random(seed)
        self._pending: dict[int, dict] = {}

    def propose(self, study: Study) -> Arch:
        raise NotImplementedError

    # Optuna's relative sampling is not used: the arch is decided per trial.
    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return {}

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        if self.seed is not None:  # per trial: a resumed study does not replay its first draws
            self.rng = random.Random(f"{self.seed}:{trial.number}")
        self._pending[trial.number] = self.space.params_of(self.propose(study))

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        params = self._pending.get(trial.number)
        if params is None or param_name not in params:
            return param_distribution.to_external_repr(
                self.rng.randrange(len(param_distribution.choices)))
        return params[param_name]

    def after_trial(self, study, trial, state, values) -> None:
        self._pending.pop(trial.number, None)


class RandomArchSampler(WholeArchSampler):
    """Random search: each trial an arch from ``init(rng)`` (random feasible archs under a
    budget, ``LatencyPredictor.sample_feasible``; uniform archs of the space without)."""

    def __init__(self, space: SearchSpace, init: Callable | None = None, seed: int | None = None):
        super().__init__(space, seed)
        self.init = init or space.sample

    def propose(self, study: Study) -> Arch:
        return self.init(self.rng)


class RegularizedEvolutionSampler(WholeArchSampler):
    def __init__(self, space: SearchSpace, population: int = 20, tournament: int = 5,
                 mutation_prob: float = 0.1, crossover_prob: float = 0.5, seed: int | None = None,
                 fits: Callable[[Arch], bool] | None = None, init: Callable | None = None,
                 max_redraws: int = 200):
        if tournament > population or tournament < 1:
            raise ValueError("tournament must be between 1 and population")
        super().__init__(space, seed)
        self.population, self.tournament = population, tournament
        self.mutation_prob, self.crossover_prob = mutation_prob, crossover_prob
        self.fits = fits or (lambda a: True)
        self.init = init or space.sample
        self.max_redraws = max_redraws

    def _pool(self, study: Study) -> list[tuple[float, Arch]]:
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if _feasible(t) and "arch" in t.user_attrs]
        done = done[-self.population:]
        sign = 1.0 if study.directions[0] == StudyDirection.MAXIMIZE else -1.0
        return [(sign * t.values[0], self.space.parse(t.user_attrs["arch"])) for t in done]

    def propose(self, study: Study) -> Arch:
        pool = self._pool(study)
        if len(pool) < self.population:
            return self.init(self.rng)
        for _ in range(self.max_redraws):
            child = self._child(pool)
            if self.fits(child):
                return child
        # no child of this population fits (a tight budget with a high mutation_prob): a fresh
        # draw, feasible where init is the predictor's sample_feasible, rather than a trial
        # spent over the budget
        return self.init(self.rng)

    def _child(self, pool: list[tuple[float, Arch]]) -> Arch:
        def winner() -> Arch:
            return max(self.rng.sample(pool, self.tournament), key=lambda p: p[0])[1]

        child = list(winner().layers)
        if self.rng.random() < self.crossover_prob:
            other = winner().layers
            child = [a if self.rng.random() < 0.5 else b for a, b in zip(child, other)]
        for i, layer in enumerate(self.space.layers()):
            if self.rng.random() < self.mutation_prob:
                op = self.rng.choice(layer.choices)
                child[i] = (op, None if op == SKIP else self.rng.choice(self.space.channel_scales))
        return Arch(tuple(child))
