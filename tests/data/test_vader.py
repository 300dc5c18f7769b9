"""VADER ratings: parsing, the deterministic split, and the real download from PyPI."""

from __future__ import annotations

import io
import logging
import re
import tarfile
from pathlib import Path

import pytest

from bidrop_ds.data import vader
from bidrop_ds.data.vader import DOMAINS, Rated, ensure_vader_data, read_ratings, sentiment_splits


def write_ground_truth(cache: Path, rows: dict[str, list[tuple[str, float, str]]]) -> Path:
    """Write GroundTruth files in the published format (CRLF, no final newline) under `cache`."""
    folder = cache / "hutto_ICWSM_2014"
    folder.mkdir(parents=True)
    for domain, (stem, _) in DOMAINS.items():
        lines = [f"{i}\t{r}\t{t}" for i, r, t in rows.get(domain, [("1", 1.0, "fine.")])]
        (folder / f"{stem}_GroundTruth.txt").write_bytes("\r\n".join(lines).encode("utf-8"))
    return folder


def test_read_ratings_parses_crlf_tabs_and_unicode(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes("7\t2.26666666667\tThe Rock is ''destined''\r\n8_1\t-0.6\tcafé \x1c tepid\r\n".encode())
    assert read_ratings(path) == [Rated("7", 2.26666666667, "The Rock is ''destined''"),
                                  Rated("8_1", -0.6, "café \x1c tepid")]


@pytest.mark.parametrize("line, problem", [
    (b"3\t1.0", "expected 3 tab-separated columns"),
    (b"3\t1.0\ta\tb", "expected 3 tab-separated columns"),
    (b"3\tgood\ttext", "'good' is not a number"),
    (b"3\t4.5\ttext", "'4.5' is not a number in [-4, 4]"),
    (b"3\tnan\ttext", "'nan' is not a number"),
    (b"3\t1.0\t  ", "empty text"),
    (b"\t1.0\ttext", "empty id"),
    (b"3\t1.0\tcaf\xe9", "not valid UTF-8"),
])
def test_read_ratings_names_file_and_line(tmp_path: Path, line: bytes, problem: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"1\t0.5\tfine\r\n2\t-1\talso fine\r\n" + line + b"\r\n")
    with pytest.raises(ValueError, match=rf"bad\.txt:3: .*{re.escape(problem)}"):
        read_ratings(path)


# One malformed row of each kind between two good ones (lines 1 and 6), CRLF as published.
MIXED = (b"1\t0.5\tfine\r\n"
         b"2\t1.0\r\n"  # line 2: two columns
         b"3\tgood\ttext\r\n"  # line 3: the rating is not a number
         b"4\t-1\t \r\n"  # line 4: empty text
         b"5\t1\tcaf\xe9 au lait\r\n"  # line 5: Latin-1, not UTF-8
         b"6\t-2\talso fine")


def test_read_ratings_skips_and_counts_malformed_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mixed.txt"
    path.write_bytes(MIXED)
    with caplog.at_level(logging.WARNING, logger="bidrop_ds.data.text"):
        rows = read_ratings(path, bad_rows="skip")
    assert rows == [Rated("1", 0.5, "fine"), Rated("6", -2.0, "also fine")]
    assert caplog.messages == [f"skipped 4 malformed rows in {path} (first at line 2: expected 3 tab-separated "
                               "columns (id, rating, text), found 2)"]


def test_read_ratings_errors_at_the_first_malformed_row_and_says_how_to_skip(tmp_path: Path) -> None:
    path = tmp_path / "mixed.txt"
    path.write_bytes(MIXED)
    with pytest.raises(ValueError) as raised:
        read_ratings(path)  # the default is bad_rows="error"
    assert str(raised.value) == (f"{path}:2: expected 3 tab-separated columns (id, rating, text), found 2; fix or "
                                 "delete that line, or skip malformed rows with bad_rows='skip' (finetune.py: "
                                 "--bad_rows skip)")
    path.write_bytes(b"1\t0.5\tfine\n5\t1\tcaf\xe9\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid UTF-8 (b'\\xe9' at byte 8 of the line: ")):
        read_ratings(path)


