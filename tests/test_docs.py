"""The docs against the code: README.md and docs/*.md.

- Every relative link resolves to a file of the repository (and its #anchor to a heading there).
- Every repo path a page shows (`launch/finetune.py`, `ds_configs/zero2_fp32.json`, ...) exists.
- Every module a page names as `bidrop_ds.x.y` exists, and a trailing name is defined in it.
- Every flag a page shows for a launcher (in a bash block or an inline command) is a flag of that
  launcher's argparse parser; after `--`, run_suite.py, regime_study.py and importance_study.py pass
  flags on to finetune.py, so those are checked there.
- docs/api.md's `BiDropConfig` table names exactly the dataclass's fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
from functools import cache
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A launcher's files, the first that exists wins: a clone's script, then the installed recipe module.
LAUNCHERS = {
    "finetune": ("launch/finetune.py", "bidrop_ds/recipes/finetune.py"),
    "sft": ("launch/sft.py", "bidrop_ds/recipes/sft.py"),
    "run_suite": ("launch/run_suite.py",),
    "regime_study": ("launch/regime_study.py",),
    "importance_study": ("launch/importance_study.py",),
    "accelerate_finetune": ("launch/accelerate_finetune.py",),
}
CONSOLE_SCRIPTS = {"bidrop-finetune": "finetune", "bidrop-sft": "sft"}
MODULES = {f"bidrop_ds.recipes.{name}": name for name in ("finetune", "sft")}
# Arguments after `--` go to every finetune.py run these launchers start.
PASSES_ON = {"run_suite": "finetune", "regime_study": "finetune", "importance_study": "finetune"}
# Flags of other tools that pages name on their own in prose (`--nproc_per_node`); a flag named alone
# must be one of these or a flag of some launcher.
OTHER_TOOLS_FLAGS = {
    "torchrun": {"--nnodes", "--nproc_per_node", "--node_rank", "--master_addr", "--master_port", "--standalone",
                 "--rdzv_id", "--rdzv_backend", "--rdzv_endpoint", "--module"},
    "deepspeed": {"--num_gpus", "--num_nodes", "--hostfile", "--no_ssh", "--master_addr", "--master_port"},
    "accelerate launch": {"--multi_gpu", "--cpu", "--num_processes", "--config_file", "--mixed_precision",
                          "--fsdp_version", "--module"},
    "benchmarks/memory_scale.py": {"--setups", "--jobs_dir"},
}
# How a launcher's parser is reached: a builder that returns it, else the first parse inside these.
PARSER_BUILDERS = ("build_parser", "make_parser", "get_parser")
PARSING_FUNCTIONS = ("parse_args", "main", "cli")

# A path inside the repository, as pages write them: under one of these folders, or a top-level file.
REPO_PATH = re.compile(
    r"(?<![\w./~$-])((?:launch|bidrop_ds|ds_configs|benchmarks|results|tests|docs|\.ci)/[\w.*/-]*"
    r"|(?:Makefile|setup\.py|constraints\.txt|constraints-oldest\.txt|pytest\.ini|README\.md)(?![\w.-]))")
MODULE = re.compile(r"(?<![\w./-])bidrop_ds(?:\.\w+)+")
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
SHELL = {"bash", "sh", "shell", "console"}


class _Parsed(BaseException):
    """Raised from inside a launcher's first parse, carrying its parser (BaseException: no launcher
    catches it as an error of its own)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


# ----- reading the pages ---------------------------------------------------------------------------

@dataclasses.dataclass
class Page:
    path: Path
    text: str
    blocks: list[tuple[str, str]]  # (language, body) of each fenced block
    prose: str  # the text outside fenced blocks

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    def spans(self) -> list[str]:
        return [match.group(2) for match in INLINE.finditer(self.prose)]


@cache
def page(path: Path) -> Page:
    text = path.read_text(encoding="utf-8")
    return Page(path, text, [(m.group(1), m.group(2)) for m in FENCE.finditer(text)], FENCE.sub("", text))


def pages() -> list[Page]:
    return [page(path) for path in PAGES]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in page(path).prose.splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base, n = slug(match.group(1)), 0
            while (anchor := base if n == 0 else f"{base}-{n}") in found:
                n += 1
            found.add(anchor)
    return found


def commands(page: Page) -> list[list[str]]:
    """The shell commands of a page, as token lists: each line (continuations joined) of its bash
    blocks, split at ; && || |, and each inline code span of its prose."""
    texts = [span for span in page.spans()]
    for language, body in page.blocks:
        if language in SHELL:
            for line in body.replace("\\\n", " ").splitlines():
                texts += re.split(r"\s(?:;|&&|\|\||\|)\s|;\s", re.sub(r"(^|\s)#.*", "", line))
    out = []
    for text in texts:
        try:
            tokens = shlex.split(text, posix=True)
        except ValueError:  # an unbalanced quote in prose: plain words will do
            tokens = text.split()
        out.append([token.strip("[]") for token in tokens])
    return out


