"""Print the figures of `launch/gpu_check.sh bench` next to their goals, from the JSON files it wrote.

    python benchmarks/gpu_summary.py RESULTS_DIR

Reads step_zero2_bf16.json (benchmarks/step_time.py), selection.json (benchmarks/selection.py),
apply_mask.json (benchmarks/apply_mask_micro.py) and the decoder SFT rows step_sft_full.json and
step_sft_lora.json (benchmarks/step_time.py --model llama) from RESULTS_DIR; a missing file is
reported as "no result", so one part that failed or timed out does not hide the others.
"""

from __future__ import annotations

import json
import math
import os
import sys

STEP_JSON, SELECTION_JSON, APPLY_MASK_JSON = "step_zero2_bf16.json", "selection.json", "apply_mask.json"
SFT_JSONS = ("step_sft_full.json", "step_sft_lora.json")


def load(directory: str, name: str) -> dict | None:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def step_lines(step: dict) -> list[str]:
    """The step-time ratio, the plugin's buffers and its extra communication, each with its goal."""
    ratio_naive = step.get("naive_step_time_ratio", math.nan)
    peak = (f"peak GPU memory {step['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in step
            else f"peak RSS {step['peak_rss_mib']:.0f} MiB")
    return [
        f"step time Bi-Drop / (k x vanilla), BERT {step['params'] / 1e6:.1f}M params {step['dtype']} "
        f"ZeRO-{step['stage']} {step['ranks']} {step['device']} rank(s): {step['step_time_ratio']:.3f} "
        f"(goal {step['step_time_goal']}: {step['goal_met']}); vanilla {step['vanilla_step_s'] * 1e3:.1f} ms, "
        f"Bi-Drop {step['bidrop_step_s'] * 1e3:.1f} ms, naive / (k x vanilla) {ratio_naive:.3f}",
        f"plugin buffers {step['plugin_bytes_per_rank'] / 2**20:.1f} MiB (bound 4 or 8 x eligible owned = "
        f"{step['bound_bytes_per_rank'] / 2**20:.1f} MiB + 1 MiB); extra comm per step: "
        f"{step.get('extra_comm_calls_per_step')} all-reduces, largest {step.get('extra_comm_max_call_bytes')} B "
        f"(goal <= 4 of <= 8 KiB); {peak}",
    ]


def selection_lines(selection: dict) -> list[str]:
    return [f"selection P = {r['P_per_rank']:.0e}: exact {r['exact_s'] * 1e3:.2f} ms vs kthvalue "
            f"{r['gather_kthvalue_s'] * 1e3:.2f} ms (x{r['speedup']:.2f}; goal faster from P = 1e7: "
            f"{r['goal_faster']})" for r in selection["rows"]]


def apply_mask_lines(micro: dict) -> list[str]:
    return [f"apply_mask math, {r['elements']:,} elements: previous {r['old_total_ms']:.2f} ms -> current "
            f"{r['new_total_ms']:.2f} ms (x{r['total_speedup']:.2f}; select x{r['select_speedup']:.2f}, "
            f"scores x{r['scores_speedup']:.2f}, mask x{r['mask_speedup']:.2f}; goal: not slower, "
            f"{'met' if r['total_speedup'] >= 1 else 'missed'}; same threshold and update: {r['identical']})"
            for r in micro["rows"]]


def sft_lines(step: dict) -> list[str]:
    """The decoder SFT row: step ratio, the plugin's buffers and a Bi-Drop step's peak over vanilla's."""
    kind = "GPU memory" if step["device"] == "cuda" else "RSS"
    over = max(step.get("bidrop_step_peak_over_vanilla_mib_by_rank", [math.nan]))
    return [f"decoder SFT {step['model']}, {step['params'] / 1e6:.0f}M params ({step['trainable_params'] / 1e6:.2f}M "
            f"trained) {step['dtype']} ZeRO-{step['stage']} {step['ranks']} {step['device']} rank(s): Bi-Drop / "
            f"(k x vanilla) {step['step_time_ratio']:.3f} (goal {step['step_time_goal']}: {step['goal_met']}); "
            f"vanilla {step['vanilla_step_s'] * 1e3:.0f} ms; plugin buffers "
            f"{step['plugin_bytes_per_rank'] / 2**20:.2f} MiB (4 x eligible owned = "
            f"{step['bound_bytes_per_rank'] / 2**20:.2f} MiB); a Bi-Drop step's peak {kind} "
            f"over a vanilla step's {over:.1f} MiB (goal <= 8 MiB beyond the buffers: "
            f"{step.get('step_peak_goal_met')})"]


def main(directory: str) -> None:
    print("\n== figures next to their goals")
    parts = [(STEP_JSON, step_lines), (SELECTION_JSON, selection_lines), (APPLY_MASK_JSON, apply_mask_lines)]
    parts += [(name, sft_lines) for name in SFT_JSONS]
    for name, lines in parts:
        result = load(directory, name)
        print("\n".join(lines(result)) if result else f"{name}: no result (see the output above)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu_summary.py RESULTS_DIR")
    main(sys.argv[1])
