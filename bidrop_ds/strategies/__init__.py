"""Mask rules on the Bi-Drop machinery: Bi-Drop itself and the systems it is compared against.

Each rule turns the folded passes into the update written for the optimizer (../shared/BIDROP.md):
`bidrop` (and its ablations via `score`), `vanilla`, `childtuning-d`, `childtuning-f`, `dps`.
All work on the rank's own gradient partition; selections are exact and distributed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bidrop_ds.strategies.base import MaskRule, Outcome, Unmasked, agree
from bidrop_ds.strategies.bidrop import BiDropRule
from bidrop_ds.strategies.childtuning import ChildTuningD, ChildTuningF
from bidrop_ds.strategies.dps import Dps

if TYPE_CHECKING:
    from bidrop_ds.bidrop import BiDrop

__all__ = ["BiDropRule", "ChildTuningD", "ChildTuningF", "Dps", "MaskRule", "Outcome", "Unmasked", "agree",
           "make_rule"]


def make_rule(bidrop: "BiDrop") -> MaskRule:
    """The rule `bidrop.config.strategy` names (no mask at all where the config masks nothing)."""
    config = bidrop.config
    if not config.masking:
        return Unmasked(bidrop)
    rules = {"bidrop": BiDropRule, "childtuning-d": ChildTuningD, "childtuning-f": ChildTuningF, "dps": Dps}
    return rules[config.strategy](bidrop)