def launcher_of(tokens: list[str], i: int) -> str | None:
    """The launcher token i starts (`launch/finetune.py`, `finetune.py`, `bidrop-sft`,
    `-m bidrop_ds.recipes.finetune`), or None."""
    token = tokens[i]
    if token in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[token]
    if token in ("-m", "--module") and i + 1 < len(tokens):
        return MODULES.get(tokens[i + 1])
    match = re.fullmatch(r"(?:\S*/)?launch/(\w+)\.py|(\w+)\.py", token)
    name = match and (match.group(1) or match.group(2))
    return name if name in LAUNCHERS else None


def flags_shown(page: Page) -> list[tuple[str, str, str]]:
    """(launcher, flag, the command) for every flag a page gives a launcher."""
    shown = []
    for tokens in commands(page):
        current = None
        for i, token in enumerate(tokens):
            launcher = launcher_of(tokens, i)
            if launcher is not None:
                current = launcher
            elif token == "--" and current is not None:
                current = PASSES_ON.get(current)
            elif current is not None and token.startswith("--") and len(token) > 2:
                for flag in re.findall(r"--[\w-]+", token.split("=", 1)[0]):
                    shown.append((current, flag, " ".join(tokens)))
    return shown


# ----- the launchers' parsers ----------------------------------------------------------------------

def load(relative: str):
    """A launcher's module: a bidrop_ds module by name, a script of launch/ by path."""
    if relative.startswith("bidrop_ds/"):
        return importlib.import_module(relative.removesuffix(".py").replace("/", "."))
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"docs_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    with mock.patch.object(sys, "path", list(sys.path)):  # the scripts add their folders to it: undone after
        spec.loader.exec_module(module)
    return module


def capture_parser(function) -> argparse.ArgumentParser:
    """The parser `function` parses its arguments with, stopped at that first parse."""
    def parsed(self, *args, **kwargs):
        raise _Parsed(self)

    takes_argv = bool(inspect.signature(function).parameters)
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", parsed), \
            mock.patch.object(sys, "argv", [function.__module__]):
        try:
            function([]) if takes_argv else function()
        except _Parsed as stop:
            return stop.parser
    raise AssertionError(f"{function.__module__}.{function.__name__} returned without parsing any arguments")


@cache
def launcher_flags(name: str) -> frozenset[str] | None:
    """Every option string of a launcher's parser; None when none of its files exists."""
    existing = [relative for relative in LAUNCHERS[name] if (ROOT / relative).exists()]
    if not existing:
        return None
    module = load(existing[0])
    # the module's own functions first (a study imports the finetune recipe's parse_args for the runs it
    # starts), then imported ones (a script of launch/ that only imports the recipe's main)
    found = [getattr(module, name) for name in PARSER_BUILDERS + PARSING_FUNCTIONS
             if callable(getattr(module, name, None))]
    assert found, f"{existing[0]}: none of {PARSER_BUILDERS + PARSING_FUNCTIONS} to find its parser"
    function = min(found, key=lambda f: (f.__module__ != module.__name__, found.index(f)))
    parser = function() if function.__name__ in PARSER_BUILDERS else capture_parser(function)
    assert isinstance(parser, argparse.ArgumentParser), f"{existing[0]}: no argparse parser found"
    flags = set(parser._option_string_actions)
    if hasattr(parser, "parse_args_and_config"):  # TRL's parser reads --config FILE.yaml before argparse does
        flags.add("--config")
    return frozenset(flags)


# ----- the tests -----------------------------------------------------------------------------------

def test_index_lists_every_page() -> None:
    assert (ROOT / "docs" / "index.md").exists()
    listed = set(LINK.findall(page(ROOT / "docs" / "index.md").prose))
    missing = [p.name for p in PAGES if p.parent.name == "docs" and p.name != "index.md" and p.name not in listed]
    assert not missing, f"docs/index.md does not list {missing}"


def test_links_resolve() -> None:
    broken = []
    for doc in pages():
        for target in LINK.findall(doc.prose):
            if re.match(r"[a-z][\w+.-]*:", target):  # https:, mailto:
                continue
            where, _, anchor = target.partition("#")
            path = (doc.path.parent / where).resolve() if where else doc.path
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{doc.name}: ({target}): no such file in the repository")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.name}: ({target}): no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, "\n".join(dict.fromkeys(broken))


