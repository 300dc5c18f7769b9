"""Oracle checks shared by the sharded-backend tests (DeepSpeed ZeRO on two gloo ranks in
test_deepspeed_zero.py / test_deepspeed_options.py and one CUDA rank in test_deepspeed_zero_gpu.py;
FSDP2 in test_fsdp2.py): the tiny BERT's engine; one Bi-Drop step whose written gradient (and, with
SGD, fp32 master update) is compared with the float64 oracle (tests/oracle.py) of the per-pass
shards the plugin read (`check_step_against_oracle`: the plugin's arithmetic, exact given its
reads); and `lockstep`, a run of several steps beside a reference replica (tests/reference.py) that
computes its own passes and feeds its own optimizer, so that at every step the reads and the fp32
masters are checked independently of the plugin, across a skipped step and a save + resume."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.core import LocalCommunicator
from tests.models import random_batch, split_chunks, tiny_bert
from tests.oracle import oracle_step
from tests.reference import Reference, eligible_layout, held_weights, record_reads

LR = 0.5          # SGD
# AdamW (weight decay 0.01): its state carries across steps. eps 1e-4 (the tiny BERT's gradients
# are ~1e-3 at most): with the default 1e-8 every element kept moves by ~lr whatever its gradient,
# so a 16-bit run's rounding noise on a near-zero gradient would be a whole step of lr either way.
ADAMW_LR = 0.01
MICRO = 4
OPTIMIZERS = {"sgd": lambda params: torch.optim.SGD(params, lr=LR),
              "adamw": lambda params: torch.optim.AdamW(params, lr=ADAMW_LR, weight_decay=0.01, eps=1e-4)}


def ds_config(stage: int, precision: str, chunks: int, world: int, accumulate_fp32: bool = True,
              offload: str | None = None, options: dict | None = None, clipping: float = 0.0) -> dict:
    """Steps of the client optimizer (clipping at `clipping`, 0: none) in `precision` (fp32, bf16
    or fp16); a 16-bit precision accumulates gradients in fp32 unless `accumulate_fp32` is False
    (then in its own dtype). `offload`: "optimizer" (offload_optimizer to cpu) or "all" (and
    offload_param, ZeRO-3), with the client optimizer kept (zero_force_ds_cpu_optimizer false).
    `options`: more `zero_optimization` keys."""
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": chunks,
        "train_batch_size": MICRO * chunks * world,
        "gradient_clipping": clipping,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, **(options or {})},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        # The dynamic scale of ds_configs/ (from 2^16), but hysteresis 1: with DeepSpeed's default 2
        # a first overflow only spends a hysteresis credit; with 1 every overflow halves the scale.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 1,
                          "loss_scale_window": 1000, "min_loss_scale": 1}
    if precision != "fp32":
        config["data_types"] = {"grad_accum_dtype": "fp32" if accumulate_fp32 else precision}
    if offload is not None:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if offload == "all":
            config["zero_optimization"]["offload_param"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def make_engine(stage: int, precision: str, chunks: int, seed: int = 0, accumulate_fp32: bool = True,
                model: torch.nn.Module | None = None, offload: str | None = None, optimizer: str = "sgd",
                options: dict | None = None, clipping: float = 0.0):
    """A DeepSpeed engine (on DeepSpeed's accelerator) over `model` (default: the tiny BERT) with
    `optimizer` (a key of OPTIMIZERS: SGD at LR, AdamW at ADAMW_LR)."""
    import deepspeed

    model = tiny_bert(seed=seed) if model is None else model
    config = ds_config(stage, precision, chunks, dist.get_world_size(), accumulate_fp32, offload, options, clipping)
    engine, *_ = deepspeed.initialize(model=model, optimizer=OPTIMIZERS[optimizer](model.parameters()),
                                      config=config)
    return engine


def _gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, tensor.cpu())
    return torch.cat(pieces)


def check_step_against_oracle(bidrop: BiDrop, chunks: list[dict], config: BiDropConfig,
                              loss_fn=None, lr: float | None = LR) -> tuple[dict, list[torch.Tensor]]:
    """Run one step (`loss_fn`: default the model's own loss), recording each pass's gradient where
    the partition holds it (all fragments, laid one after another) and the gradient written for the
    optimizer, and compare that written gradient with the oracle's update over all ranks' eligible
    elements (ineligible ones: the plain mean); with plain SGD (`lr`; None for another optimizer or
    with clipping) also the fp32 master update with lr x that.

    Ineligible elements are not zeroed between passes where the partition accumulates, so there a
    read holds the sum of the passes so far and a pass is the difference of two reads.
    fp16: the partition holds gradients times the loss scale S in force during the passes, and
    DeepSpeed divides by S before its step, so the recorded passes are divided by S (a power of
    two: exact) before the oracle sees them. A step that Bi-Drop or DeepSpeed skipped (non-finite
    pass, fp16 overflow) is reported in the row and not compared.
    Returns the row and the recorded passes (float64, on the CPU, unscaled).
    """
    backend, stats = bidrop.backend, bidrop.stats
    partition = backend.partition
    engine = getattr(backend, "engine", None)  # None: FSDP2, stepped by the user's optimizer
    scale = backend.grad_scale()
    ds_skipped = engine.skipped_steps if engine is not None else 0
    held = [i for i, f in enumerate(partition.fragments) if f.numel]
    reads, read_dtypes, written = [], set(), []

    def flat_views() -> torch.Tensor:
        views = partition.views()
        read_dtypes.update(views[i].dtype for i in held)
        return torch.cat([views[i].reshape(-1).double().cpu() for i in held]) / scale

    def recording(read, into):
        def read_and_record(*args):
            into.append(flat_views())
            return read(*args)
        return read_and_record

    def masters() -> torch.Tensor:
        views = partition.master_views()
        return torch.cat([views[i].reshape(-1).double().cpu() for i in held])

    # every pass is read once: folded (update), held at the end (hold_last), or retained where it
    # lives (retain_pass, read before the partition hands its storage over); the written gradient
    # is read as the optimizer's step begins
    readers = [(stats, "update", reads), (stats, "hold_last", reads), (backend, "retain_pass", reads),
               (backend, "optimizer_step", written)]
    saved = [owner.__dict__.get(reader) for owner, reader, _ in readers]
    for owner, reader, into in readers:
        setattr(owner, reader, recording(getattr(owner, reader), into))
    before = masters()
    try:
        result = bidrop.step(chunks, loss_fn=loss_fn)
    finally:
        for (owner, reader, _), previous in zip(readers, saved):
            delattr(owner, reader)
            if previous is not None:
                setattr(owner, reader, previous)
    after = masters()
    eligible = torch.cat([torch.full((partition.fragments[i].numel,), partition.fragments[i].eligible)
                          for i in held])
    passes = [read.clone() for read in reads]
    if partition.accumulates:
        for j in range(1, len(passes)):
            passes[j][~eligible] = reads[j][~eligible] - reads[j - 1][~eligible]
    ds_skipped = engine.skipped_steps - ds_skipped if engine is not None else 0
    row = {"bidrop_skipped": result.skipped, "ds_skipped": ds_skipped, "loss_scale": scale}
    row["skipped"] = result.skipped or row["ds_skipped"] > 0
    if row["skipped"]:
        row["masters_unchanged"] = bool(torch.equal(before, after))
        return row, passes
    # The oracle sees every rank's eligible elements at once (a test-only gather), unless every
    # rank holds them all (ZeRO-0 replicates).
    replicated = isinstance(backend.selection_comm, LocalCommunicator)
    gather = (lambda t: t) if replicated else _gather_cat
    oracle = oracle_step([gather(g[eligible]) for g in passes], gather(before[eligible]).abs(), config.p,
                         rescale=config.rescale)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, int(eligible.sum()))
    start = 0 if replicated else sum(counts[:dist.get_rank()])
    mine = slice(start, start + int(eligible.sum()))
    expected = sum(passes) / len(passes)                    # ineligible: the mean
    expected[eligible] = oracle.update[mine]                # eligible: the masked mean
    # With 16-bit accumulation the written gradient is rounded to that dtype: once (the masked mean),
    # or twice (the ineligible mean: the sum of the passes, then divided by k), each by its unit roundoff.
    rounding = max((torch.finfo(d).eps for d in read_dtypes if d.itemsize < 4), default=0.0)
    masked = torch.zeros(eligible.numel(), dtype=torch.bool)
    masked[eligible] = ~oracle.mask[mine]
    # fp32 statistics against float64: relative to the element and to its parameter's scale
    floor = 1e-3 * expected.abs().max().item() + 1e-30
    written_rel = ((written[0] - expected).abs() - rounding * expected.abs()).clamp_min(0) / (expected.abs() + floor)
    row.update({"kept_fraction": result.kept_fraction, "oracle_kept": int(oracle.mask.sum()),
                "oracle_n": oracle.n, "N": oracle.mask.numel(),
                "written_rel_err": written_rel.max().item() if written_rel.numel() else 0.0,
                "masked_written_zero": bool((written[0][masked] == 0).all()),
                "masked_count": int(masked.sum()), "plugin_bytes": plugin_owned_bytes(bidrop),
                "eligible_elements": int(eligible.sum()), "ineligible_elements": int((~eligible).sum()),
                "statistics_bytes": 4 if config.k == 2 and read_dtypes == {torch.float32} else 8,
                "accumulates": partition.accumulates, "retains": getattr(backend, "retains", False)})
    if lr is not None:  # plain SGD: the masters move by lr x the written gradient, masked ones not at all
        moved = before - lr * expected
        rel = ((after - moved).abs() - lr * rounding * expected.abs()).clamp_min(0)
        row.update({"max_rel_err": (rel / (moved.abs() + 1e-3)).max().item(),
                    "masked_unchanged": bool(torch.equal(after[masked], before[masked]))})
    return row, passes


def assert_matches_oracle(row: dict, bound: float) -> None:
    """The checks of a compared step: the written gradient within `bound` of the oracle's (and,
    with SGD, the master update), masked elements written as exact zeros (and, with SGD, unchanged
    bit for bit), n of N kept (ties aside), and the plugin's own memory: 4 bytes per eligible
    element held (k = 2, fp32 gradients; else 8), nothing for ineligible ones where the partition
    sums them itself (else an fp32 sum, 4 bytes each), nothing at all where it retains pass 1
    where it lives."""
    label = f"{row}"
    assert not row["skipped"], label
    assert row["written_rel_err"] <= bound, label
    assert row["masked_written_zero"] and (row["masked_count"] > 0 or row["eligible_elements"] == 0), label
    if "max_rel_err" in row:
        assert row["max_rel_err"] <= bound and row["masked_unchanged"], label
    assert row["kept_fraction"] == row["oracle_kept"] / row["N"], label
    assert row["oracle_kept"] - row["oracle_n"] <= 2, label  # ties aside, n of N
    others = 0 if row["accumulates"] else 4 * row["ineligible_elements"]
    # a partition that retains pass 1 where it lives (ZeRO-2, fp32 accumulators, k = 2): no buffer at all
    statistics = 0 if row["retains"] else row["statistics_bytes"] * row["eligible_elements"]
    assert row["plugin_bytes"] <= statistics + (0 if row["retains"] else others) + 1024, label


def plugin_owned_bytes(bidrop: BiDrop) -> int:
    """Bytes of tensor storage held by the plugin's own objects and by nothing of the engine's or
    the model's (DeepSpeed buffers, FSDP2 shards and grads the plugin only points at do not count)."""
    backend = bidrop.backend
    engine = getattr(backend, "engine", None)
    module, optimizer = (engine.module, engine.optimizer) if engine is not None else (backend.model, backend.optimizer)
    owners = [p for p in module.parameters()] + [p.grad for p in module.parameters() if p.grad is not None]
    owners += _tensors(vars(optimizer), set())
    owners += [t.grad for t in owners if t.grad is not None]  # e.g. ZeRO-Offload's host fp32 gradients
    foreign = {_storage(t).data_ptr() for t in owners}
    seen, owned = set(), 0
    for tensor in _tensors(bidrop, set()):
        storage = _storage(tensor)
        if storage.data_ptr() not in foreign and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            owned += storage.nbytes()
    return owned


def _storage(tensor: torch.Tensor):
    """The storage behind a tensor (a DTensor's: its local shard's)."""
    return getattr(tensor, "to_local", lambda: tensor)().untyped_storage()


def _tensors(obj, visited: set) -> list[torch.Tensor]:
    """Tensors reachable from obj through containers and bidrop_ds objects (not into others)."""
    if id(obj) in visited:
        return []
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        items = obj
    elif type(obj).__module__.startswith("bidrop_ds"):
        items = vars(obj).values() if hasattr(obj, "__dict__") else []
    else:
        return []
    return [t for item in items for t in _tensors(item, visited)]


# ----- several steps beside a reference replica ---------------------------------------------------

def nan_pass(rank: int, chunks: int):
    """A loss function whose pass 2 returns NaN on rank 1 only (a skipped step everywhere)."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = model(**batch).loss
        return loss * float("nan") if rank == 1 and calls["n"] == chunks + 1 else loss
    return loss_fn


def lockstep(rank: int, world_size: int, *, stage: int, precision: str, chunks: int, k: int, optimizer: str,
             steps: int = 4, accumulate_fp32: bool = True, offload: str | None = None,
             options: dict | None = None, clipping: float = 0.0, include: tuple[str, ...] = (),
             nan_at: int | None = None, resume_after: int | None = None, directory: str | None = None,
             label: str = "run", after_step: Callable | None = None) -> list[dict]:
    """`steps` Bi-Drop steps on a DeepSpeed engine beside a Reference (tests/reference.py), one row
    per step: `check_step_against_oracle`'s (the plugin's arithmetic given its reads), and
    read_err (the reads against the reference's own passes), weight_err (this rank's fp32 masters
    against the reference's weights, after the step), mask_hard_differs (elements the oracle of the
    reads and the oracle of the reference's passes select differently, off the threshold's 1e-5
    neighbourhood). The reference takes the oracle update of its own passes, with the mask of the
    reads (the same as its own, as checked, but for elements the rounding may move across the
    threshold: bf16 moves many, and one flip would make the two runs part for good).
    `nan_at`: at that step rank 1's pass 2 is NaN (the run and the reference skip it). `resume_after`:
    after that step, save with bidrop_ds.checkpoint into `directory`, build a fresh engine and
    Bi-Drop, load, and go on (the reference goes on as it was). `after_step(engine, backend)`: a
    further check after every step, its value in the row's "after_step"."""
    from bidrop_ds.checkpoint import load_checkpoint, save_checkpoint

    config = BiDropConfig(k=k, p=0.3, seed=11, **({"include": include} if include else {}))
    # DeepSpeed's fp32 masters start from the 16-bit module's weights: so do the reference's
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    reference = Reference(tiny_bert(seed=0).to(dtype), OPTIMIZERS[optimizer], config, max_grad_norm=clipping or None,
                          compute_dtype=dtype)

    def build() -> tuple[object, BiDrop]:
        engine = make_engine(stage, precision, chunks, accumulate_fp32=accumulate_fp32, offload=offload,
                             optimizer=optimizer, options=options, clipping=clipping)
        return engine, BiDrop(engine, config=config)

    engine, bidrop = build()
    sgd = optimizer == "sgd" and not clipping
    per = "element" if precision == "fp32" else "parameter"
    if type(engine.optimizer).__name__ == "FP16_UnfusedOptimizer":  # ZeRO-0 bf16: see zero_gradient_step
        reference.zero_gradient_step()
    rows = []
    for step in range(steps):
        batch = split_chunks(random_batch(1000 * rank + step, size=MICRO * chunks), chunks)
        with record_reads(bidrop) as reads:
            row, _ = check_step_against_oracle(bidrop, batch, config, lr=LR if sgd else None,
                                               loss_fn=nan_pass(rank, chunks) if step == nan_at else None)
        if row["skipped"]:
            reference.skip()
        else:
            layout = eligible_layout(bidrop.backend)
            passes = reference.pass_gradients(batch, loss_scale=row["loss_scale"])
            row["read_err"] = reference.read_error(reads, layout, passes)
            record = reference.step(passes, mask=reference.mask_of(reads, layout))
            row["mask_differs"], row["mask_hard_differs"] = record.mask_differs, record.mask_hard_differs
            row["clipped"] = bool(clipping) and reference.update_norm > clipping
        row["weight_err"] = reference.weight_error(held_weights(bidrop), per=per)
        if precision != "fp32":  # 16 bits: the next step starts from the run's weights (after this check)
            reference.anchor(held_weights(bidrop))
        if after_step is not None:
            row["after_step"] = after_step(engine, bidrop.backend)
        row.update(label=label, step=step, stage=stage, precision=precision, offload=offload, chunks=chunks, k=k,
                   optimizer=optimizer, clipping=clipping, resumed=False, nan=step == nan_at,
                   skips_counted=bidrop.skipped_steps,
                   eligible_owned=bidrop.backend.numel)
        rows.append(row)
        if step == resume_after:
            save_checkpoint(engine, bidrop, directory, tag=label)
            engine.destroy()
            engine, bidrop = build()
            load_checkpoint(engine, bidrop, directory, tag=label)
            # straight after the load: the fresh engine's masters are the reference's weights
            rows.append({**row, "resumed": True, "weight_err": reference.weight_error(held_weights(bidrop), per=per),
                         "step_index": bidrop.step_index})
    engine.destroy()
    return rows


