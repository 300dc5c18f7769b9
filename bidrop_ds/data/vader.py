"""Human-rated sentiment sentences from the VADER paper, as an offline-friendly classification task.

Hutto & Gilbert (ICWSM 2014) had every sentence rated by humans on [-4, 4]; the mean ratings ship
inside the `vaderSentiment==3.3.2` sdist on PyPI (`additional_resources/hutto_ICWSM_2014.tar.gz`).
The movie set holds 10,605 Rotten Tomatoes snippets (the sentences SST was built from). This is
not GLUE and carries no official splits, so the split below is ours:

- label = 1 if the mean rating is > 0 else 0 ("positive" / "negative");
- rows with |rating| < `min_abs_rating` (default 0.5: near-neutral, the raters disagree on the
  sign) are dropped;
- the remaining rows, in file order, are shuffled by `random.Random(seed).shuffle` and cut into
  validation = test = floor(n / 10) rows, the rest train (validation first, then test, then train).

Resulting sizes with the defaults (min_abs_rating=0.5, seed=0), rows kept / train / validation / test:
movie 10,072 / 8,058 / 1,007 / 1,007 (49.6% positive); tweets 3,432 / 2,746 / 343 / 343;
amazon 2,985 / 2,389 / 298 / 298; nyt 2,970 / 2,376 / 297 / 297.
"""

from __future__ import annotations

import io
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple

import datasets

from bidrop_ds.data.text import MalformedRows, read_tsv_rows

SDIST = "vaderSentiment==3.3.2"
_SDIST_FILE = "vaderSentiment-3.3.2.tar.gz"
_INNER_TARBALL = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_INNER_DIR = "hutto_ICWSM_2014"

# domain -> (file stem, rows in the published file; checked after extraction)
DOMAINS: dict[str, tuple[str, int]] = {
    "movie": ("movieReviewSnippets", 10605),
    "tweets": ("tweets", 4200),
    "amazon": ("amazonReviewSnippets", 3708),
    "nyt": ("nytEditorialSnippets", 5190),
}

FEATURES = datasets.Features({
    "text": datasets.Value("string"),
    "label": datasets.ClassLabel(names=["negative", "positive"]),
    "rating": datasets.Value("float32"),
    "id": datasets.Value("string"),
})


class Rated(NamedTuple):
    """One row of a GroundTruth file: sentence id, mean human rating in [-4, 4], sentence."""

    id: str
    rating: float
    text: str


