"""The argument parser of a recipe: a user's mistake is one line, not argparse's usage block."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are the one line `PROG: error: ... (see --help)` (exit 2),
    without the usage block (dozens of lines for a recipe) that argparse prints first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