def lockstep_runs(rank: int, world_size: int, runs: list[dict], directory: str | None = None) -> list[dict]:
    """Several `lockstep` runs in one launch (each a dict of its keyword arguments)."""
    return [row for run in runs for row in lockstep(rank, world_size, directory=directory, **run)]


# Bounds of the checks against the reference (a lost, doubled or stale pass gives ~1). Measured on 2
# gloo ranks, 2026-12-07, over every step of test_deepspeed_zero.py and test_deepspeed_options.py
# (`pytest -s` prints the maxima per precision):
# - fp32: reads within 1e-5 of the reference's passes, relative to the largest (measured <= 9.5e-7);
#   masters within 2e-3 of the reference's weights, element by element, relative to the element's
#   travel (measured <= 1.3e-4, and 5.7e-4 in a variant without clipping: the plugin's fp32 Welford
#   mean and the fp32 AdamW against the reference's float64 mean, on elements whose passes nearly
#   cancel); the two masks equal but for elements within 1e-5 of the threshold (measured: none).
# - 16-bit: the run reduces and accumulates in 16 bits, the reference in fp32 from the same 16-bit
#   pass gradients (same 16-bit weights, same dropout draws; Reference's compute_dtype): reads within
#   3e-2 (bf16's unit roundoff is 3.9e-3; measured <= 1.2e-2; fp16 <= 1.3e-3), masters within 0.1 of
#   the parameter's largest travel (measured <= 5.2e-2, AdamW on near-zero gradients; fp16 <= 5.9e-3),
#   masks of the reads and of the reference's passes differing on at most 1% of the elements
#   (measured <= 7 of 4,448). Near the threshold a bf16 rounding moves elements across it, so the
#   reference applies the mask of the reads (checked against its own) to its own passes, and it
#   starts every step from the run's weights (`anchor`), so that each step is compared on its own
#   rounding, not on the drift of all steps before (one weight rounded to the other bf16 neighbour
#   changes every gradient it touches).
BOUNDS = {"fp32": {"read": 1e-5, "weight": 2e-3, "mask": 0.0},
          "bf16": {"read": 3e-2, "weight": 0.1, "mask": 0.01}}