def ground_truth_file(folder: Path, domain: str) -> Path:
    if domain not in DOMAINS:
        raise ValueError(f"unknown VADER domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    return folder / f"{DOMAINS[domain][0]}_GroundTruth.txt"


def default_cache_dir() -> Path:
    """`$BIDROP_DATA_DIR` if set, else `~/.cache/bidrop_ds/vader`."""
    env = os.environ.get("BIDROP_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "bidrop_ds" / "vader"


def read_ratings(path: str | os.PathLike[str], bad_rows: str = "error") -> list[Rated]:
    """Parse a GroundTruth file (UTF-8, tab-separated `id, rating, text`, CRLF or LF, no header).

    A malformed row (not 3 columns, a rating that is not a number in [-4, 4], an empty id or text,
    not UTF-8) raises ValueError naming the file and 1-based line (`bad_rows="error"`), so a
    truncated or corrupted download is reported, not silently trained on; `bad_rows="skip"` drops
    such rows and logs how many. A file without any valid row is always an error.
    """
    malformed = MalformedRows(path, bad_rows)
    rows = []
    for number, fields in read_tsv_rows(path, malformed):
        if len(fields) != 3:
            malformed.flag(number, f"expected 3 tab-separated columns (id, rating, text), found {len(fields)}")
            continue
        ident, rating_text, text = fields
        try:
            rating = float(rating_text)
        except ValueError:
            rating = math.nan
        if not -4.0 <= rating <= 4.0:
            malformed.flag(number, f"rating {rating_text!r} is not a number in [-4, 4]")
        elif not ident.strip() or not text.strip():
            malformed.flag(number, f"empty {'id' if not ident.strip() else 'text'}")
        else:
            rows.append(Rated(ident, rating, text))
    skipped = malformed.finish()
    if not rows:
        raise ValueError(f"{path}: no rows" + (f" (malformed rows skipped: {skipped})" if skipped else ""))
    return rows


def ensure_vader_data(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return `<cache_dir>/hutto_ICWSM_2014`, holding the four GroundTruth files, downloading the
    sdist with pip first if it is not there yet.

    The files are written to a temporary folder beside the target, checked (every row parses, row
    counts as published) and renamed into place, so an interrupted download is never taken as
    complete, and concurrent callers (several ranks) both end up with one complete copy.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / _INNER_DIR
    if target.exists():
        missing = [p.name for p in (ground_truth_file(target, d) for d in DOMAINS) if not p.is_file()]
        if missing:
            raise RuntimeError(f"{target} exists but lacks {', '.join(missing)}; delete it to re-download")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    print(f"bidrop_ds: downloading the {SDIST} sdist from PyPI to extract the VADER ratings into {target}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        staging = Path(tmp) / _INNER_DIR
        staging.mkdir()
        _extract_ground_truth(_pip_download(Path(tmp)), staging)
        for domain, (_, expected) in DOMAINS.items():
            found = len(read_ratings(ground_truth_file(staging, domain)))
            if found != expected:
                raise RuntimeError(f"{SDIST}: {domain} has {found} rows, expected {expected}")
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not just another process finishing first
                raise
    return target


def _pip_download(dest: Path) -> Path:
    """Download the sdist into `dest` with this interpreter's pip; return the tarball's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
               "-d", str(dest)]
    done = subprocess.run(command, capture_output=True, text=True)
    sdist = dest / _SDIST_FILE
    if done.returncode != 0 or not sdist.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
        raise RuntimeError(
            f"pip could not download {SDIST} (exit {done.returncode}):\n{tail}\n"
            f"Run it by hand to see why: {' '.join(command[:-1])} DIR\n"
            f"or set BIDROP_DATA_DIR to a folder whose {_INNER_DIR}/ holds the *_GroundTruth.txt files."
        )
    return sdist


def _extract_ground_truth(sdist: Path, dest: Path) -> None:
    """Copy the four GroundTruth members of the nested tarball into `dest`.

    Members are looked up by their known names and written under names we choose, and only regular
    files are read, so no member path (`..`, absolute, links) can write outside `dest`.
    """
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = _read_member(outer, _INNER_TARBALL, sdist)
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for domain in DOMAINS:
            path = ground_truth_file(dest, domain)
            path.write_bytes(_read_member(inner, f"{_INNER_DIR}/{path.name}", sdist))


def _read_member(archive: tarfile.TarFile, name: str, source: Path) -> bytes:
    try:
        member = archive.getmember(name)
    except KeyError:
        raise RuntimeError(f"{source}: no member {name}") from None
    handle = archive.extractfile(member) if member.isfile() else None
    if handle is None:
        raise RuntimeError(f"{source}: {name} is not a regular file")
    with handle:
        return handle.read()


def sentiment_splits(domain: str = "movie", min_abs_rating: float = 0.5, seed: int = 0,
                     cache_dir: str | os.PathLike[str] | None = None,
                     bad_rows: str = "error") -> datasets.DatasetDict:
    """Binary sentiment train/validation/test splits of one VADER domain (rule in the module doc).

    Columns: `text`, `label` (0 negative, 1 positive), `rating` (mean human rating), `id`.
    `bad_rows` is passed to `read_ratings`; too few rows for three non-empty splits is an error.
    """
    path = ground_truth_file(ensure_vader_data(cache_dir), domain)
    rows = [r for r in read_ratings(path, bad_rows) if abs(r.rating) >= min_abs_rating]
    random.Random(seed).shuffle(rows)
    cut = len(rows) // 10
    if cut == 0:
        raise ValueError(f"VADER {domain} ({path}): only {len(rows)} rows with |rating| >= {min_abs_rating}; "
                         "need at least 10 for a 80/10/10 split (the validation and test splits would be empty)")
    splits = {"train": rows[2 * cut:], "validation": rows[:cut], "test": rows[cut:2 * cut]}
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict(
            {"text": [r.text for r in part], "label": [int(r.rating > 0) for r in part],
             "rating": [r.rating for r in part], "id": [r.id for r in part]},
            features=FEATURES,
        )
        for name, part in splits.items()
    })
