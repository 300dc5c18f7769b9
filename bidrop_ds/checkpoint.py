"""Checkpoints of a Bi-Drop run that a killed writer cannot pass off as complete.

`save_checkpoint` writes `<directory>/<tag>/`:
- DeepSpeed engine: through `engine.save_checkpoint` (every rank writes its own ZeRO partition), with
  the plugin's state (`BiDrop.state_dict()`) and the caller's `client_state` in DeepSpeed's client state;
- plain or DDP model: `bidrop_checkpoint.pt` (model, optimizer, optional LR scheduler, plugin state,
  client state), written by rank 0 alone (every rank holds the same replica).

Only when every rank has finished writing (a barrier) does rank 0 add the completion marker
`bidrop_complete.json` (the tag's files and their sizes), atomically (temporary file + os.replace),
and, for DeepSpeed, point DeepSpeed's own `latest` file at the tag. A process killed mid-save leaves
a tag without the marker: `load_checkpoint` refuses it with `IncompleteCheckpointError`, and
`latest_complete_tag` skips it. Re-saving an existing tag first removes its marker. The marker also
holds the world size, the step and the caller's `description` (plain data, e.g. the run's settings),
which `read_marker` returns without loading the checkpoint: a launcher can check them before it
builds anything.

Seeded runs (`BiDropConfig(seed=...)`) resume bit for bit: the passes' dropout draws depend only on
(seed, step_index, pass, rank), and `step_index` is restored. With `seed=None` they come from torch's
global RNG, which is not saved. The directory must be one that every rank sees (a shared filesystem).
FSDP2 models are not supported yet. DeepSpeed ZeRO-1/2 with round_robin_gradients saves and resumes
exactly; loading it through DeepSpeed's universal checkpoints (`"checkpoint": {"load_universal": true}`)
is refused, since DeepSpeed places the masters there through a mapping that ignores round robin.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bidrop_ds.backends.deepspeed_zero import is_deepspeed_engine
from bidrop_ds.backends.fsdp2 import is_fsdp2_model
from bidrop_ds.bidrop import BiDrop
from bidrop_ds.config import BiDropConfig

logger = logging.getLogger(__name__)

MARKER = "bidrop_complete.json"
TORCH_FILE = "bidrop_checkpoint.pt"
DEEPSPEED_LATEST = "latest"  # the file DeepSpeed's own loaders read when no tag is given
STATE_KEY = "bidrop_state"
CLIENT_KEY = "bidrop_client_state"
FORMAT = 1


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint tag without a valid completion marker (its writer died, or files changed since)."""


# ----- markers -------------------------------------------------------------------------------------

def incomplete_reason(directory: str | os.PathLike, tag: str) -> str | None:
    """None if `<directory>/<tag>` is a complete checkpoint, else why not (missing or unreadable
    marker, or a listed file missing or of another size than when it was written)."""
    folder = Path(directory) / tag
    marker = folder / MARKER
    if not folder.is_dir():
        return f"{folder} does not exist"
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        files = info["files"]
    except FileNotFoundError:
        return f"{folder} has no {MARKER}: its writer did not finish (killed mid-save?)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{marker} is unreadable ({err})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is listed in {MARKER} but missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {MARKER} says {size}"
    return None


def read_marker(directory: str | os.PathLike, tag: str) -> dict[str, Any]:
    """The completion marker of a complete tag: format, tag, kind ('deepspeed' or 'torch'),
    world_size, step_index, written_at, files and the `description` given to save_checkpoint (None
    if none was). Raises IncompleteCheckpointError if the tag is not complete."""
    reason = incomplete_reason(directory, tag)
    if reason is not None:
        raise IncompleteCheckpointError(f"read_marker: {reason}")
    return json.loads((Path(directory) / tag / MARKER).read_text(encoding="utf-8"))


