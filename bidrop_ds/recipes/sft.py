"""Supervised fine-tuning (SFT) of a decoder LLM with Bi-Drop, on TRL's `SFTTrainer`.

The flags are `trl sft`'s own (TRL's ScriptArguments, SFTConfig, ModelConfig, and a `--config` YAML),
plus the Bi-Drop settings under the names of `BiDropConfig` (`--k`, `--p`, `--strategy`, ...,
`--bidrop_config FILE.json`); only Bi-Drop's `seed` is `--bidrop_seed`, since `--seed` is TRL's. Swap
`trl sft` for this recipe and add the Bi-Drop flags:

    python launch/sft.py --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara \
        --model_init_kwargs '{"attention_dropout": 0.1}' --k 2 --p 0.3 --output_dir qwen-sft
    python launch/sft.py ... --use_peft --lora_r 16 --lora_dropout 0.1 --lora_target_modules q_proj v_proj
    torchrun --nproc_per_node 8 launch/sft.py ... --deepspeed ds_configs/zero3_bf16.json
    (CPU-only machine: the same commands; under DeepSpeed add DS_ACCELERATOR=cpu in front)

Data: `--dataset_name` is a hub data set (offline: from the datasets cache), a local folder of data
files (train.jsonl, validation.jsonl, ...) or one file (json, jsonl, csv, parquet); a `--config` YAML
may list a mixture (`datasets:`), as for `trl sft`. Every format TRL's SFT takes: `text`, `messages`
(or ShareGPT `conversations`), `prompt` + `completion` (standard or conversational), or tokenized
`input_ids`. The evaluation set is `--eval_dataset` (a file, or a split name), else the data set's
`--dataset_test_split` split ("test"), else its "validation" split; after training the recipe reports
its loss and perplexity (`eval_results.json` in --output_dir), besides any `--eval_strategy` runs.

`--output_dir` ends with what `from_pretrained` loads: the model (under ZeRO-3 the 16-bit weights
gathered from the ranks) or, with `--use_peft`, the adapter; and the tokenizer.

On a machine without a GPU the recipe trains in fp32 unless `--bf16` is given (TRL defaults to bf16
and `trl sft` stops there), and sets up gloo for several ranks (torchrun, deepspeed, accelerate launch).
Refused in one line, before any training: a model without dropout (Bi-Drop's k passes would be equal),
and a data set with none of the columns above.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets
import torch
from transformers import AutoConfig
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_dataset
from trl import get_peft_config, get_quantization_config

from bidrop_ds.backends.deepspeed_zero import is_deepspeed_engine
from bidrop_ds.config import BiDropConfig
from bidrop_ds.data.custom import FORMATS, _read_file
from bidrop_ds.integrations.trl import BiDropSFTTrainer
from bidrop_ds.models import dropout_rates, no_dropout_reason
from bidrop_ds.training.dist import free_port, launched_world_size

PROG = "sft.py"
# BiDropConfig fields whose flag is renamed: `--seed` is TRL's (TrainingArguments.seed)
RENAMED = {"seed": "bidrop_seed"}
EXAMPLE_DROPOUT = 0.1  # the value the refusal suggests


class RecipeError(ValueError):
    """A user's mistake the recipe reports in one line (`sft.py: error: ...`)."""


# ----- flags ---------------------------------------------------------------------------------------

def _bidrop_arguments() -> type:
    """A dataclass of BiDropConfig's fields as TrlParser flags (every default None: unset flags leave the
    `--bidrop_config` JSON or the BiDropConfig default in force), plus `bidrop_config`."""
    hints = typing.get_type_hints(BiDropConfig)
    specs: list[tuple[str, Any, Any]] = [("bidrop_config", Optional[str], field(default=None, metadata={
        "help": "Bi-Drop settings as JSON (BiDropConfig keys); the flags below override it"}))]
    for f in fields(BiDropConfig):
        hint = hints[f.name]  # `int | None` -> int; the regex tuples -> list[str] (nargs="+")
        kind = list[str] if hint == tuple[str, ...] else next(
            (t for t in typing.get_args(hint) if t is not type(None)), hint)
        help_text = f"Bi-Drop: {f.metadata['help']}" + ("" if f.name == "k" else f" (default: {f.default})")
        specs.append((RENAMED.get(f.name, f.name), Optional[kind], field(default=None, metadata={"help": help_text})))
    return make_dataclass("BiDropArguments", specs)


