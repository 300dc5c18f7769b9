"""Where Bi-Drop helps: training long enough for vanilla fine-tuning to overfit (issue 14).

One command per table; every run is a finetune run as launch/run_suite.py starts them
(`bidrop_ds.training.suite`; resumable: finished runs are kept in OUT/runs and skipped), with a dev
split (`--dev_size`) evaluated after every epoch:

    python launch/regime_study.py --table strategies --out results/regime
    python launch/regime_study.py --table sensitivity --out results/regime

- `strategies`: each task of TASKS x vanilla, bidrop k=2, bidrop k=4, childtuning-d, dps at
  --epochs E, plus vanilla at 2E and 4E epochs (equal compute: a Bi-Drop step costs k passes).
- `sensitivity`: bidrop k=2 on SENSITIVITY_TASK, p in {0.1, 0.3, 0.5, 0.7} x rescale off/on (the
  default arm, p=0.3 without rescale, is the strategies table's bidrop k=2: same runs).
- Learning rate: every arm runs at each of --lrs (default 2e-5, 5e-5, 1e-4); the arm's rate is the
  one with the highest mean over seeds of the dev score at each run's best-dev epoch. Nothing
  held-out takes part in the choice. `--lr_seeds N` chooses it on the first N seeds only, whose runs
  go first; an arm's other seeds then run at its chosen rate alone, queued as soon as its own
  tuning runs have all finished (fewer runs: 2 of 5 seeds tuning make 27 runs of the 45 of a 3-arm
  table).
- Score: the held-out headline metric at the run's best-dev epoch (`at_best_dev_epoch`); the same
  comparisons at the last epoch follow as rows whose setting ends in ", last epoch".
- Paired seeds: seed s gives every arm the same head initialisation and batch order (each run
  gets --train_seed s and --seed s), so arm - vanilla is a per-seed difference. OUT/paired.csv
  (the strategies table; OUT/<table>_paired.csv for each table) holds, per (task, strategy,
  setting), n, the mean difference, its 95% t-interval and the number of seeds it wins, x 100,
  then the paired t-test's two-sided p and `p_holm`, that p Holm-adjusted over every row of the
  same task in the table (all its arms, baselines, held-out sets and both epochs).
  Bi-Drop's k=K rows are paired with vanilla at E epochs and, as `equal compute`, with vanilla at
  K x E epochs.
- OUT/<table>.md: the command, per arm its chosen lr, held-out and dev scores and, as the
  overfitting evidence, its last-epoch train loss and dev score (against the best-dev one), then
  the paired rows; OUT/<table>_curves.png: mean dev curves of vanilla and the Bi-Drop arms.
  Every run evaluates its held-out sets at the end only (finetune.py --held_out_at end: the same
  numbers as evaluating them at each new best dev epoch, fewer evaluations). Arguments after `--` go
  to every finetune.py run. A command for a part of a table (`--tasks`, `--strategies`, `--ks`,
  `--rescales`) runs that part only, but its tables cover every finished run of the table under OUT
  (at --lrs and --seeds). The full strategies table is 4 tasks x 7 arms x 3 learning rates x 5 seeds
  = 420 runs: hours of CPU (MiniLM, max length 64, batch 16).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bidrop_ds.training import suite  # noqa: E402  (runs, commands, resumable execution)

LRS = ("2e-5", "5e-5", "1e-4")
# task -> its finetune.py sizes: the train examples (0: the whole train split) and the dev rows carved off it
TASKS: dict[str, dict[str, str]] = {
    "vader-movie-lowres-250": {"train_size": "0", "dev_size": "50"},
    "vader-movie-lowres-1000": {"train_size": "0", "dev_size": "100"},
    "vader-transfer": {"train_size": "500", "dev_size": "100"},
    "vader-movie-imbalanced": {"train_size": "1000", "dev_size": "100"},  # a low-resource subset, 1:4 kept
}
# the sweep's task: the smallest, whose vanilla and default Bi-Drop runs the strategies table already holds
SENSITIVITY_TASK = "vader-movie-lowres-250"
TABLE_TASKS = {"strategies": list(TASKS), "sensitivity": [SENSITIVITY_TASK]}
SENSITIVITY_PS = ("0.1", "0.3", "0.5", "0.7")
DEFAULTS = {"p": "0.3", "rescale": "off"}  # BiDropConfig's: an arm at them is the strategies table's bidrop k=2
BIDROP_KS = (2, 4)
STUDIED = ("vanilla", "bidrop", "childtuning-d", "dps")  # the strategies table's strategies
# every run's batch (the budget: MiniLM, max length 64 - finetune.py's default -, batch 16)
COMMON = {"batch_size": "16"}
# the t quantile t_{0.975, df} for the 95% interval (df >= 31: the normal 1.96, at most 2% narrower)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


@dataclass(frozen=True)
class Arm:
    """One compared configuration of a task: a strategy, its settings (finetune.py flags) and a label."""

    strategy: str
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return " ".join([self.strategy, *(f"{key}={value}" for key, value in self.settings)])


def arms(table: str, epochs: int, ks: Sequence[int] = BIDROP_KS,
         strategies: Sequence[str] = STUDIED, rescales: Sequence[str] = ("off", "on")) -> list[Arm]:
    """The arms of a table; the first is the vanilla baseline at `epochs` epochs. The strategies table
    runs Bi-Drop at each of `ks` (and vanilla at k x `epochs`, its equal compute) and the other
    `strategies` once each; the sensitivity table each p of SENSITIVITY_PS at each of `rescales`."""
    if table == "sensitivity":  # settings at their default are left out, so the default arm shares its runs
        return [Arm("vanilla"), *(Arm("bidrop", (("k", "2"), *((name, value) for name, value in
                                                              (("p", p), ("rescale", rescale))
                                                              if DEFAULTS[name] != value)))
                                  for p in SENSITIVITY_PS for rescale in rescales)]
    listed = [Arm("vanilla"), *(Arm("vanilla", (("epochs", str(k * epochs)),)) for k in ks),
              *(Arm("bidrop", (("k", str(k)),)) for k in ks), Arm("childtuning-d"), Arm("dps")]
    return [arm for arm in listed if arm == Arm("vanilla") or arm.strategy in strategies]

def plan(tasks: Sequence[str], arm_list: Sequence[Arm], lrs: Sequence[str], seeds: Sequence[int],
         epochs: int) -> dict[suite.Run, tuple[str, Arm, str]]:
    """{run: (task, arm, lr)} for every seed x task x arm x lr, seed by seed (an interrupted study has
    whole seeds of every arm to pair); an arm's own epochs override `epochs`."""
    runs = {}
    for seed in seeds:
        for task in tasks:
            for arm in arm_list:
                settings = {"epochs": str(epochs), **COMMON, **TASKS[task], **dict(arm.settings)}
                for lr in lrs:
                    variant = tuple(sorted({**settings, "lr": lr}.items()))
                    runs[suite.Run(task, arm.strategy, variant, seed)] = (task, arm, lr)
    return runs