BOUNDS["fp16"] = BOUNDS["bf16"]


def assert_lockstep(rows: list[dict], min_compared: int = 4) -> None:
    """Every row of a `lockstep` run within BOUNDS, with the checks of `assert_matches_oracle` on
    its compared steps; a skipped step (the NaN one, or an fp16 overflow) left the masters bit for bit;
    at least `min_compared` steps compared per run (fp16: 2, its loss scale may settle first); a
    resume restored the step count and every master."""
    runs: dict[str, int] = {}
    for row in rows:
        bound = BOUNDS[row["precision"]]
        label = f"{row}"
        assert row["weight_err"] <= bound["weight"], label
        if row["resumed"]:
            assert row["step_index"] == row["step"] + 1, label
            continue
        if row["skipped"]:
            assert row["masters_unchanged"], label
            assert row["nan"] or row["precision"] == "fp16", label  # only the NaN step, or an fp16 overflow
            continue
        assert not row["nan"], label
        assert_matches_oracle(row, bound=1e-5)
        assert row["read_err"] <= bound["read"], label
        assert row["mask_hard_differs"] <= bound["mask"] * row["N"], label
        runs[row["label"]] = runs.get(row["label"], 0) + 1
    for label, compared in runs.items():
        fp16 = any(row["precision"] == "fp16" for row in rows if row["label"] == label)
        assert compared >= (2 if fp16 else min_compared), (label, compared)


def lockstep_summary(rows: list[dict]) -> str:
    """Per precision: compared steps, and the largest read, weight and written-gradient errors and
    mask differences (for the bounds above; pytest -s shows it)."""
    lines = []
    for precision in sorted({row["precision"] for row in rows}):
        compared = [row for row in rows if row["precision"] == precision and not row["skipped"] and not row["resumed"]]
        every = [row for row in rows if row["precision"] == precision]
        lines.append(f"{precision}: {len(compared)} steps compared, read_err <= {max(r['read_err'] for r in compared):.2e}, "
                     f"weight_err <= {max(r['weight_err'] for r in every):.2e}, written_rel_err <= "
                     f"{max(r['written_rel_err'] for r in compared):.2e}, mask differences <= "
                     f"{max(r['mask_hard_differs'] for r in compared)} of {compared[0]['N']}")
    return "\n".join(lines)