BiDropArguments = _bidrop_arguments()


@dataclass
class EvalArguments:
    eval_dataset: Optional[str] = field(default=None, metadata={
        "help": "evaluation rows: a file (json, jsonl, csv, parquet) or a split of --dataset_name; default: its "
                "--dataset_test_split split, else its validation split"})


@dataclass
class RecipeSFTConfig(SFTConfig):
    """TRL's SFTConfig (the same fields and flags) that sets itself up on a machine without a GPU: fp32
    unless bf16 was asked for (TRL's default is bf16, which `trl sft` refuses there), and gloo for the
    ranks; under DeepSpeed a DeepSpeed-flavoured accelerate state on gloo, which the Trainer then reuses
    (its own set-up would start DeepSpeed without a backend)."""

    def __post_init__(self) -> None:
        if not torch.cuda.is_available():
            deepspeed = bool(self.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            if self.bf16 is None:
                self.bf16 = not self.fp16 and _deepspeed_wants_bf16(self.deepspeed)
            if launched_world_size() > 1:  # started by a launcher (torchrun, deepspeed, accelerate launch)
                self.ddp_backend = self.ddp_backend or "gloo"
            if deepspeed:
                _configure_deepspeed_on_cpu()
                self.accelerator_config = {**_as_dict(self.accelerator_config), "use_configured_state": True}
                # the Trainer's bf16 check asks for a GPU unless use_cpu; the configured state keeps DeepSpeed
                self.use_cpu = self.bf16
            else:
                self.use_cpu = True
        super().__post_init__()


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, RecipeSFTConfig, ModelConfig, DatasetMixtureConfig, EvalArguments,
                        BiDropArguments), prog=PROG)
    switches = {RENAMED.get(f.name, f.name) for f in fields(BiDropConfig) if isinstance(f.default, bool)}
    for action in parser._actions:
        if action.dest in switches:  # `--rescale` alone means true, as TRL's own switches (`--packing`)
            action.nargs, action.const = "?", True
    return parser


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        with open(value, encoding="utf-8") as handle:
            return json.load(handle)
    return dict(value) if isinstance(value, dict) else dict(vars(value))


def _deepspeed_wants_bf16(deepspeed: Any) -> bool:
    """Whether a DeepSpeed config (path or dict) sets bf16 on explicitly (the Trainer must then agree)."""
    if not deepspeed:
        return False
    return _as_dict(deepspeed).get("bf16", {}).get("enabled") is True


def _configure_deepspeed_on_cpu() -> None:
    from accelerate import PartialState

    if "RANK" not in os.environ:  # `python sft.py --deepspeed ...` without a launcher: a world of one rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def bidrop_config_from(args: Any) -> BiDropConfig:
    """The BiDropConfig of the parsed Bi-Drop flags (`BiDropConfig.from_args` under the flag names)."""
    values = {f.name: getattr(args, RENAMED.get(f.name, f.name)) for f in fields(BiDropConfig)}
    namespace = argparse.Namespace(bidrop_config=args.bidrop_config, **values)
    try:
        return BiDropConfig.from_args(namespace)
    except (OSError, ValueError) as err:
        raise RecipeError(str(err)) from None


# ----- checks --------------------------------------------------------------------------------------

