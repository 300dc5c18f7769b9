"""BiDropConfig: the one set of Bi-Drop settings, with the same names in Python, CLI flags and JSON.

Defaults are this project's choice (see README: the formulas are our specification of a paper
without public code). Every field is validated at construction; a bad value raises ValueError
naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

SCORES = ("product", "perturbation", "scaling", "random")
# Where the top-p threshold is taken: over all eligible elements at once, or within each tensor.
THRESHOLDS = ("global", "per_tensor")
# Mask rules on the same machinery (../shared/BIDROP.md, "Systems to compare against").
STRATEGIES = ("bidrop", "vanilla", "childtuning-d", "childtuning-f", "dps")
# The Bi-Drop ablations by name: strategy "bidrop-<score>" is strategy "bidrop" with that score.
ABLATIONS = {f"bidrop-{score}": score for score in SCORES if score != "product"}

# One repeated transformer block in a parameter name: `layer.3`, `layers.11`, `h.0`, `blocks.2`.
BLOCK = r"(layer|layers|h|block|blocks)\.\d+"
# Parameters of repeated transformer blocks: `encoder.layer.3.`, `layers.11.`, `h.0.`, `blocks.2.`.
DEFAULT_INCLUDE = (r"(^|\.)" + BLOCK + r"\.",)


@dataclass(frozen=True)
class BiDropConfig:
    """Settings of one Bi-Drop run.

    Field metadata carries the help text used for the CLI flags (`add_config_arguments`).
    """

    strategy: str = field(default="bidrop", metadata={
        "help": f"mask rule: one of {', '.join(STRATEGIES)}, or an ablation {', '.join(ABLATIONS)} "
                "(bidrop with that score)"})
    k: int | None = field(default=None, metadata={
        "help": "dropout passes per mini-batch (bidrop: default 2, 1 = vanilla fine-tuning; other strategies: 1)"})
    p: float = field(default=0.3, metadata={
        "help": "fraction of eligible elements updated each step (dps: of each parameter), in (0, 1]"})
    score: str = field(default="product", metadata={"help": f"element score: one of {', '.join(SCORES)}"})
    rescale: bool = field(default=False, metadata={
        "help": "divide the kept gradient of eligible elements by p (when a mask applies: k > 1 and p < 1); under "
                "Adam/AdamW the factor cancels in the update except through the optimizer's eps"})
    eps: float = field(default=1e-8, metadata={"help": "stabiliser in the score denominators, > 0"})
    threshold: str = field(default="global", metadata={
        "help": "bidrop: keep the top p of all eligible elements at once (global), or the top p of each eligible "
                "tensor (per_tensor; e.g. LoRA, whose zero-initialised lora_B otherwise takes the whole budget)"})
    include: tuple[str, ...] = field(
        default=DEFAULT_INCLUDE,
        metadata={"help": "regexes searched in parameter names; matching parameters are eligible for masking"},
    )
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "regexes searched in parameter names; matching parameters are never masked"}
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "seed of the per-pass dropout draws (None: torch's global RNG, in pass order)"},
    )
    dps_window: int = field(default=10, metadata={
        "help": "dps: steps per phase (U full-update steps gathering Fisher, then U masked steps)"})
    max_consecutive_skips: int = field(default=10, metadata={
        "help": "stop with SkipLimitError after this many non-finite steps in a row (0: never stop)"})
    allow_no_dropout: bool = field(default=False, metadata={
        "help": "let bidrop (k > 1) run on a model without active dropout, with a warning instead of an error"})

    def __post_init__(self) -> None:
        # Lists from JSON or callers become tuples, so the config stays hashable and immutable.
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                _fail(name, value, "a list of regular expressions")
            object.__setattr__(self, name, tuple(value))
        _check(isinstance(self.strategy, str) and (self.strategy in STRATEGIES or self.strategy in ABLATIONS),
               "strategy", self.strategy, f"one of {', '.join(STRATEGIES + tuple(ABLATIONS))}")
        if self.strategy in ABLATIONS:  # normalise the alias: strategy "bidrop" with that score
            ablated = ABLATIONS[self.strategy]
            _check(self.score in ("product", ablated), "score", self.score,
                   f"{ablated!r} (or unset) with strategy {self.strategy!r}")
            object.__setattr__(self, "strategy", "bidrop")
            object.__setattr__(self, "score", ablated)
        if self.k is None:
            object.__setattr__(self, "k", 2 if self.strategy == "bidrop" else 1)
        _check(isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1, "k", self.k,
               "an integer >= 1 (1 means vanilla fine-tuning)")
        _check(self.strategy == "bidrop" or self.k == 1, "k", self.k,
               f"1 with strategy {self.strategy!r} (only bidrop runs several passes per batch)")
        _check(_is_real(self.p) and 0.0 < self.p <= 1.0, "p", self.p, "a number in (0, 1]")
        _check(self.score in SCORES, "score", self.score, f"one of {', '.join(SCORES)}")
        _check(isinstance(self.rescale, bool), "rescale", self.rescale, "true or false")
        _check(self.threshold in THRESHOLDS, "threshold", self.threshold, f"one of {', '.join(THRESHOLDS)}")
        _check(self.threshold == "global" or self.strategy == "bidrop", "threshold", self.threshold,
               f"'global' with strategy {self.strategy!r} (per_tensor applies to bidrop)")
        _check(_is_real(self.eps) and self.eps > 0.0 and self.eps != float("inf"), "eps", self.eps,
               "a finite number > 0")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
               "seed", self.seed, "null or an integer")
        _check(_is_int(self.dps_window) and self.dps_window >= 1, "dps_window", self.dps_window, "an integer >= 1")
        _check(_is_int(self.max_consecutive_skips) and self.max_consecutive_skips >= 0, "max_consecutive_skips",
               self.max_consecutive_skips, "an integer >= 0 (0: never stop)")
        _check(isinstance(self.allow_no_dropout, bool), "allow_no_dropout", self.allow_no_dropout, "true or false")
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                if not isinstance(pattern, str):
                    _fail(name, pattern, "regular expressions given as strings")
                try:
                    re.compile(pattern)
                except re.error as err:
                    _fail(name, pattern, f"a valid regular expression ({err})")

    @property
    def masking(self) -> bool:
        """Whether steps are masked at all: vanilla, and bidrop with k = 1 or p = 1, are not."""
        if self.strategy == "bidrop":
            return self.k > 1 and self.p < 1.0
        return self.strategy != "vanilla" and self.p < 1.0

    def is_eligible(self, name: str) -> bool:
        """Whether the parameter called `name` (as `named_parameters()` gives it) may be masked."""
        return any(re.search(pat, name) for pat in self.include) and not any(
            re.search(pat, name) for pat in self.exclude
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["include"] = list(self.include)
        out["exclude"] = list(self.exclude)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BiDropConfig":
        """Build from a dict such as `to_dict()` gives; unknown keys are rejected by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"BiDropConfig: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"allowed keys are {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, path: str) -> "BiDropConfig":
        """Read a JSON file holding the config's keys."""
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict):
            raise ValueError(f"BiDropConfig: {path} must hold a JSON object, not {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BiDropConfig":
        """Build from the flags that `add_config_arguments` registered (a JSON file given with
        `--bidrop_config` supplies the defaults; flags given on the command line override it)."""
        data = cls.from_json(args.bidrop_config).to_dict() if getattr(args, "bidrop_config", None) else {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                data[f.name] = value
        return cls.from_dict(data)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Register one flag per BiDropConfig field (`--k`, `--p`, ..., same names as the fields),
    plus `--bidrop_config FILE.json`. Unset flags stay None so that the JSON file or the
    dataclass default applies."""
    group = parser.add_argument_group("Bi-Drop")
    group.add_argument("--bidrop_config", metavar="FILE.json", help="Bi-Drop settings as JSON (BiDropConfig keys)")
    for f in fields(BiDropConfig):
        default = f.default
        # the flags default to None (see above); "%(default).0s" prints nothing, and keeps
        # argparse.ArgumentDefaultsHelpFormatter from appending that None after the field's default
        helptext = f.metadata["help"] + ("" if f.name == "k" else f" (default: {default})") + "%(default).0s"
        if f.name in ("include", "exclude"):
            group.add_argument(f"--{f.name}", nargs="*", metavar="REGEX", help=helptext)
        elif f.name in ("rescale", "allow_no_dropout"):
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif f.name == "score":
            group.add_argument("--score", choices=SCORES, help=helptext)
        elif f.name == "threshold":
            group.add_argument("--threshold", choices=THRESHOLDS, help=helptext)
        elif f.name == "strategy":
            group.add_argument("--strategy", choices=STRATEGIES + tuple(ABLATIONS), help=helptext)
        else:
            kind = float if f.name in ("p", "eps") else int
            group.add_argument(f"--{f.name}", type=kind, help=helptext)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(name, value, allowed)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"BiDropConfig.{name} = {value!r} is not allowed: expected {allowed}")