def latest_complete_tag(directory: str | os.PathLike) -> str | None:
    """The complete tag of `directory` with the highest Bi-Drop step (latest written on ties); None
    if there is none. Incomplete tags are skipped (logged)."""
    best, best_key = None, None
    root = Path(directory)
    if not root.is_dir():
        return None
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        reason = incomplete_reason(root, folder.name)
        if reason is not None:
            logger.warning("latest_complete_tag: skipping %s: %s", folder.name, reason)
            continue
        info = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        key = (int(info.get("step_index", -1)), float(info.get("written_at", 0.0)))
        if best_key is None or key > best_key:
            best, best_key = folder.name, key
    return best


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one, never a part."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_marker(folder: Path, kind: str, bidrop: BiDrop, world: int, description: Any) -> None:
    """The completion marker: what was written (files and sizes, checked on load), at which step, by
    how many ranks, and the caller's description."""
    files = {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*"))
             if path.is_file() and not path.name.startswith((MARKER, f".{MARKER}.tmp"))}
    info = {"format": FORMAT, "tag": folder.name, "kind": kind, "world_size": world,
            "step_index": bidrop.step_index, "written_at": time.time(), "files": files,
            "description": description}
    _write_atomically(folder / MARKER, json.dumps(info, indent=2) + "\n")


# ----- process group -------------------------------------------------------------------------------

def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def _agreed_tag(directory: Path, tag: str | None) -> str:
    """The tag to load: the given one, or rank 0's latest complete one, the same on every rank."""
    if tag is None:
        found = [latest_complete_tag(directory) if _world()[0] == 0 else None]
        if _world()[1] > 1:
            dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            raise FileNotFoundError(f"load_checkpoint: no complete checkpoint under {directory} (a tag "
                                    f"counts once its {MARKER} is written); pass tag=... or check the directory")
        tag = found[0]
    mine = incomplete_reason(directory, tag)
    reasons = [mine]
    if _world()[1] > 1:  # every rank decides alike, so none enters DeepSpeed's collective load alone
        reasons = [None] * _world()[1]
        dist.all_gather_object(reasons, mine)
    problems = [f"rank {rank}: {reason}" for rank, reason in enumerate(reasons) if reason is not None]
    if problems:
        raise IncompleteCheckpointError(f"load_checkpoint: refusing tag {tag!r}: " + "; ".join(problems)
                                        + ". Load an earlier complete tag (latest_complete_tag(directory) "
                                        "finds one) or delete this one.")
    return tag


# ----- save / load ---------------------------------------------------------------------------------

def save_checkpoint(model: nn.Module, bidrop: BiDrop, directory: str | os.PathLike, tag: str, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    client_state: Mapping[str, Any] | None = None,
                    description: Mapping[str, Any] | None = None) -> Path:
    """Save a complete checkpoint of the run as `<directory>/<tag>/`; call it on every rank.

    `model` is the DeepSpeed engine (which saves its own optimizer and the LR scheduler given to
    `deepspeed.initialize`) or the plain/DDP model with its `optimizer` (and optional `scheduler`).
    `client_state`: plain data of the caller's (epoch, data position, ...), returned by
    `load_checkpoint`. `description`: JSON-able data of rank 0's stored in the marker, which
    `read_marker` returns without loading (e.g. the settings a resume must match). Returns the
    tag's folder.
    """
    kind = _check_arguments("save_checkpoint", model, bidrop, optimizer, scheduler)
    tag = str(tag)
    folder = Path(directory) / tag
    rank, world = _world()
    if rank == 0:  # a stale marker must not vouch for the files about to be overwritten
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).unlink(missing_ok=True)
    _barrier()
    client = dict(client_state or {})
    if kind == "deepspeed":
        model.save_checkpoint(str(directory), tag=tag, save_latest=False,
                              client_state={STATE_KEY: bidrop.state_dict(), CLIENT_KEY: client})
    elif rank == 0:
        module = model.module if isinstance(model, DistributedDataParallel) else model
        state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 STATE_KEY: bidrop.state_dict(), CLIENT_KEY: client}
        torch.save(state, folder / TORCH_FILE)
    _barrier()  # every rank's files are written
    if rank == 0:
        _write_marker(folder, kind, bidrop, world, None if description is None else dict(description))
        if kind == "deepspeed":
            _write_atomically(Path(directory) / DEEPSPEED_LATEST, tag)
    _barrier()  # the marker exists for every rank once save returns
    return folder


