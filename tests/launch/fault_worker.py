"""One rank of tests/launch/test_faults.py: the finetune recipe's `main()` with its own --deepspeed and
--dist_timeout handling, but `run` replaced by a few Bi-Drop steps on the tiny BERT (no data or
model loading), in which rank 1 stops dead in the middle of a step.

    python tests/launch/fault_worker.py {kill|stop} TIME_FILE FINETUNE_ARGS...

kill: rank 1 SIGKILLs itself in the second pass of step 2 (its sockets close: a crashed rank).
stop: rank 1 SIGSTOPs itself there (its sockets stay open: a hung or unreachable rank).
Before it does, it writes the time to TIME_FILE. Rank 0 must then report lost contact and exit.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bidrop_ds.recipes import finetune  # noqa: E402
from tests.models import random_batch, tiny_bert  # noqa: E402

FAULT_STEP, FAULT_PASS = 2, 2


def tiny_run(mode: str, time_file: str):
    def run(args, config, ds_config: dict[str, Any], started: float) -> dict[str, Any]:
        import deepspeed

        from bidrop_ds import BiDrop

        model = tiny_bert()
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          config=ds_config)
        bidrop = BiDrop(engine, config=config)
        rank, micro = torch.distributed.get_rank(), engine.train_micro_batch_size_per_gpu()
        for step in range(20):
            passes = iter(range(1, config.k + 1))

            def loss_fn(module, batch, step=step):
                if rank == 1 and step == FAULT_STEP and next(passes) == FAULT_PASS:
                    Path(time_file).write_text(repr(time.time()))
                    os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
                return module(**batch).loss

            bidrop.step([random_batch(10 * step + rank, size=micro)], loss_fn=loss_fn)
        engine.destroy()
        return {}

    return run


if __name__ == "__main__":
    mode, time_file, *argv = sys.argv[1:]
    finetune.run = tiny_run(mode, time_file)
    finetune.main(argv)
