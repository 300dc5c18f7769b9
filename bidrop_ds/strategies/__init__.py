"""Mask rules on the Bi-Drop machinery: Bi-Drop itself and the systems it is compared against.

Each rule turns the folded passes into the update written for the optimizer (../shared/BIDROP.md):
`bidrop` (and its ablations via `score`), `vanilla`, `childtuning-d`, `childtuning-f`, `dps`.
All work on the rank's own gradient partition; selections are exact and distributed. A rule sees
only a `RuleContext` (statistics, weights, parameter ranges, communicators, config, generator).
"""

from __future__ import annotations

from bidrop_ds.strategies.base import MaskRule, Outcome, RuleContext, Unmasked
from bidrop_ds.strategies.bidrop import BiDropRule
from bidrop_ds.strategies.childtuning import ChildTuningD, ChildTuningF
from bidrop_ds.strategies.dps import Dps

__all__ = ["BiDropRule", "ChildTuningD", "ChildTuningF", "Dps", "MaskRule", "Outcome", "RuleContext", "Unmasked",
           "make_rule"]


def make_rule(context: RuleContext) -> MaskRule:
    """The rule `context.config.strategy` names (no mask at all where the config masks nothing)."""
    config = context.config
    if not config.masking:
        return Unmasked(context)
    rules = {"bidrop": BiDropRule, "childtuning-d": ChildTuningD, "childtuning-f": ChildTuningF, "dps": Dps}
    return rules[config.strategy](context)