def test_a_file_of_only_malformed_rows_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"1\tx\ttext\n2\t1.0\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no rows (malformed rows skipped: 2)")):
        read_ratings(path, bad_rows="skip")
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no rows")):
        read_ratings(path, bad_rows="skip")
    with pytest.raises(ValueError, match="bad_rows='ignore': expected one of 'error', 'skip'"):
        read_ratings(path, bad_rows="ignore")


def test_sentiment_splits_pass_bad_rows_through(tmp_path: Path) -> None:
    rows = [(f"m{i}", 1.5 if i % 2 else -1.5, f"sentence {i}") for i in range(20)]
    rows[7] = ("m7", "n/a", "an unrated sentence")  # line 8
    write_ground_truth(tmp_path, {"movie": rows})
    with pytest.raises(ValueError, match=r"movieReviewSnippets_GroundTruth\.txt:8: rating 'n/a' is not a number"):
        sentiment_splits("movie", cache_dir=tmp_path)
    splits = sentiment_splits("movie", cache_dir=tmp_path, bad_rows="skip")
    assert {name: len(s) for name, s in splits.items()} == {"train": 17, "validation": 1, "test": 1}
    assert "m7" not in [i for split in splits.values() for i in split["id"]]


def test_sentiment_splits_labels_filter_and_determinism(tmp_path: Path) -> None:
    ratings = [(-3.0 + 0.25 * i) for i in range(25)]  # -3.0 .. 3.0; -0.25, 0, 0.25 are near-neutral
    rows = [(f"m{i}", r, f"sentence {i}") for i, r in enumerate(ratings)]
    write_ground_truth(tmp_path, {"movie": rows})
    splits = sentiment_splits("movie", min_abs_rating=0.5, seed=3, cache_dir=tmp_path)

    assert list(splits) == ["train", "validation", "test"]
    assert {name: len(s) for name, s in splits.items()} == {"train": 18, "validation": 2, "test": 2}
    assert splits["train"].column_names == ["text", "label", "rating", "id"]
    every = [row for split in splits.values() for row in split]
    assert sorted(r["id"] for r in every) == sorted(i for i, r, _ in rows if abs(r) >= 0.5)
    assert all(r["label"] == (r["rating"] > 0) for r in every)
    assert splits["train"].features["label"].names == ["negative", "positive"]

    again = sentiment_splits("movie", min_abs_rating=0.5, seed=3, cache_dir=tmp_path)
    other = sentiment_splits("movie", min_abs_rating=0.5, seed=4, cache_dir=tmp_path)
    assert again["test"]["id"] == splits["test"]["id"]
    assert other["train"]["id"] != splits["train"]["id"]


def test_sentiment_splits_rejects_unknown_domain_and_too_few_rows(tmp_path: Path) -> None:
    write_ground_truth(tmp_path, {"nyt": [(str(i), 1.0, "x") for i in range(9)]})
    with pytest.raises(ValueError, match="unknown VADER domain 'imdb'"):
        sentiment_splits("imdb", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"VADER nyt \(.*nytEditorialSnippets_GroundTruth\.txt\): only 9 rows"):
        sentiment_splits("nyt", cache_dir=tmp_path)


def test_ensure_vader_data_uses_a_complete_cache_without_pip(tmp_path: Path, monkeypatch) -> None:
    folder = write_ground_truth(tmp_path, {})
    monkeypatch.setattr(vader, "_pip_download", _no_network)
    monkeypatch.setenv("BIDROP_DATA_DIR", str(tmp_path))
    assert ensure_vader_data() == folder


def test_ensure_vader_data_refuses_an_incomplete_cache(tmp_path: Path, monkeypatch) -> None:
    folder = write_ground_truth(tmp_path, {})
    (folder / "tweets_GroundTruth.txt").unlink()
    monkeypatch.setattr(vader, "_pip_download", _no_network)
    with pytest.raises(RuntimeError, match="lacks tweets_GroundTruth.txt"):
        ensure_vader_data(tmp_path)


