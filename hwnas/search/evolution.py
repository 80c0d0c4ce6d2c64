"""Regularized evolution (Real et al., AAAI 2019; the search of SPOS and CMP-NAS) as an
Optuna sampler.

The population is the last ``population`` completed *feasible* trials (aging: the oldest
leave first). A child is the winner of a tournament of ``tournament`` random members,
uniformly crossed with a second winner with probability ``crossover_prob``, then mutated:
each layer, with probability ``mutation_prob``, gets a random op and channel scale. Until
the population is full, children are uniform random archs.

It decides the whole arch in ``before_trial`` and answers ``sample_independent`` from it,
so it works with the conditional parameters of ``SearchSpace.suggest``.
"""

from __future__ import annotations

import random
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hwnas.space import SKIP, Arch, SearchSpace


def _feasible(t: FrozenTrial) -> bool:
    return all(v <= 0 for v in t.constraints.values())


class RegularizedEvolutionSampler(BaseSampler):
    def __init__(self, space: SearchSpace, population: int = 20, tournament: int = 5,
                 mutation_prob: float = 0.1, crossover_prob: float = 0.5, seed: int | None = None):
        if tournament > population or tournament < 1:
            raise ValueError("tournament must be between 1 and population")
        self.space, self.population, self.tournament = space, population, tournament
        self.mutation_prob, self.crossover_prob = mutation_prob, crossover_prob
        self.rng = random.Random(seed)
        self._pending: dict[int, dict] = {}

    # Optuna's relative sampling is not used: the arch is decided per trial.
    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return {}

    def _pool(self, study: Study) -> list[tuple[float, Arch]]:
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if _feasible(t) and "arch" in t.user_attrs]
        done = done[-self.population:]
        sign = 1.0 if study.directions[0] == StudyDirection.MAXIMIZE else -1.0
        return [(sign * t.values[0], self.space.parse(t.user_attrs["arch"])) for t in done]

    def _child(self, study: Study) -> Arch:
        pool = self._pool(study)
        if len(pool) < self.population:
            return self.space.sample(self.rng)

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

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._pending[trial.number] = self.space.params_of(self._child(study))

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        params = self._pending.get(trial.number)
        if params is None or param_name not in params:
            return param_distribution.to_external_repr(
                self.rng.randrange(len(param_distribution.choices)))
        return params[param_name]

    def after_trial(self, study, trial, state, values) -> None:
        self._pending.pop(trial.number, None)
