"""A study's runs of the finetune recipe as subprocesses, side by side and resumable.

Each run is one `python -m bidrop_ds.recipes.finetune` process (or one `torchrun` of N ranks with
--deepspeed) writing its summary JSON to OUT/runs/<run id>.json, its output to OUT/logs/<run id>.log;
a run whose JSON exists is skipped, so an interrupted study resumes where it stopped. Shared by
launch/run_suite.py and launch/regime_study.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

import bidrop_ds
from bidrop_ds.data.custom import DataSource

RECIPE = "bidrop_ds.recipes.finetune"  # the module every run starts
SWITCHES = {"rescale"}  # on/off settings: the variant value "on" gives --NAME, "off" --no-NAME


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of a study."""

    task: str
    strategy: str
    variant: tuple[tuple[str, str], ...]  # swept settings, e.g. (("k", "4"),)
    seed: int

    @property
    def label(self) -> str:
        """The row of the table: the strategy and its swept settings."""
        return self.strategy + "".join(f" {key}={value}" for key, value in self.variant)

    @property
    def run_id(self) -> str:
        suffix = "".join(f"-{key}{value}" for key, value in self.variant)
        return f"{self.task}/{self.strategy}{suffix}/seed{self.seed}"


@dataclass(frozen=True)
class Launch:
    """How every run of a study starts: processes per run (> 1: DeepSpeed ranks under torchrun), runs
    at once, OMP threads per process (None: the cores / (ranks x jobs)), the DeepSpeed config, how
    often the kept fraction per layer is recorded, and the user's data instead of a --task."""

    ranks: int = 1
    jobs: int = 1
    threads: int | None = None
    deepspeed: str | None = None
    log_every: int = 0
    data: DataSource | None = None


def command(run: Run, launch: Launch, extra: list[str], output: Path) -> list[str]:
    """The recipe's command line of one run; `extra`: arguments for every run, last."""
    launcher = [sys.executable]
    if launch.ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(launch.ranks)]
    data = launch.data.to_argv() if launch.data is not None else ["--task", run.task]
    cmd = launcher + ["-m", RECIPE, *data, "--strategy", run.strategy, "--train_seed", str(run.seed),
                      "--seed", str(run.seed), "--log_every", str(launch.log_every), "--output_json", str(output)]
    if launch.deepspeed:
        cmd += ["--deepspeed", launch.deepspeed]
    for name, value in run.variant:
        if name in SWITCHES:
            cmd.append(f"--{name}" if value == "on" else f"--no-{name}")
        else:
            cmd += [f"--{name}", value]
    return cmd + extra


def result_path(out: Path, run: Run) -> Path:
    return out / "runs" / f"{run.run_id}.json"


def execute(runs: list[Run], launch: Launch, extra: list[str], out: Path,
            more: Callable[[], list[Run]] | None = None) -> list[str]:
    """Run what is not finished yet, `launch.jobs` at a time in the planned order; returns the ids
    that failed (their logs say why). `more`, asked at the start and after each run ends, names runs
    that have become ready to go (e.g. a study's later seeds once their learning rate is chosen):
    those not given before join the end of the queue, so no slot waits for the whole list to end."""
    env = dict(os.environ)
    threads = launch.threads or max(1, (os.cpu_count() or 1) // (launch.ranks * launch.jobs))
    # the runs import the same bidrop_ds as this process (a clone's, without installing)
    package_root = str(Path(bidrop_ds.__file__).resolve().parents[1])
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")])))
    if launch.deepspeed:
        env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    todo = [run for run in runs if not result_path(out, run).exists()]
    print(f"run_suite: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to go "
          f"(logs in {out / 'logs'})" + (f", {launch.jobs} at a time" if launch.jobs > 1 else ""), flush=True)
    failed: list[str] = []
    running: list[tuple[Run, subprocess.Popen, float]] = []
    bar = tqdm(total=len(todo), desc="runs", unit="run", dynamic_ncols=True, position=0)
    pending, given = list(todo), set(runs)
    ready = True  # ask `more` now and after each run ends
    while True:
        if more is not None and ready:
            joined = [run for run in dict.fromkeys(more()) if run not in given and not result_path(out, run).exists()]
            given.update(joined)
            pending += joined
            if joined:
                bar.total += len(joined)
                tqdm.write(f"run_suite: {len(joined)} more runs ready, {len(pending)} waiting")
        while len(running) < launch.jobs and pending:
            run = pending.pop(0)
            running.append((run, _start(run, launch, extra, out, env), time.perf_counter()))
            bar.set_postfix_str(", ".join(r.run_id for r, _, _ in running))
        if not running:
            break
        finished = [entry for entry in running if entry[1].poll() is not None]
        ready = bool(finished)
        if not finished:
            time.sleep(1.0)
        for entry in finished:
            running.remove(entry)
            run, process, started = entry
            _finish(run, process.returncode, out, time.perf_counter() - started, failed)
            bar.update(1)
    bar.close()
    return failed


def _start(run: Run, launch: Launch, extra: list[str], out: Path, env: dict) -> subprocess.Popen:
    """Launch one run with its stdout in its log (and its progress too when runs go side by side)."""
    output, log = result_path(out, run), out / "logs" / f"{run.run_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as handle:  # the child keeps its own descriptor
        return subprocess.Popen(command(run, launch, extra, output.with_suffix(".partial.json")), stdout=handle,
                                stderr=handle if launch.jobs > 1 else None, env=env)


def _finish(run: Run, code: int, out: Path, seconds: float, failed: list[str]) -> None:
    output = result_path(out, run)
    partial = output.with_suffix(".partial.json")
    if code == 0 and partial.exists():
        partial.replace(output)  # only a finished run leaves its JSON: a rerun skips it
        summary = json.loads(output.read_text(encoding="utf-8"))
        metric = summary.get("headline_metric", "")
        tqdm.write(f"done {run.run_id}: {metric}={summary.get(metric, math.nan):.4f} in {seconds:.0f}s")
    else:
        failed.append(run.run_id)
        tqdm.write(f"FAILED {run.run_id} (exit {code}); see {out / 'logs' / f'{run.run_id}.log'}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def finish(script: str, report: str, failed: list[str]) -> int:
    """Print the report; the exit code: 1 if a run failed (named on stderr), else 0."""
    print(report, flush=True)
    if failed:
        print(f"{script}: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
