"""Oracle checks shared by the sharded-backend tests (DeepSpeed ZeRO on two gloo ranks in
test_deepspeed_zero.py and one CUDA rank in test_deepspeed_zero_gpu.py; FSDP2 in test_fsdp2.py):
the tiny BERT's engine, and one Bi-Drop step whose fp32 master update is compared with the float64
oracle (tests/oracle.py) computed from the very per-pass shards the plugin read."""

from __future__ import annotations

import torch
import torch.distributed as dist

from bidrop_ds import BiDrop, BiDropConfig
from bidrop_ds.bidrop import derive_seed
from bidrop_ds.core import LocalCommunicator
from tests.models import tiny_bert
from tests.oracle import oracle_step

LR = 0.5
MICRO = 4


def ds_config(stage: int, precision: str, chunks: int, world: int, accumulate_fp32: bool = True,
              offload: str | None = None) -> dict:
    """Plain SGD steps (no clipping) in `precision` (fp32, bf16 or fp16); a 16-bit precision
    accumulates gradients in fp32 unless `accumulate_fp32` is False (then in its own dtype).
    `offload`: "optimizer" (offload_optimizer to cpu) or "all" (and offload_param, ZeRO-3), with
    the client SGD kept (zero_force_ds_cpu_optimizer false)."""
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": chunks,
        "train_batch_size": MICRO * chunks * world,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
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
                model: torch.nn.Module | None = None, offload: str | None = None):
    """A DeepSpeed engine (on DeepSpeed's accelerator) over `model` (default: the tiny BERT) with SGD at LR."""
    import deepspeed

    model = tiny_bert(seed=seed) if model is None else model
    config = ds_config(stage, precision, chunks, dist.get_world_size(), accumulate_fp32, offload)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=config)
    return engine


def _gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, tensor.cpu())
    return torch.cat(pieces)


def check_step_against_oracle(bidrop: BiDrop, chunks: list[dict], config: BiDropConfig,
                              loss_fn=None) -> tuple[dict, list[torch.Tensor]]:
    """Run one step (`loss_fn`: default the model's own loss), recording each pass's gradient where
    the partition holds it (all fragments, laid one after another), and compare the fp32 master
    update with LR x the oracle's update over all ranks' eligible elements (ineligible ones: LR x
    the plain mean).

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
    reads, read_dtypes = [], set()

    def recording(read):
        def read_and_record(*args):
            views = partition.views()
            read_dtypes.update(views[i].dtype for i in held)
            reads.append(torch.cat([views[i].reshape(-1).double().cpu() for i in held]) / scale)
            return read(*args)
        return read_and_record

    def masters() -> torch.Tensor:
        views = partition.master_views()
        return torch.cat([views[i].reshape(-1).double().cpu() for i in held])

    # every pass is read once: folded (update), held at the end (hold_last), or retained where it
    # lives (retain_pass, read before the partition hands its storage over)
    readers = [(stats, "update"), (stats, "hold_last"), (backend, "retain_pass")]
    for owner, reader in readers:
        setattr(owner, reader, recording(getattr(owner, reader)))
    before = masters()
    result = bidrop.step(chunks, loss_fn=loss_fn)
    for owner, reader in readers:
        delattr(owner, reader)
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
    moved = before - LR * expected
    # With 16-bit accumulation the written gradient is rounded once to that dtype (its unit roundoff).
    rounding = max((torch.finfo(d).eps / 2 for d in read_dtypes if d.itemsize < 4), default=0.0)
    rel = ((after - moved).abs() - LR * rounding * expected.abs()).clamp_min(0)
    masked = torch.zeros(eligible.numel(), dtype=torch.bool)
    masked[eligible] = ~oracle.mask[mine]
    row.update({"kept_fraction": result.kept_fraction, "oracle_kept": int(oracle.mask.sum()),
                "oracle_n": oracle.n, "N": oracle.mask.numel(),
                "max_rel_err": (rel / (moved.abs() + 1e-3)).max().item(),
                "masked_unchanged": bool(torch.equal(after[masked], before[masked])),
                "masked_count": int(masked.sum()), "plugin_bytes": plugin_owned_bytes(bidrop),
                "eligible_elements": int(eligible.sum()), "ineligible_elements": int((~eligible).sum()),
                "statistics_bytes": 4 if config.k == 2 and read_dtypes == {torch.float32} else 8,
                "accumulates": partition.accumulates, "retains": getattr(backend, "retains", False)})
    return row, passes


def assert_matches_oracle(row: dict, bound: float) -> None:
    """The checks of a compared step: master update within `bound` of the oracle's, masked
    elements bit-identical, n of N kept (ties aside), and the plugin's own memory: 4 bytes per
    eligible element held (k = 2, fp32 gradients; else 8), nothing for ineligible ones where the
    partition sums them itself (else an fp32 sum, 4 bytes each), nothing at all where it retains
    pass 1 where it lives."""
    label = f"{row}"
    assert not row["skipped"], label
    assert row["max_rel_err"] <= bound, label
    assert row["masked_unchanged"] and (row["masked_count"] > 0 or row["eligible_elements"] == 0), label
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


def reference_pass_error(passes: list[torch.Tensor], fragments, chunks: list[dict], config: BiDropConfig) -> float:
    """Max abs difference between the passes recorded at step 0 (every fragment held, laid one
    after another) and the same slices of a DDP reference's rank-averaged gradients (same initial
    weights, same dropout seeds)."""
    reference = torch.nn.parallel.DistributedDataParallel(tiny_bert(seed=0))
    named = dict(reference.module.named_parameters())
    held = [frag for frag in fragments if frag.numel]
    worst = 0.0
    for j, read in enumerate(passes):
        reference.zero_grad(set_to_none=True)
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(config.seed, 0, j, dist.get_rank()))
            for chunk in chunks:
                (reference(**chunk).loss / len(chunks)).backward()
        offset = 0
        for frag in held:
            ref = named[frag.name].grad.reshape(-1)[frag.start:frag.start + frag.numel].double()
            worst = max(worst, (read[offset:offset + frag.numel] - ref).abs().max().item(), 0.0)
            offset += frag.numel
    return worst