def test_failed_pip_leaves_no_cache_and_says_what_to_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(vader, "SDIST", "vaderSentiment==0.0.0.dev0-no-such-version")
    with pytest.raises(RuntimeError, match=r"Run it by hand to see why: .* -m pip download --no-deps"):
        ensure_vader_data(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _no_network(dest: Path) -> Path:
    raise AssertionError("a complete cache must not trigger a download")


def fake_sdist(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    """An sdist tarball whose additional_resources/hutto_ICWSM_2014.tar.gz holds `members`."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        archive.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def _ground_truth_members(movie: bytes = b"1\t1.5\tgood\r\n2\t-2\tbad") -> dict[str, bytes]:
    members = {f"hutto_ICWSM_2014/{stem}_GroundTruth.txt": b"1\t1.5\tgood\r\n2\t-2\tbad"
               for stem, _ in DOMAINS.values()}
    members["hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"] = movie
    return members


def _offline_download(monkeypatch, tmp_path: Path, members: dict[str, bytes], **links: str) -> None:
    sdist = fake_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz", members, links.get("symlinks"))
    monkeypatch.setattr(vader, "_pip_download", lambda dest: sdist)
    for domain in DOMAINS:  # the fake files hold 2 rows each
        monkeypatch.setitem(DOMAINS, domain, (DOMAINS[domain][0], 2))


def test_extraction_reads_only_the_four_files(tmp_path: Path, monkeypatch) -> None:
    members = {**_ground_truth_members(), "../escaped.txt": b"x", "/tmp/absolute.txt": b"x",
               "hutto_ICWSM_2014/vader_sentiment_lexicon.txt": b"x"}
    _offline_download(monkeypatch, tmp_path, members)
    folder = ensure_vader_data(tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}_GroundTruth.txt" for s, _ in DOMAINS.values())
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hutto_ICWSM_2014"]
    assert not (tmp_path / "escaped.txt").exists()
    assert read_ratings(folder / "movieReviewSnippets_GroundTruth.txt")[1] == Rated("2", -2.0, "bad")


def test_a_link_member_is_refused(tmp_path: Path, monkeypatch) -> None:
    members = _ground_truth_members()
    del members["hutto_ICWSM_2014/tweets_GroundTruth.txt"]
    _offline_download(monkeypatch, tmp_path, members,
                      symlinks={"hutto_ICWSM_2014/tweets_GroundTruth.txt": "/etc/passwd"})
    with pytest.raises(RuntimeError, match="tweets_GroundTruth.txt is not a regular file"):
        ensure_vader_data(tmp_path / "cache")


def test_a_broken_download_is_never_cached(tmp_path: Path, monkeypatch) -> None:
    _offline_download(monkeypatch, tmp_path, _ground_truth_members(movie=b"1\t1.5\tgood\r\n2\t-2"))
    with pytest.raises(ValueError, match=r"movieReviewSnippets_GroundTruth.txt:2: expected 3"):
        ensure_vader_data(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written folder, no temp left


def test_real_sdist_download_and_row_counts(tmp_path: Path) -> None:
    """The real thing: pip downloads the sdist from PyPI, the nested tarball is read, all rows parse."""
    folder = ensure_vader_data(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hutto_ICWSM_2014"]  # no temp left over
    published = {"movie": 10605, "tweets": 4200, "amazon": 3708, "nyt": 5190}
    assert {d: len(read_ratings(vader.ground_truth_file(folder, d))) for d in DOMAINS} == published
    splits = sentiment_splits("movie", cache_dir=tmp_path / "cache")
    assert {name: len(s) for name, s in splits.items()} == {"train": 8058, "validation": 1007, "test": 1007}
    assert abs(sum(splits["train"]["label"]) / len(splits["train"]) - 0.494) < 0.001
