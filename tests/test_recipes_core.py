"""The shared converter core: deterministic row -> shard assignment, resume, dry runs, parallel workers,
error accounting, and the row sources (parquet across row groups and files, webdataset tars)."""

from __future__ import annotations

import json
import os

import pytest

from cologen.testing import recipe_fixtures as F
from data_recipes import _writer, omniedit
from data_recipes._rows import RowContext, Sample, Skip
from data_recipes._sources import ListSource, ParquetSource, TarSource
from data_recipes._writer import Job, run, run_jobs


def _omniedit_input(tmp_path, n=10):
    # Two files with 4-row groups, so shards of 3 rows straddle row groups and files.
    table = F.omniedit_table(n, bad=True)
    half = table.num_rows // 2
    F.write_parquet(table.slice(0, half), tmp_path / "in" / "train-00000-of-00002.parquet")
    F.write_parquet(table.slice(half), tmp_path / "in" / "train-00001-of-00002.parquet")
    return str(tmp_path / "in")


def _tars(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _convert(inp, out, *extra):
    return omniedit.main(["--input", inp, "--output", str(out), "--shard-size", "3", "--quiet", *extra])


def test_parquet_source_ranges_cross_row_groups_and_files(tmp_path):
    inp = _omniedit_input(tmp_path)
    src = ParquetSource(sorted((tmp_path / "in").glob("*.parquet")), columns=["omni_edit_id", "nope"], batch_size=3)
    assert src.columns == ["omni_edit_id"] and src.num_rows() == 13
    everything = [(i, r["omni_edit_id"]) for i, r in src.iter_rows()]
    assert [i for i, _ in everything] == list(range(13))
    for start, stop in [(0, 3), (3, 6), (5, 9), (6, 13), (12, None), (13, None)]:
        assert list((i, r["omni_edit_id"]) for i, r in src.iter_rows(start, stop)) == everything[start:stop]
    assert inp


def test_tar_source_groups_members_and_ranges(tmp_path):
    F.t2i_tars(tmp_path / "t", n_tars=2, per_tar=3, bad=True)
    src = TarSource(sorted((tmp_path / "t").glob("*.tar")))
    assert src.num_rows() == 8
    rows = list(src.iter_rows())
    assert [i for i, _ in rows] == list(range(8))
    assert set(rows[0][1]) == {"__key__", "__url__", "jpg", "json"} and json.loads(rows[0][1]["json"])["prompt"]
    assert [r["__key__"] for _, r in src.iter_rows(2, 5)] == [r["__key__"] for _, r in rows[2:5]]


def test_resume_skips_finished_shards_and_redoes_broken_ones(tmp_path):
    inp = _omniedit_input(tmp_path)
    reference = tmp_path / "reference"
    first = _convert(inp, reference)
    assert first.shards_written == 5 and first.samples == 11
    expected = _tars(reference)

    out = tmp_path / "out"
    _convert(inp, out)
    # A crash mid-shard leaves a temp file and no progress record; a deleted tar must be redone too.
    (out / "omniedit-000002.tar").rename(out / "omniedit-000002.tar.tmp")
    (out / "_progress" / "omniedit-000002.json").unlink()
    (out / "omniedit-000004.tar").unlink()
    kept = os.stat(out / "omniedit-000000.tar").st_mtime_ns
    again = _convert(inp, out)
    assert again.shards_written == 2 and again.shards_resumed == 3 and again.rows_this_run == 4
    assert again.samples == 11 and again.skipped == first.skipped  # totals include the resumed shards
    assert os.stat(out / "omniedit-000000.tar").st_mtime_ns == kept
    assert _tars(out) == expected  # byte-identical to the uninterrupted conversion
    assert not list(out.glob("*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 11 and summary["shards_resumed"] == 3


def test_max_samples_is_a_dry_run_that_a_full_run_completes(tmp_path):
    inp = _omniedit_input(tmp_path)
    out = tmp_path / "out"
    dry = _convert(inp, out, "--max-samples", "4")
    assert dry.samples == 4 and len(F.read_samples(out)) == 4
    progress = json.loads((out / "_progress" / "omniedit-000001.json").read_text())
    assert progress["complete"] is False  # cut before its last row
    full = _convert(inp, out)
    assert full.shards_resumed == 1 and full.samples == 11
    _convert(inp, tmp_path / "reference")
    assert _tars(out) == _tars(tmp_path / "reference")


def test_holdout_splits_the_rows_into_two_disjoint_folders(tmp_path):
    inp = _omniedit_input(tmp_path)
    _convert(inp, tmp_path / "all")
    everything = {s["__key__"] for s in F.read_samples(tmp_path / "all")}
    train = _convert(inp, tmp_path / "train", "--holdout", "train", "--holdout-fraction", "0.3")
    val = _convert(inp, tmp_path / "val", "--holdout", "val", "--holdout-fraction", "0.3")
    train_keys = {s["__key__"] for s in F.read_samples(tmp_path / "train")}
    val_keys = {s["__key__"] for s in F.read_samples(tmp_path / "val")}
    assert train_keys and val_keys and not train_keys & val_keys
    assert train_keys | val_keys == everything  # every row on exactly one side
    held = sum(_writer.held_out(i, 0.3) for i in range(train.rows_read))
    assert train.skipped["held out for validation"] == held and val.skipped["not held out"] == train.rows_read - held


def test_workers_give_the_same_shards(tmp_path):
    inp = _omniedit_input(tmp_path)
    _convert(inp, tmp_path / "one")
    summary = _convert(inp, tmp_path / "two", "--workers", "2")
    assert summary.samples == 11 and summary.shards_written == 5
    assert _tars(tmp_path / "one") == _tars(tmp_path / "two")


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_job_runner_pools_closures_by_fork_and_module_functions_by_spawn_on_macos(monkeypatch, platform):
    monkeypatch.setattr(_writer.sys, "platform", platform)
    assert _writer._spawn_needed(abs) is (platform == "darwin")
    assert not _writer._spawn_needed(lambda j: j)  # a closure cannot be sent to a spawned worker: fork
    results, offset = [], 10
    run_jobs(abs, [-1, -2, 3], workers=2, desc="t", on_done=results.append, progress=False)
    run_jobs(lambda j: j + offset, [1, 2], workers=2, desc="t", on_done=results.append, progress=False)
    assert sorted(results) == [1, 2, 3, 11, 12]


def test_unexpected_errors_are_counted_not_fatal(tmp_path):
    def convert(row, ctx: RowContext):
        if row["i"] == 1:
            raise Skip("bad row")
        if row["i"] == 2:
            raise KeyError("surprise")
        if row["i"] == 3:
            ctx.skip("half a row")
        yield Sample(ctx.key(), {"task": "t2i", "prompt": "p", "width": 1, "height": 1}, {"image.png": b"x"})

    job = Job(ListSource([{"i": i} for i in range(5)]), convert, tmp_path / "out", prefix="t", shard_size=2)
    summary = run(job, progress=False)
    assert summary.samples == 3 and summary.rows_skipped == 2
    assert summary.skipped == {"bad row": 1, "error: KeyError": 1, "half a row": 1}
    strict = Job(ListSource([{"i": i} for i in range(5)]), convert, tmp_path / "strict", strict=True)
    with pytest.raises(KeyError):
        run(strict, progress=False)


def test_keys_with_dots_are_refused():
    with pytest.raises(ValueError, match="dots"):
        Sample("a.b", {}).members()
