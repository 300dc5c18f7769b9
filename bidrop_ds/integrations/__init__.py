"""Integrations with training frameworks. Imported lazily, so that `import bidrop_ds` does not import them.

- `bidrop_ds.integrations.hf_trainer`: `BiDropTrainer`, `BiDropTrainerMixin` (Hugging Face Trainer).
- `bidrop_ds.integrations.accelerate`: `bidrop_for` (a BiDrop after `accelerator.prepare`).
- `bidrop_ds.integrations.trl`: `BiDropSFTTrainer`, `BiDropRewardTrainer` (TRL; needs the `llm` extra).
"""

from __future__ import annotations

from typing import Any

_LAZY = {"BiDropTrainer": "bidrop_ds.integrations.hf_trainer",
         "BiDropTrainerMixin": "bidrop_ds.integrations.hf_trainer",
         "bidrop_for": "bidrop_ds.integrations.accelerate",
         "BiDropSFTTrainer": "bidrop_ds.integrations.trl",
         "BiDropRewardTrainer": "bidrop_ds.integrations.trl"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
