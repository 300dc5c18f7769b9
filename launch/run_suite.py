"""Run strategies x tasks x seeds with the finetune recipe and tabulate the held-out scores.

Each run is one finetune process (`bidrop_ds.training.suite`: `python -m bidrop_ds.recipes.finetune`,
or a `torchrun` of N ranks with --deepspeed) writing its summary JSON under OUT/runs/; a run whose
JSON exists is skipped, so an interrupted suite resumes where it stopped. At the end (and with
--report_only) the summaries are aggregated into OUT/results.md and OUT/results.csv (mean, std and
max over seeds per task and held-out set, and the average over them) and plotted: OUT/scores.png
(score by strategy, every seed shown) and OUT/kept_by_layer.png (Bi-Drop's kept fraction per layer
over training). Runs with a dev split (`-- --dev_size N`) get a second table, CSV rows with `at` =
`best_dev` and OUT/scores_best_dev.png: the held-out scores at each run's best-dev epoch, beside the
last epoch's.

Your own data instead of --tasks: the finetune.py data flags (--train_file, --validation_file,
--test_file, --dataset_name, --dataset_config, --text_column, --label_column, --validation_split)
given to run_suite.py go to every run; the data set's name (the train file's stem) is its task.

    python launch/run_suite.py --out runs/main --strategies vanilla bidrop childtuning-d childtuning-f dps \\
        --tasks vader-movie-lowres-1000 vader-transfer --seeds 0 1 2 3 4
    python launch/run_suite.py --out runs/k --strategies bidrop --sweep k=2,4,8 --seeds 0 1 2
    python launch/run_suite.py --out runs/demo --strategies vanilla bidrop --ranks 2 \\
        --deepspeed ds_configs/zero2_fp32.json -- --train_size 2048
    python launch/run_suite.py --out runs/mine --train_file reviews.csv --text_column review --label_column stars \\
        -- --train_size 0 --epochs 5 --dev_size 200

Arguments after `--` go to every finetune run (e.g. --train_size, --epochs, --lr, --model).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bidrop_ds.config import ABLATIONS, STRATEGIES  # noqa: E402
from bidrop_ds.data.custom import DataSource, add_data_arguments  # noqa: E402
from bidrop_ds.training.suite import SWITCHES, Launch, Run, execute, finish, result_path  # noqa: E402

MULTI_PASS = {"bidrop", *ABLATIONS}  # the strategies whose k may be swept
SWEEPABLE = {"k", "p", "batch_size", "lr", "dps_window", "train_size", "chunks", "epochs", "rescale", "dev_size"}
DEFAULT_TASKS = ["vader-movie"]
# the scores tabulated: at the last epoch (every run) and at the best-dev epoch (runs with --dev_size)
SELECTIONS = {"last": "the last epoch", "best_dev": "the best-dev epoch (chosen on the dev split)"}


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for runs/, logs/, results.md/.csv and the plots")
    parser.add_argument("--strategies", nargs="+", default=["vanilla", "bidrop"],
                        choices=STRATEGIES + tuple(ABLATIONS), metavar="NAME",
                        help=f"any of {', '.join(STRATEGIES + tuple(ABLATIONS))}")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"finetune.py --task names (default: {' '.join(DEFAULT_TASKS)}), or your own data below")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="each seeds the head's init, the batch order and the dropout/mask draws")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                        help=f"run every value of one setting ({', '.join(sorted(SWEEPABLE))}); repeat for a grid; "
                             "k applies to the Bi-Drop strategies only")
    parser.add_argument("--ranks", type=int, default=1, help="processes per run (> 1 needs --deepspeed)")
    parser.add_argument("--deepspeed", metavar="FILE.json", default=None, help="DeepSpeed config for every run")
    parser.add_argument("--log_every", type=int, default=10, help="kept fraction per layer every N steps")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP threads per process (default: the CPU cores / (ranks x jobs))")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, in the order planned (> 1: each run's progress goes to its log)")
    parser.add_argument("--report_only", action="store_true", help="tabulate and plot the finished runs only")
    add_data_arguments(parser)
    args = parser.parse_args(own)
    try:
        args.data = DataSource.from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.data is not None and args.tasks is not None:
        parser.error("give --tasks or your own data (--train_file / --dataset_name), not both")
    args.tasks = [args.data.name] if args.data is not None else args.tasks or DEFAULT_TASKS
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.ranks < 1 or (args.ranks > 1 and not args.deepspeed):
        parser.error("--ranks N > 1 runs DeepSpeed ranks: give --deepspeed FILE.json (ds_configs/zero2_fp32.json)")
    try:
        args.grid = parse_sweeps(args.sweep)
    except ValueError as err:
        parser.error(str(err))
    args.launch = Launch(ranks=args.ranks, jobs=args.jobs, threads=args.threads, deepspeed=args.deepspeed,
                         log_every=args.log_every, data=args.data)
    return args, extra


def parse_sweeps(sweeps: list[str]) -> list[tuple[str, list[str]]]:
    """["k=2,4", "p=0.1,0.3"] -> [("k", ["2", "4"]), ("p", ["0.1", "0.3"])], validated."""
    grid = []
    for sweep in sweeps:
        name, _, values = sweep.partition("=")
        if name not in SWEEPABLE or not values:
            raise ValueError(f"--sweep {sweep!r}: expected NAME=V1,V2,... with NAME one of {', '.join(sorted(SWEEPABLE))}")
        if name in dict(grid):
            raise ValueError(f"--sweep {name} given twice")
        grid.append((name, [v for v in values.split(",") if v]))
        if name in SWITCHES and not set(grid[-1][1]) <= {"on", "off"}:
            raise ValueError(f"--sweep {sweep!r}: {name} takes the values on and off")
    return grid


def plan(tasks: list[str], strategies: list[str], grid: list[tuple[str, list[str]]], seeds: list[int]) -> list[Run]:
    """Every run of the suite, in order; a sweep of k leaves the one-pass strategies at their default."""
    runs: list[Run] = []
    for task in tasks:
        for strategy in strategies:
            variants: list[tuple[tuple[str, str], ...]] = [()]
            for name, values in grid:
                if name == "k" and strategy not in MULTI_PASS:
                    continue
                variants = [variant + ((name, value),) for variant in variants for value in values]
            runs += [Run(task, strategy, variant, seed) for variant in variants for seed in seeds]
    return runs


# ----- the report ---------------------------------------------------------------------------------

def score_columns(summary: dict[str, Any], task: str, at: str = "last") -> dict[str, float]:
    """The headline metric of every held-out set of one run, {"task": x, "task/tweets": y, ...}, at
    the last epoch (`at="last"`) or at the best-dev epoch (`"best_dev"`; {} for a run without a dev split)."""
    scores = summary if at == "last" else summary.get("at_best_dev_epoch")
    if scores is None:
        return {}
    metric = summary["headline_metric"]
    columns = {task: scores[metric]}
    for name in list(summary.get("eval_sets", {}))[1:]:
        columns[f"{task}/{name}"] = scores[f"{name}_{metric}"]
    return columns


def collect(runs: list[Run], out: Path) -> tuple[dict[tuple[str, str, str], list[float]], dict[str, str]]:
    """{(selection, row label, column): [score per finished seed]} and {column: metric name}."""
    scores: dict[tuple[str, str, str], list[float]] = {}
    metrics: dict[str, str] = {}
    for run in runs:
        path = result_path(out, run)
        if not path.exists():
            continue
        summary = json.loads(path.read_text(encoding="utf-8"))
        for at in SELECTIONS:
            for column, value in score_columns(summary, run.task, at).items():
                scores.setdefault((at, run.label, column), []).append(float(value))
                metrics[column] = summary["headline_metric"]
    return scores, metrics


def aggregate(runs: list[Run], out: Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Rows of (selection, label, column, seeds, mean, std, max); the row labels and columns in plan order."""
    scores, metrics = collect(runs, out)
    labels = list(dict.fromkeys(run.label for run in runs))
    columns = list(dict.fromkeys(column for (_, _, column) in scores))
    rows = []
    for at in SELECTIONS:
        for label in labels:
            for column in columns:
                values = scores.get((at, label, column), [])
                if values:
                    rows.append({"at": at, "strategy": label, "column": column, "metric": metrics[column],
                                 "seeds": len(values), "mean": statistics.fmean(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                 "max": max(values), "values": values})
    return rows, labels, columns


def markdown_table(rows: list[dict[str, Any]], labels: list[str], columns: list[str]) -> str:
    """mean ± std (max) per strategy and column, and the average of the means over the columns."""
    cell = {(r["strategy"], r["column"]): r for r in rows}
    metric = {r["column"]: r["metric"] for r in rows}
    head = ["strategy"] + [f"{c} ({metric[c]})" for c in columns] + (["average"] if len(columns) > 1 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        found = [cell.get((label, c)) for c in columns]
        if not any(found):
            continue
        texts = [f"{r['mean'] * 100:.2f} ± {r['std'] * 100:.2f} ({r['max'] * 100:.2f}, n={r['seeds']})" if r else "–"
                 for r in found]
        if len(columns) > 1:
            means = [r["mean"] for r in found if r]
            texts.append(f"{statistics.fmean(means) * 100:.2f}" if len(means) == len(columns) else "–")
        lines.append("| " + " | ".join([label] + texts) + " |")
    return "\n".join(lines) + "\n"


def write_report(runs: list[Run], out: Path, command_line: str) -> str:
    rows, labels, columns = aggregate(runs, out)
    if not rows:
        return "run_suite: no finished run to report\n"
    by_selection = {at: [row for row in rows if row["at"] == at] for at in SELECTIONS}
    table = "\n".join(f"Held-out at {SELECTIONS[at]}:\n\n{markdown_table(chosen, labels, columns)}"
                      for at, chosen in by_selection.items() if chosen)
    text = (f"# Results\n\nScores x 100 on the held-out sets: mean ± std over seeds (max over seeds, n = seeds).\n\n"
            f"{table}\nCommand: `{command_line}`\n")
    (out / "results.md").write_text(text, encoding="utf-8")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["at", "strategy", "column", "metric", "seeds", "mean", "std",
                                                    "max", "values"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "values": " ".join(f"{v:.6f}" for v in row["values"])})
    for at, chosen in by_selection.items():
        if chosen:
            plot_scores(chosen, labels, columns, out / ("scores.png" if at == "last" else f"scores_{at}.png"))
    plot_kept_by_layer(runs, out, out / "kept_by_layer.png")
    return table


def plot_scores(rows: list[dict[str, Any]], labels: list[str], columns: list[str], path: Path) -> None:
    """One panel per task/held-out set: each seed's score as a dot, the mean ± std as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(r["strategy"], r["column"]): r for r in rows}
    shown = [label for label in labels if any((label, c) in cell for c in columns)]
    across = min(2, len(columns))
    down = -(-len(columns) // across)
    fig, axes = plt.subplots(down, across, figsize=(max(4.0, 0.8 * len(shown)) * across, 4.0 * down), squeeze=False)
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, columns):
        for x, label in enumerate(shown):
            row = cell.get((label, column))
            if row is None:
                continue
            ax.bar(x, row["mean"], yerr=row["std"], color="#9ecae1", edgecolor="#3182bd", capsize=3)
            ax.scatter([x] * len(row["values"]), row["values"], color="#08306b", s=10, zorder=3)
        values = [v for label in shown if (label, column) in cell for v in cell[(label, column)]["values"]]
        low, high = min(values), max(values)
        ax.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right")
        ax.set_title(column)
        ax.set_ylabel(rows[0]["metric"] if len(columns) == 1 else cell[(shown[0], column)]["metric"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kept_by_layer(runs: list[Run], out: Path, path: Path) -> None:
    """Bi-Drop's kept fraction per layer over the steps of its first finished run (seed order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for run in runs:
        if run.strategy == "bidrop" and result_path(out, run).exists():
            summary = json.loads(result_path(out, run).read_text(encoding="utf-8"))
            if summary.get("layer_kept"):
                break
    else:
        return
    steps = [step for step, _ in summary["layer_kept"]]
    layers = list(summary["layer_kept"][0][1])
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for layer in layers:
        ax.plot(steps, [fractions[layer] for _, fractions in summary["layer_kept"]], label=layer)
    ax.axhline(summary["bidrop"]["p"], color="grey", linestyle=":", label="p")
    ax.set_xlabel("step")
    ax.set_ylabel("kept fraction")
    ax.set_title(f"Bi-Drop kept fraction per layer ({run.run_id})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(args.tasks, args.strategies, args.grid, args.seeds)
    failed = [] if args.report_only else execute(runs, args.launch, extra, out)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report_only"]
    command_line = "python launch/run_suite.py " + " ".join(given)  # the command that makes the table
    return finish("run_suite", write_report(runs, out, command_line), failed)


if __name__ == "__main__":
    sys.exit(main())
