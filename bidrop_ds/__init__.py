"""bidrop-ds: Bi-Drop fine-tuning (arXiv 2305.14760, as specified in this project) at scale."""

from bidrop_ds.bidrop import BiDrop, StepResult
from bidrop_ds.config import BiDropConfig

__all__ = ["BiDrop", "BiDropConfig", "StepResult"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`BiDropTrainer` / `BiDropTrainerMixin`, imported on first use (they import transformers.Trainer)."""
    if name in ("BiDropTrainer", "BiDropTrainerMixin"):
        from bidrop_ds.integrations import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
