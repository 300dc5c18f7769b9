"""Bi-Drop's math on flat fp32 tensors: statistics, scores, exact global selection, and the
element rules of the comparison strategies.

No torch.distributed here: collectives reach the selection only through a `Communicator`.
"""

from bidrop_ds.core.masks import accumulate_squares_, bernoulli_multiplier_
from bidrop_ds.core.scores import scores_into_m2
from bidrop_ds.core.select import (Communicator, LocalCommunicator, Threshold, global_threshold, group_thresholds,
                                   kept_count)
from bidrop_ds.core.stats import PassStatistics

__all__ = ["Communicator", "accumulate_squares_", "bernoulli_multiplier_", "LocalCommunicator", "PassStatistics", "Threshold", "global_threshold", "group_thresholds",
           "kept_count", "scores_into_m2"]
