"""bidrop-ds: Bi-Drop fine-tuning (arXiv 2305.14760, as specified in this project) at scale."""

from bidrop_ds.bidrop import BiDrop, StepResult
from bidrop_ds.config import BiDropConfig

__all__ = ["BiDrop", "BiDropConfig", "StepResult"]
__version__ = "0.1.0"