def dev_score(summary: dict[str, Any]) -> float:
    """The dev headline metric at the run's best-dev epoch."""
    row = summary["epoch_history"][summary["best_dev_epoch"] - 1]
    return row[f"dev_{summary['headline_metric']}"]


def held_out_score(summary: dict[str, Any], at: str = "best_dev", held_out: str | None = None) -> float:
    """The headline metric on a held-out set (None: the first, the task's headline set) at the run's
    best-dev epoch (`at="last"`: at its last epoch)."""
    scores = summary if at == "last" else summary["at_best_dev_epoch"]
    prefix = "" if held_out in (None, held_out_sets(summary)[0]) else f"{held_out}_"
    return scores[prefix + summary["headline_metric"]]


def held_out_sets(summary: dict[str, Any]) -> list[str | None]:
    """The held-out sets of a run, the headline one first (None for a summary that names none)."""
    return list(summary.get("eval_sets", {None: 0}))


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean (NaN bounds for fewer than 2 values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    df = len(values) - 1
    half = (T975[df - 1] if df <= len(T975) else 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def t_test_p(values: Sequence[float]) -> float:
    """Two-sided p of the one-sample t-test of mean 0 (the paired test of per-seed differences); NaN
    for fewer than 2 values. p = I_x(df/2, 1/2) with x = df / (df + t^2), the t distribution's tail."""
    if len(values) < 2:
        return math.nan
    mean, spread = statistics.fmean(values), statistics.stdev(values)
    if spread == 0:
        return 1.0 if mean == 0 else 0.0
    df = len(values) - 1
    t = mean / (spread / math.sqrt(len(values)))
    return _regularized_beta(df / 2, 0.5, df / (df + t * t))


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), through the symmetry I_x(a, b) = 1 -
    I_(1-x)(b, a) where the fraction converges slowly. For the t tails above it agrees with the closed
    forms of df 1, 2 and 4 to 2e-11 relative for t in [0.1, 30]."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _regularized_beta(b, a, 1.0 - x)
    tiny = 1e-300
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    value, c, d = 1.0, 1.0, 0.0
    for term in range(400):
        half = term // 2
        if term == 0:
            numerator = 1.0
        elif term % 2:
            numerator = -(a + half) * (a + b + half) * x / ((a + 2 * half) * (a + 2 * half + 1))
        else:
            numerator = half * (b - half) * x / ((a + 2 * half - 1) * (a + 2 * half))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        value *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (value - 1.0)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN entries stay NaN
    and do not count in the family."""
    order = sorted((i for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda i: p_values[i])
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def with_holm(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`p_holm` on each paired row: Holm over the rows of the same task in the table (its every arm,
    baseline, held-out set and epoch), so "p_holm < 0.05" survives all of that task's comparisons."""
    family = [row["task"].split(" / ")[0] for row in rows]
    for task in dict.fromkeys(family):
        members = [row for row, name in zip(rows, family) if name == task]
        for row, adjusted in zip(members, holm([row["p"] for row in members])):
            row["p_holm"] = round(adjusted, 4)
    return rows


def chosen(summaries: dict[tuple[str, Arm, str], dict[int, dict]], planned: dict[suite.Run, tuple[str, Arm, str]],
           tuning: Sequence[int] | None = None,
           settled_only: bool = False) -> dict[tuple[str, Arm], tuple[str, dict[int, dict]]]:
    """{(task, arm): (its lr, {seed: summary})}: the lr with the best mean dev score over the tuning
    seeds (None: every seed) that every planned lr of the arm has finished, the first of --lrs on a
    tie; with every seed tuning, the seeds so compared, else every seed finished at that lr. Arms
    with no such seed are absent; with `settled_only`, so are arms whose tuning seeds have not all
    finished every lr (their choice may still change)."""
    finished: dict[tuple[str, Arm], set[int]] = {}
    for task, arm, lr in set(planned.values()):
        done = {seed for seed in summaries.get((task, arm, lr), {}) if tuning is None or seed in tuning}
        finished[task, arm] = finished.get((task, arm), done) & done
    best: dict[tuple[str, Arm], tuple[float, str, dict[int, dict]]] = {}
    for (task, arm, lr), by_seed in summaries.items():
        seeds = sorted(finished.get((task, arm), ()))
        if not seeds or (settled_only and tuning is not None and set(seeds) != set(tuning)):
            continue
        # rounded: dev scores are counts over the dev size, so equal sums must tie, whatever the float order
        score = round(statistics.fmean(dev_score(by_seed[seed]) for seed in seeds), 9)
        if (task, arm) not in best or score > best[task, arm][0]:
            best[task, arm] = (score, lr, {seed: by_seed[seed] for seed in seeds} if tuning is None else by_seed)
    return {key: (lr, by_seed) for key, (_, lr, by_seed) in best.items()}


def remaining_runs(runs: dict[suite.Run, tuple[str, Arm, str]], out: Path,
                   tuning: Sequence[int]) -> list[suite.Run]:
    """The runs of the seeds outside `tuning`, each arm at the lr its tuning seeds chose (arms whose
    tuning runs are not all finished, e.g. one failed, have none yet)."""
    tuned = {run: key for run, key in runs.items() if run.seed in tuning}
    picked = chosen(collect(tuned, out), tuned, tuning, settled_only=True)
    return [run for run, (task, arm, lr) in runs.items()
            if run.seed not in tuning and (task, arm) in picked and picked[task, arm][0] == lr]

def paired_rows(picked: dict[tuple[str, Arm], tuple[str, dict[int, dict]]], epochs: int,
                at: str = "best_dev") -> list[dict[str, Any]]:
    """One row per (task, non-baseline arm, baseline): each arm against vanilla and, for Bi-Drop, also
    against vanilla at k x `epochs` (`equal compute`) and, for a swept p or rescale, against Bi-Drop
    k at its defaults (`defaults`) and, with rescale on at another p, against that p without it
    (`rescale off`), where the table has them: the per-seed held-out differences x 100
    over the seeds both finished, at each run's best-dev epoch (`at="last"`: at the last epoch, the
    setting then ending in ", last epoch"). A task with several held-out sets (vader-transfer: the
    in-domain one, then other domains) gets the rows of each further set as task `TASK / SET`."""
    rows = []
    for (task, arm), (lr, by_seed) in picked.items():
        if arm == Arm("vanilla"):
            continue
        baselines = [("", Arm("vanilla"))]
        k = dict(arm.settings).get("k")
        if arm.strategy == "bidrop" and k:  # vanilla given k x the epochs, if the table has it
            baselines.append(("equal compute", Arm("vanilla", (("epochs", str(int(k) * epochs)),))))
        if arm.strategy == "bidrop" and set(dict(arm.settings)) - {"k"}:  # a swept p / rescale: vs the defaults
            baselines.append(("defaults", Arm("bidrop", (("k", k),))))
            without = Arm("bidrop", tuple(item for item in arm.settings if item != ("rescale", "on")))
            if without not in (arm, baselines[-1][1]):  # rescale on at a swept p: vs the same p without it
                baselines.append(("rescale off", without))
        for note, baseline in baselines:
            if (task, baseline) not in picked:
                continue
            base = picked[task, baseline][1]
            seeds = sorted(set(by_seed) & set(base))
            if not seeds:
                continue
            setting = " ".join(f"{key}={value}" for key, value in arm.settings) or "-"
            setting += f" ({note}: vs {baseline.label})" if note else ""
            setting += ", last epoch" if at == "last" else ""
            for position, held_out in enumerate(held_out_sets(by_seed[seeds[0]])):
                diffs = [100 * (held_out_score(by_seed[s], at, held_out) - held_out_score(base[s], at, held_out))
                         for s in seeds]
                mean, low, high = t_interval(diffs)
                rows.append({"task": f"{task} / {held_out}" if position else task, "strategy": arm.strategy,
                             "setting": setting, "n": len(seeds), "mean_diff": round(mean, 3),
                             "ci_low": round(low, 3), "ci_high": round(high, 3), "wins": sum(d > 0 for d in diffs),
                             "p": round(t_test_p(diffs), 4)})
    return rows


def collect(runs: dict[suite.Run, tuple[str, Arm, str]], out: Path) -> dict[tuple[str, Arm, str], dict[int, dict]]:
    """{(task, arm, lr): {seed: summary}} of the finished runs."""
    found: dict[tuple[str, Arm, str], dict[int, dict]] = {}
    for run, key in runs.items():
        path = suite.result_path(out, run)
        if path.exists():
            found.setdefault(key, {})[run.seed] = json.loads(path.read_text(encoding="utf-8"))
    return found


def report(runs: dict[suite.Run, tuple[str, Arm, str]], out: Path, table: str, epochs: int,
           command_line: str, tuning: Sequence[int] | None = None) -> str:
    """Write OUT/<table>_paired.csv (and OUT/paired.csv for the strategies table), OUT/<table>.md and
    the dev curves; return the markdown. `tuning`: the seeds the lr is chosen on (None: all)."""
    summaries = collect(runs, out)
    picked = chosen(summaries, runs, tuning)
    settled = chosen(summaries, runs, tuning, settled_only=True)
    if not picked:
        return "regime_study: no finished run to report\n"
    paired = with_holm(paired_rows(picked, epochs) + paired_rows(picked, epochs, at="last"))
    for name in ([f"{table}_paired.csv"] + (["paired.csv"] if table == "strategies" else [])):
        with open(out / name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["task", "strategy", "setting", "n", "mean_diff", "ci_low",
                                                        "ci_high", "wins", "p", "p_holm"])
            writer.writeheader()
            writer.writerows(paired)
    lines = [f"# Regime study: {table}", "", f"Command (the whole table, resumable): `{command_line}`; the rows "
             "below are its runs finished so far (tables from a part of it, e.g. `--tasks` or `--strategies`, "
             "still hold every finished run).", "",
             "Held-out headline metric x 100 at each run's best-dev epoch (mean ± std over seeds), the learning "
             "rate chosen on the dev split (" + (f"of seeds {', '.join(map(str, tuning))}" if tuning else "of every seed")
             + "; `provisional`: not every tuning run finished yet), and the paired difference to vanilla (95% "
             "t-interval, seeds won, the paired t-test's two-sided p, and that p Holm-adjusted over every row of "
             "the same task in this table); the rows ending in "
             "`last epoch` compare the held-out metric at the last epoch instead.", "",
             "| task | arm | lr | held-out | dev (best epoch) | last epoch: train loss, dev | held-out, last epoch |",
             "|---|---|---|---|---|---|---|"]
    for (task, arm), (lr, by_seed) in picked.items():
        held = [100 * held_out_score(s) for s in by_seed.values()]
        held_last = [100 * held_out_score(s, "last") for s in by_seed.values()]
        dev = [100 * dev_score(s) for s in by_seed.values()]
        last_dev = [100 * s["epoch_history"][-1][f"dev_{s['headline_metric']}"] for s in by_seed.values()]
        loss = [s["epoch_history"][-1]["train_loss"] for s in by_seed.values()]
        lines.append(f"| {task} | {arm.label} | {lr if (task, arm) in settled else lr + ' (provisional)'} | "
                     f"{_mean_std(held)} (n={len(held)}) | {_mean_std(dev)} | "
                     f"{statistics.fmean(loss):.4f}, {statistics.fmean(last_dev):.2f} | {_mean_std(held_last)} |")
    lines += ["", "| task | strategy | setting | n | mean diff | 95% CI | wins | p | Holm p |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['strategy']} | {r['setting']} | {r['n']} | {r['mean_diff']:.2f} | "
              f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] | {r['wins']}/{r['n']} | {r['p']:.3f} | {r['p_holm']:.3f} |"
              for r in paired]
    text = "\n".join(lines) + "\n"
    (out / f"{table}.md").write_text(text, encoding="utf-8")
    plot_dev_curves(picked, out / f"{table}_curves.png")
    return text