def test_repo_paths_exist() -> None:
    missing = []
    for doc in pages():
        texts = doc.spans() + [body for _, body in doc.blocks]
        for text in texts:
            for path in REPO_PATH.findall(text):
                path = path.rstrip(".")
                found = glob.glob(str(ROOT / path)) if "*" in path else (ROOT / path).exists()
                if not found:
                    missing.append(f"{doc.name}: {path}")
    assert not missing, "paths the docs show that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_modules_exist() -> None:
    """`bidrop_ds.a.b` is a module, or `bidrop_ds.a` a module that defines b."""
    missing = []
    for doc in pages():
        for text in doc.spans() + [body for _, body in doc.blocks]:
            for dotted in MODULE.findall(text):
                parts = dotted.split(".")
                for cut in range(len(parts), 0, -1):
                    base = ROOT.joinpath(*parts[:cut])
                    module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
                    if module.exists():
                        rest = parts[cut:]
                        if len(rest) > 1 or (rest and not re.search(rf"\b{rest[0]}\b", module.read_text())):
                            missing.append(f"{doc.name}: {dotted} ({'.'.join(rest)} not in {module.relative_to(ROOT)})")
                        break
                else:
                    missing.append(f"{doc.name}: {dotted}")
    assert not missing, "modules the docs name that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_launcher_flags_exist() -> None:
    unknown, absent = [], set()
    for doc in pages():
        for launcher, flag, command in flags_shown(doc):
            flags = launcher_flags(launcher)
            if flags is None:
                absent.add(f"{doc.name}: {launcher} ({' or '.join(LAUNCHERS[launcher])}) does not exist")
            elif flag not in flags:
                unknown.append(f"{doc.name}: {flag} is not a flag of {launcher}: {command}")
    assert not absent and not unknown, "\n".join(sorted(absent) + unknown)


def test_flags_named_alone_exist() -> None:
    """A flag named on its own in prose (`--held_out_at end`) is a flag of some launcher, or of a tool
    in OTHER_TOOLS_FLAGS."""
    known = set().union(*OTHER_TOOLS_FLAGS.values())
    for name in LAUNCHERS:
        known |= launcher_flags(name) or set()
    unknown = []
    for doc in pages():
        for span in doc.spans():
            tokens = span.split()
            if tokens and tokens[0].startswith("--") and not any(launcher_of(tokens, i) for i in range(len(tokens))):
                unknown += [f"{doc.name}: {flag} (in `{span}`)" for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span)
                            if flag not in known]
    assert not unknown, ("flags that no launcher has (another tool's? add it to OTHER_TOOLS_FLAGS):\n"
                         + "\n".join(unknown))


def test_flags_are_found() -> None:
    """The command reader itself: the pages show flags of the main launchers (so a change in how
    commands are written cannot make the check above vacuous)."""
    shown = {(launcher, flag) for doc in pages() for launcher, flag, _ in flags_shown(doc)}
    for expected in [("finetune", "--deepspeed"), ("finetune", "--train_size"), ("run_suite", "--strategies"),
                     ("regime_study", "--table"), ("accelerate_finetune", "--chunks")]:
        assert expected in shown, expected


def test_config_table_matches_dataclass() -> None:
    from bidrop_ds.config import BiDropConfig

    text = page(ROOT / "docs" / "api.md").prose
    table = text[text.index("## `BiDropConfig` options"):]
    documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
    fields = [f.name for f in dataclasses.fields(BiDropConfig)]
    assert len(documented) == len(set(documented)), f"a field listed twice in docs/api.md: {documented}"
    assert set(documented) == set(fields), (f"docs/api.md's BiDropConfig table lacks {sorted(set(fields) - set(documented))} "
                                            f"and names {sorted(set(documented) - set(fields))}, not fields")


@pytest.mark.parametrize("text, expected", [
    ("torchrun --nproc_per_node 2 launch/finetune.py --deepspeed x.json --k 2",
     [("finetune", "--deepspeed"), ("finetune", "--k")]),
    ("python launch/run_suite.py --out o --ranks 2 -- --train_size 5",
     [("run_suite", "--out"), ("run_suite", "--ranks"), ("finetune", "--train_size")]),
    ("accelerate launch -m bidrop_ds.recipes.sft --lora_r=8", [("sft", "--lora_r")]),
    ("finetune.py --save_dir/--resume", [("finetune", "--save_dir"), ("finetune", "--resume")]),
    ("finetune.py: error: --model PATH: no such folder", []),
])
def test_command_reader(text: str, expected: list[tuple[str, str]]) -> None:
    doc = Page(ROOT / "x.md", "", [("bash", text + "\n")], "")
    assert [(launcher, flag) for launcher, flag, _ in flags_shown(doc)] == expected