def check_dropout(model_path: str, model_args: ModelConfig, training_args: SFTConfig, config: BiDropConfig) -> None:
    """Refuse a model whose k passes would be identical: no dropout in its config (after
    --model_init_kwargs) and, with --use_peft, --lora_dropout 0."""
    if config.strategy != "bidrop" or config.k == 1 or config.allow_no_dropout:
        return
    if model_args.use_peft and model_args.lora_dropout > 0:
        return
    model_config = AutoConfig.from_pretrained(model_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    for key, value in (training_args.model_init_kwargs or {}).items():
        if hasattr(model_config, key):
            setattr(model_config, key, value)
    reason = no_dropout_reason(model_config)
    if reason is None:
        return
    key = next(iter(dropout_rates(model_config)))
    raise_it = f"--model_init_kwargs '{{\"{key}\": {EXAMPLE_DROPOUT}}}'"
    lora = ("set --lora_dropout above 0 or raise the model's with " + raise_it if model_args.use_peft
            else f"raise it with {raise_it}, or train LoRA with --use_peft --lora_dropout {EXAMPLE_DROPOUT}")
    lora_zero = ", and --lora_dropout is 0" if model_args.use_peft else ""
    raise RecipeError(f"the model {model_path} has no dropout ({reason}{lora_zero}), so Bi-Drop's k = {config.k} "
                      f"passes would be identical: {lora} (or --allow_no_dropout to run anyway)")


def known_columns(text_field: str) -> tuple[tuple[str, ...], ...]:
    """The column sets SFTTrainer trains on, any one of which a data set must have."""
    return (text_field,), ("messages",), ("conversations",), ("prompt", "completion"), ("input_ids",)


def check_columns(data: datasets.Dataset | datasets.IterableDataset, what: str, text_field: str) -> None:
    columns = list(data.column_names or next(iter(data)).keys())
    if not any(all(name in columns for name in group) for group in known_columns(text_field)):
        wanted = ", ".join(" + ".join(group) for group in known_columns(text_field))
        raise RecipeError(f"the {what} has none of the columns SFT trains on ({wanted}); its columns are "
                          f"{', '.join(columns) or '(none)'} (rename one, or --dataset_text_field COLUMN for text)")


# ----- data ----------------------------------------------------------------------------------------

def _is_data_file(path: str | None) -> bool:
    return bool(path) and Path(path).suffix.lower() in FORMATS and os.path.isfile(path)


def load_data(script_args: ScriptArguments, mixture: DatasetMixtureConfig,
              eval_args: EvalArguments) -> tuple[Any, Any]:
    """(train set, evaluation set or None), loaded as `trl sft` loads them, plus single files."""
    name = script_args.dataset_name
    try:
        if mixture.datasets:
            loaded = get_dataset(mixture)
        elif name is None:
            raise RecipeError("no data: give --dataset_name (a hub data set, a folder of data files, or one file: "
                              f"{', '.join(FORMATS)})")
        elif _is_data_file(name):
            loaded = datasets.DatasetDict({script_args.dataset_train_split: _read_file(name, "--dataset_name")})
        else:
            loaded = datasets.load_dataset(name, name=script_args.dataset_config,
                                           streaming=script_args.dataset_streaming)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        if isinstance(err, RecipeError):
            raise
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        hint = ("; offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) a hub data set loads only from the datasets cache"
                if datasets.config.HF_DATASETS_OFFLINE else "")
        raise RecipeError(f"--dataset_name {name}: cannot load it: {first}{hint}") from None
    described = name or "data set mixture"
    if script_args.dataset_train_split not in loaded:
        raise RecipeError(f"{described} has no {script_args.dataset_train_split!r} split (--dataset_train_split); "
                          f"its splits are {', '.join(loaded)}")
    train = loaded[script_args.dataset_train_split]
    wanted = eval_args.eval_dataset
    if _is_data_file(wanted):
        evaluation = _read_file(wanted, "--eval_dataset")
    elif wanted is not None:
        if wanted not in loaded:
            raise RecipeError(f"--eval_dataset {wanted}: neither a data file ({', '.join(FORMATS)}) nor a split of "
                              f"{described} (its splits are {', '.join(loaded)})")
        evaluation = loaded[wanted]
    else:
        split = next((s for s in (script_args.dataset_test_split, "validation") if s in loaded), None)
        evaluation = loaded[split] if split is not None else None
    return train, evaluation


# ----- the recipe ----------------------------------------------------------------------------------

def parse(argv: Sequence[str] | None) -> tuple[Any, ...]:
    parser = make_parser()
    try:
        return parser.parse_args_and_config(list(sys.argv[1:] if argv is None else argv))
    except ValueError as err:  # a dataclass's own check (SFTConfig, ModelConfig): one line, not a traceback
        raise RecipeError(str(err).strip().splitlines()[0]) from None


def run(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse, check, train, save, evaluate; returns the final evaluation metrics ({} without an eval set)."""
    script_args, training_args, model_args, mixture, eval_args, bidrop_args = parse(argv)
    bidrop_config = bidrop_config_from(bidrop_args)
    model_path = model_args.model_name_or_path
    if model_path is None:
        raise RecipeError("no model: give --model_name_or_path (a hub id or a folder)")
    check_dropout(model_path, model_args, training_args, bidrop_config)
    train, evaluation = load_data(script_args, mixture, eval_args)
    check_columns(train, "train data", training_args.dataset_text_field)
    if evaluation is not None:
        check_columns(evaluation, "evaluation data", training_args.dataset_text_field)

    # as `trl sft` does: the model is built by SFTTrainer from these (under ZeRO-3 inside zero.Init, since
    # SFTConfig registered the DeepSpeed config when it was parsed)
    training_args.model_init_kwargs = {"revision": model_args.model_revision,
                                       "trust_remote_code": training_args.trust_remote_code,
                                       "attn_implementation": model_args.attn_implementation,
                                       "dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
    trainer = BiDropSFTTrainer(model=model_path, args=training_args, train_dataset=train, eval_dataset=evaluation,
                               quantization_config=get_quantization_config(model_args),
                               peft_config=get_peft_config(model_args), bidrop_config=bidrop_config)
    trained = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    gather_final_weights(trainer)
    trainer.save_model(training_args.output_dir)
    trainer.save_metrics("train", trained.metrics)
    trainer.save_state()  # trainer_state.json: the log history, with Bi-Drop's kept fraction per logged step
    metrics: dict[str, float] = {}
    if evaluation is not None:
        metrics = trainer.evaluate()
        loss = metrics["eval_loss"]
        metrics["eval_perplexity"] = math.exp(loss) if loss < 700 else math.inf
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    _finish(trainer)
    return metrics


def gather_final_weights(trainer: BiDropSFTTrainer) -> None:
    """Under ZeRO-3 the final model is saved as 16-bit weights gathered from the partitions (what `from_pretrained`
    loads), even where the DeepSpeed config leaves `stage3_gather_16bit_weights_on_model_save` (accelerate:
    `zero3_save_16bit_model`) off; the checkpoints during training follow the config."""
    engine = trainer.model_wrapped
    if is_deepspeed_engine(engine) and engine.zero_optimization_stage() == 3:
        engine._config.zero_config.gather_16bit_weights_on_model_save = True


def _finish(trainer: BiDropSFTTrainer) -> None:
    """End a run on ranks cleanly (the field notes' order: the engine destroyed, garbage collected, a barrier,
    the group destroyed), so gloo threads never abort the exit."""
    import torch.distributed as dist

    from bidrop_ds.comm import close_process_group

    engine = trainer.model_wrapped
    if is_deepspeed_engine(engine):
        engine.destroy()
    del engine
    trainer.model_wrapped = trainer.deepspeed = trainer.optimizer = trainer.lr_scheduler = None
    if dist.is_available() and dist.is_initialized():
        close_process_group()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """`run`, with a user's mistake ending the process in one line (`sft.py: error: ...`, exit 1)."""
    try:
        return run(argv)
    except RecipeError as err:
        raise SystemExit(f"{PROG}: error: {err}") from None


def cli() -> None:
    """The console script `bidrop-sft`."""
    main()


if __name__ == "__main__":
    cli()