def _mean_std(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.pstdev(values):.2f}"


def plot_dev_curves(picked: dict[tuple[str, Arm], tuple[str, dict[int, dict]]], path: Path) -> None:
    """Per task, the mean dev curve over seeds of vanilla (at --epochs) and of each Bi-Drop arm, each at
    its chosen lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(task for task, _ in picked))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for arm in [Arm("vanilla"), *(arm for seen, arm in picked if seen == task and arm.strategy == "bidrop")]:
            if (task, arm) not in picked:
                continue
            lr, by_seed = picked[task, arm]
            curves = [[row[f"dev_{s['headline_metric']}"] for row in s["epoch_history"]] for s in by_seed.values()]
            mean = [statistics.fmean(values) for values in zip(*curves)]
            ax.plot(range(1, len(mean) + 1), mean, marker="o", label=f"{arm.label} (lr {lr}, n={len(curves)})")
        ax.set_title(task)
        ax.set_xlabel("epoch")
        ax.set_ylabel("dev score (mean over seeds)")
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, caller = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    extra = ["--held_out_at", "end", *caller]  # a later --held_out_at of the caller's wins
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", choices=("strategies", "sensitivity"), required=True)
    parser.add_argument("--out", required=True, help="folder of runs/, logs/, the tables and plots")
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS), metavar="TASK",
                        help=f"default: all of {', '.join(TASKS)} (strategies), {SENSITIVITY_TASK} (sensitivity)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--lrs", nargs="+", default=list(LRS), help="the learning rates each arm is run at")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of every arm but vanilla's equal-compute ones")
    parser.add_argument("--strategies", nargs="+", default=list(STUDIED), choices=STUDIED, metavar="NAME",
                        help=f"the strategies table's arms besides vanilla at --epochs: any of {', '.join(STUDIED)} "
                             "(vanilla: its equal-compute arms at k x --epochs)")
    parser.add_argument("--ks", nargs="+", type=int, default=list(BIDROP_KS),
                        help="Bi-Drop's k values in the strategies table (vanilla also runs at k x --epochs)")
    parser.add_argument("--rescales", nargs="+", default=["off", "on"], choices=("off", "on"),
                        help="the sensitivity table's rescale settings (under AdamW rescale=on changes an update "
                             "only through eps, so a seed or two of it is a check, not a sweep)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP threads per run (default: the CPU cores / --jobs)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each run's progress then goes to its log)")
    parser.add_argument("--lr_seeds", type=int, default=None, metavar="N",
                        help="choose each arm's lr on the first N --seeds (their runs go first); the arm's other "
                             "seeds then run at its chosen lr only, as soon as it is chosen (default: every seed "
                             "runs every lr)")
    parser.add_argument("--report_only", action="store_true", help="tabulate the finished runs only")
    args = parser.parse_args(own)
    tasks = args.tasks or TABLE_TASKS[args.table]
    arm_list = arms(args.table, args.epochs, args.ks, args.strategies, args.rescales)
    runs = plan(tasks, arm_list, args.lrs, args.seeds, args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    launch = suite.Launch(jobs=args.jobs, threads=args.threads)
    tuning = args.seeds[:args.lr_seeds] if args.lr_seeds is not None and args.lr_seeds < len(args.seeds) else None
    failed = []
    if not args.report_only:
        first = [run for run in runs if tuning is None or run.seed in tuning]
        later = None if tuning is None else lambda: remaining_runs(runs, out, tuning)
        failed = suite.execute(first, launch, extra, out, more=later)
    # the tables hold every finished run of the table's tasks and arms under OUT (at --lrs, --seeds): a
    # narrower command (one task, one strategy) adds its rows instead of overwriting the others
    whole = plan(TABLE_TASKS[args.table], arms(args.table, args.epochs), args.lrs, args.seeds, args.epochs)
    text = report(whole, out, args.table, args.epochs, table_command(args, caller), tuning)
    return suite.finish("regime_study", text, failed)


def table_command(args: argparse.Namespace, run_args: Sequence[str]) -> str:
    """The command that makes (and resumes) a whole table with these runs' protocol; `run_args`: the
    caller's arguments for every finetune.py run."""
    tuning = f" --lr_seeds {args.lr_seeds}" if args.lr_seeds is not None else ""
    tail = f" -- {' '.join(run_args)}" if run_args else ""
    return (f"python launch/regime_study.py --table {args.table} --out {args.out} --epochs {args.epochs} "
            f"--lrs {' '.join(args.lrs)} --seeds {' '.join(map(str, args.seeds))}{tuning}{tail}")


if __name__ == "__main__":
    sys.exit(main())