def load_checkpoint(model: nn.Module, bidrop: BiDrop, directory: str | os.PathLike, tag: str | None = None, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict[str, Any]:
    """Restore a complete checkpoint (`tag` None: `latest_complete_tag(directory)`) into the model or
    engine, its optimizer (and scheduler) and the plugin; call it on every rank. Returns the
    `client_state` that was saved. A tag without its completion marker raises
    `IncompleteCheckpointError` on every rank.

    DeepSpeed ZeRO-3 cannot load into an engine that has trained or saved (DeepSpeed's own rule):
    build a fresh engine first.
    """
    kind = _check_arguments("load_checkpoint", model, bidrop, optimizer, scheduler)
    directory = Path(directory)
    tag = _agreed_tag(directory, tag)
    if kind == "deepspeed":
        refuse_universal_round_robin("load_checkpoint", model.zero_optimization_stage(),
                                     model.zero_round_robin_gradients(), model.load_universal_checkpoint())
        path, state = model.load_checkpoint(str(directory), tag=tag)
        if path is None or STATE_KEY not in state:
            raise IncompleteCheckpointError(f"load_checkpoint: DeepSpeed found no Bi-Drop checkpoint at "
                                            f"{directory / tag}; was it written by save_checkpoint?")
    else:
        state = torch.load(directory / tag / TORCH_FILE, map_location="cpu", weights_only=True)
        module = model.module if isinstance(model, DistributedDataParallel) else model
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            if state["scheduler"] is None:
                raise ValueError(f"load_checkpoint: {directory / tag} holds no LR scheduler state (none was "
                                 "passed to save_checkpoint); call load_checkpoint without scheduler=")
            scheduler.load_state_dict(state["scheduler"])
    _restore_plugin(bidrop, state[STATE_KEY], directory / tag)
    return dict(state.get(CLIENT_KEY) or {})


def refuse_universal_round_robin(what: str, stage: int, round_robin: bool, load_universal: bool) -> None:
    """DeepSpeed loads a universal checkpoint into ZeRO-1/2 through each parameter's `_hp_mapping`,
    which it links in the unreordered order under round_robin_gradients: the fp32 masters would be
    loaded onto other elements. Refuse that combination by name (regular checkpoints are exact)."""
    if stage in (1, 2) and round_robin and load_universal:
        raise ValueError(f"{what}: DeepSpeed's universal checkpoint loading (\"checkpoint\": {{\"load_universal\": "
                         "true}) with \"round_robin_gradients\": true on ZeRO-1/2 loads the fp32 masters onto other "
                         "elements (DeepSpeed's parameter mapping ignores the round-robin order); resume from a "
                         "regular checkpoint, or train with round_robin_gradients false")


def _check_arguments(what: str, model: nn.Module, bidrop: BiDrop, optimizer: torch.optim.Optimizer | None,
                     scheduler: Any) -> str:
    """'deepspeed' or 'torch'; a combination that cannot be saved or restored raises ValueError."""
    if not isinstance(bidrop, BiDrop):
        raise TypeError(f"{what}: bidrop must be the run's BiDrop object, got {type(bidrop).__name__}")
    if model is not bidrop.model and model is not getattr(bidrop.model, "module", None):
        raise ValueError(f"{what}: model is not the one this BiDrop runs on ({type(bidrop.model).__name__}); "
                         "pass the engine or model that was given to BiDrop(...)")
    if is_deepspeed_engine(model):
        if optimizer is not None or scheduler is not None:
            raise ValueError(f"{what}: the DeepSpeed engine saves its own optimizer and the LR scheduler given to "
                             "deepspeed.initialize(lr_scheduler=...); do not pass optimizer= or scheduler=")
        if model.use_node_local_storage():
            raise ValueError(f"{what}: use_node_local_storage is set in the DeepSpeed config; the completion "
                             "marker needs one directory that every rank sees. Remove the setting.")
        return "deepspeed"
    if is_fsdp2_model(model):
        raise NotImplementedError(f"{what}: FSDP2-sharded models are not supported yet; save them with "
                                  "torch.distributed.checkpoint and keep bidrop.state_dict() beside it")
    if optimizer is None:
        raise ValueError(f"{what}: a plain or DDP model needs its optimizer: {what}(model, bidrop, directory, "
                         "tag, optimizer=optimizer)")
    return "torch"


def _restore_plugin(bidrop: BiDrop, state: Mapping[str, Any], where: Path) -> None:
    """Load the plugin's counters; a checkpoint of another Bi-Drop config is loaded with a warning."""
    saved = state.get("config")
    try:
        same = saved is None or BiDropConfig.from_dict(saved) == bidrop.config
    except (TypeError, ValueError):
        same = False
    if not same:
        logger.warning("load_checkpoint: %s was written with another Bi-Drop config (%s); continuing with %s",
                       where, saved, bidrop.config.to_dict())
    bidrop.load_state_dict(state)
