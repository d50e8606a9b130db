"""Anchor configurations enqueued first in every new study.

Each strategy declares its anchors (`Strategy.anchors`): its technique alone at a setting
known to work reasonably. Evaluating them first puts the single techniques on the front
from the start, so the joint search's front is never worse than what any one of them gives,
and the sampler starts from sensible points instead of only random ones. Every parameter an
anchor does not set takes its declared `off` value, where the space admits it.
"""

from __future__ import annotations

from typing import Any, Sequence

import optuna

from strategies.base import Strategy
from strategies.space import TOP, Param


def off_params(strategies: Sequence[Strategy]) -> dict[str, Any]:
    """Every parameter's "off" value that its configured range admits: the techniques off."""
    space = {key: param for s in strategies for key, param in s.space.items()}
    return {key: p.off for key, p in space.items() if p.off is not None and p.admits(p.off)}


def anchor_params(strategies: Sequence[Strategy]) -> dict[str, dict[str, Any]]:
    """The anchors this search space can express, by rank, as full parameter assignments.

    An anchor is skipped when a value that defines it lies outside the configured space, or
    when it repeats an earlier one; an "off" value outside the space is left to the sampler.
    """
    space: dict[str, Param] = {key: param for s in strategies for key, param in s.space.items()}
    off = off_params(strategies)
    anchors: dict[str, dict[str, Any]] = {}
    for anchor in sorted((a for s in strategies for a in s.anchors), key=lambda a: a.rank):
        params = dict(off)
        for key, value in anchor.params.items():
            param = space.get(key)
            value = param.values()[-1] if param is not None and value is TOP else value
            if param is None or not param.admits(value):
                break
            params[key] = value
        else:
            if params not in anchors.values():  # the narrowest student may be the half-width one
                anchors[anchor.name] = params
    return anchors


def enqueue_anchors(study: optuna.Study, strategies: Sequence[Strategy]) -> list[str]:
    """Enqueue every expressible anchor into a study that has no trials yet."""
    if study.trials:
        return []
    anchors = anchor_params(strategies)
    for name, params in anchors.items():
        study.enqueue_trial(params, user_attrs={"anchor": name})
    return list(anchors)
