"""Collect the JSON files run_all.sh wrote into benchmarks/results/latest.json and print the
Markdown tables with each figure next to its goal.

    python benchmarks/summarize.py RESULTS_DIR "COMMAND"
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

MIB = 2**20


def load(directory: Path, name: str) -> dict | None:
    path = directory / name
    return json.loads(path.read_text()) if path.exists() else None


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "transformers"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def table(rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, rows[0])) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows[1:]]
    return "\n".join(lines)


def fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def mib(values) -> str:
    """Bytes per rank as 'a / b' MiB."""
    return " / ".join(f"{v / MIB:.2f}" for v in values)


def main() -> None:
    directory, command = Path(sys.argv[1]), sys.argv[2]
    z2, z3 = load(directory, "step_zero2.json"), load(directory, "step_zero3.json")
    z2_k4 = load(directory, "step_zero2_k4.json")
    minilm = load(directory, "step_minilm_zero2.json")
    only = {mode: load(directory, f"memory_{mode}.json") for mode in ("vanilla", "accumulating", "bidrop", "naive")}
    sel1, sel2 = load(directory, "selection_1rank.json"), load(directory, "selection_2ranks.json")
    sft = {row: load(directory, f"step_sft_{row}.json") for row in ("full", "lora")}  # run_all.sh LLM=1

    goals = {}
    ratio = z2["step_time_ratio"]
    goals["step_time_ratio <= 1.05 (ZeRO-2, CPU)"] = ratio <= 1.05
    if z2_k4:
        goals["step_time_ratio_k4 <= 1.05 (ZeRO-2, CPU)"] = z2_k4["step_time_ratio"] <= 1.05
    # memory per rank, from the one-mode launches (rank r owns the same partition in each)
    mem = only["bidrop"] or {}
    eligible = mem.get("eligible_owned_elements_by_rank", [z2["eligible_owned_elements"]])
    plugin = mem.get("plugin_bytes_by_rank", [z2["plugin_bytes_per_rank"]])
    bound = [4 * e for e in eligible]  # k = 2
    goals["plugin memory <= 4 x eligible owned + 1 MiB on every rank (k = 2)"] = all(
        p <= b + MIB for p, b in zip(plugin, bound))

    def over_vanilla(mode: str) -> list[int] | None:
        """Per rank: the peak RSS of `mode`'s launch minus vanilla's, bytes."""
        if not (only["vanilla"] and only[mode] and "peak_rss_mib_by_rank" in only[mode]):
            return None
        return [round((m - v) * MIB) for m, v in zip(only[mode]["peak_rss_mib_by_rank"],
                                                     only["vanilla"]["peak_rss_mib_by_rank"])]

    peak_extra = over_vanilla("bidrop")
    # the part that is DeepSpeed's own gradient accumulation between the k passes (k backwards, one boundary)
    accumulation = over_vanilla("accumulating")
    if peak_extra is not None:
        goals["peak RSS of Bi-Drop - vanilla <= 4 x eligible owned + 9 MiB on every rank"] = all(
            x <= b + 9 * MIB for x, b in zip(peak_extra, bound))
    extra_ok = z2["extra_comm_calls_per_step"] <= 4 and z2["extra_comm_max_call_bytes"] <= 8 * 1024
    goals["extra comm <= 4 all-reduces of <= 8 KiB per step"] = extra_ok
    sft_rows = [["decoder SFT, ZeRO-3 bf16", "params (trained)", "vanilla s", "Bi-Drop s",
                 "Bi-Drop / (k x vanilla): median (repeats)", "plugin buffers per rank (4 x eligible owned)",
                 "Bi-Drop step peak - vanilla's, per rank", "goals"]]
    for row, r in sft.items():
        if r:
            goals[f"decoder SFT {row}: step ratio {r['step_time_goal']}"] = r["goal_met"] == "met"
            goals[f"decoder SFT {row}: step peak over vanilla <= 8 MiB"] = r["step_peak_goal_met"] == "met"
            sft_rows.append([f"{r['model']}, seq {r['seq_len']}", f"{r['params'] / 1e6:.0f}M "
                             f"({r['trainable_params'] / 1e6:.2f}M)", fmt(r["vanilla_step_s"], ".1f"),
                             fmt(r["bidrop_step_s"], ".1f"), f"{r['step_time_ratio']:.3f} ("
                             + ", ".join(f"{x:.2f}" for x in r["step_time_ratios"]) + ")",
                             mib(r["plugin_bytes_by_rank"]) + " MiB",
                             " / ".join(f"{v:.2f}" for v in r["bidrop_step_peak_over_vanilla_mib_by_rank"]) + " MiB",
                             f"{r['step_time_goal']}; <= 8 MiB"])
    selection_rows = (sel1["rows"] if sel1 else []) + (sel2["rows"] if sel2 else [])
    large = [r for r in selection_rows if r["P_per_rank"] >= 10**7]
    goals["exact selection faster than gather + kthvalue from P = 1e7 (2 ranks)"] = all(
        r["exact_s"] < r["gather_kthvalue_s"] for r in large if r["ranks"] > 1)
    goals["exact selection faster than gather + kthvalue from P = 1e7 (1 rank)"] = all(
        r["exact_s"] < r["gather_kthvalue_s"] for r in large if r["ranks"] == 1)

    step_rows = [["model", "ZeRO", "params", "vanilla s", "Bi-Drop s", "naive s", "Bi-Drop / (k x vanilla)",
                  "naive / (k x vanilla)", "goal"]]
    for r in (z2, z2_k4, z3, minilm):
        if r:
            step_rows.append([r["model"], r["stage"], r["params"], fmt(r["vanilla_step_s"]), fmt(r["bidrop_step_s"]),
                              fmt(r.get("naive_step_s")), fmt(r["step_time_ratio"]),
                              fmt(r.get("naive_step_time_ratio")), f"<= 1.05 (k = {r.get('k', 2)})"])
    mem_rows = [["ZeRO-2, per rank", "vanilla", "vanilla, k backwards accumulated", "Bi-Drop", "naive", "goal"]]
    mem_rows.append(["peak RSS of the steps (MiB)"] + [fmt(only[m] and only[m]["peak_rss_mib"], ".1f") for m in only] + [""])
    mem_rows.append(["RSS growth over the built engine (MiB)"]
                    + [fmt(only[m] and only[m]["rss_growth_mib"], ".1f") for m in only] + [""])
    mem_rows.append(["plugin buffers, rank 0 / rank 1 (MiB)", "", "", mib(plugin),
                     f"{z2['naive_copies_bytes_per_rank'] / MIB:.2f} (k grad copies)",
                     f"<= 4 x eligible owned ({' / '.join(map(str, eligible))}) + 1 MiB = {mib(b + MIB for b in bound)}"])
    if peak_extra is not None:
        mem_rows.append(["peak RSS - vanilla's, rank 0 / rank 1 (MiB)", "", mib(accumulation or []), mib(peak_extra), "",
                         f"Bi-Drop <= {mib(b + 9 * MIB for b in bound)} (bound + 8 MiB)"])
    parts = {"step_rise_mib_by_rank": "largest rise within a step over the RSS before it, rank 0 / rank 1 (MiB)",
             "rss_anon_mib_by_rank": "anonymous pages resident after the steps (MiB)",
             "rss_file_mib_by_rank": "file-backed pages (library code) resident after the steps (MiB)"}
    for key, label in parts.items():
        if all(only[m] and key in only[m] for m in ("vanilla", "accumulating", "bidrop")):
            mem_rows.append([label] + [" / ".join(f"{v:.2f}" for v in only[m][key]) if only[m] and key in only[m]
                                       else "" for m in only] + [""])
    comm_rows = [["per step, per rank", "ZeRO", "vanilla (1 step)", "Bi-Drop", "naive", "goal"]]
    for r in (z2, z3):
        comm_rows.append(["all collectives: bytes / calls", r["stage"],
                          f"{r['vanilla_comm_bytes_per_step']} / {r['vanilla_comm_calls_per_step']}",
                          f"{r['bidrop_comm_bytes_per_step']} / {r['bidrop_comm_calls_per_step']}",
                          f"{r['naive_comm_bytes_per_step']} / {r['naive_comm_calls_per_step']}", ""])
        comm_rows.append(["beyond the k gradient reductions: bytes / calls", r["stage"], "0 / 0",
                          f"{r['extra_comm_bytes_per_step']} / {r['extra_comm_calls_per_step']} "
                          f"(largest {r['extra_comm_max_call_bytes']} B)",
                          f"{r['naive_extra_comm_bytes_per_step']} / {r['naive_extra_comm_calls_per_step']}",
                          "<= 4 calls of <= 8 KiB"])
    sel_rows = [["ranks", "P per rank", "exact s", "gather + kthvalue s", "speedup", "exact peak extra MiB",
                 "gather + kthvalue peak extra MiB", "goal (P >= 1e7: exact faster)"]]
    for r in selection_rows:
        sel_rows.append([r["ranks"], f"{r['P_per_rank']:.0e}", fmt(r["exact_s"], ".4f"), fmt(r["gather_kthvalue_s"], ".4f"),
                         fmt(r["speedup"], ".2f"), fmt(r["exact_peak_extra_mib"], ".1f"),
                         fmt(r["gather_kthvalue_peak_extra_mib"], ".1f"), r["goal_faster"]])

    machine = {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform()}
    latest = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "machine": machine, "versions": versions(),
        "step_time_ratio": ratio, "naive_step_time_ratio": z2.get("naive_step_time_ratio"),
        "step_time_ratio_zero3": z3 and z3["step_time_ratio"],
        "naive_step_time_ratio_zero3": z3 and z3.get("naive_step_time_ratio"),
        "step_time_ratio_minilm_zero2": minilm and minilm["step_time_ratio"],
        "step_time_ratio_k4": z2_k4 and z2_k4["step_time_ratio"],
        "eligible_owned_elements_per_rank": eligible,
        "plugin_bytes_per_rank": plugin, "bound_bytes_per_rank": bound, "peak_extra_bytes_per_rank": peak_extra,
        "accumulation_extra_bytes_per_rank": accumulation,
        "memory_parts_mib_by_rank": {m: {key: only[m][key] for key in parts if key in only[m]}
                                     for m in only if only[m]},
        "naive_copies_bytes_per_rank": z2["naive_copies_bytes_per_rank"],
        "peak_rss_mib": {m: only[m] and only[m]["peak_rss_mib"] for m in only},
        "rss_growth_mib": {m: only[m] and only[m]["rss_growth_mib"] for m in only},
        "extra_comm_bytes_per_step": z2["extra_comm_bytes_per_step"],
        "extra_comm_calls_per_step": z2["extra_comm_calls_per_step"],
        "extra_comm_max_call_bytes": z2["extra_comm_max_call_bytes"],
        "naive_extra_comm_bytes_per_step": z2["naive_extra_comm_bytes_per_step"],
        "naive_extra_comm_calls_per_step": z2["naive_extra_comm_calls_per_step"],
        "selection": selection_rows,
        "goals_met": goals,
        "runs": {"zero2": z2, "zero2_k4": z2_k4, "zero3": z3, "minilm_zero2": minilm, "memory": only,
                 "sft_full": sft["full"], "sft_lora": sft["lora"]},
    }
    (directory / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    print("### Step time (2 ranks, median of interleaved repeats)\n\n" + table(step_rows))
    print("\n### Memory\n\n" + table(mem_rows))
    if len(sft_rows) > 1:
        print("\n### Decoder SFT step (Llama, ZeRO-3, bf16, 2 ranks)\n\n" + table(sft_rows))
    print("\n### Communication\n\n" + table(comm_rows))
    print("\n### Selection\n\n" + table(sel_rows))
    print("\n### Goals\n\n" + table([["goal", "met"]] + [[k, "yes" if v else "**no**"] for k, v in goals.items()]))
    print(f"\nMachine: {machine['nproc']} CPUs, {machine['cpu_model']}; versions {latest['versions']}; {latest['date']}")


if __name__ == "__main__":
    main()
