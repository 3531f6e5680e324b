"""Shards that lost members never read as clean, shorter shards: every writer puts a manifest beside its shard, the
loader counts a short shard (`truncated`) and never delivers a key twice, the validator compares each shard with
its manifest, and every failure is counted once, in the right category, with a one-line reason."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from cologen.data.datamodule import MixtureDataModule
from cologen.data.manifest import ShardWriter, file_sha256, manifest_path, read_manifest
from cologen.data.reader import ShardReader
from cologen.data.skips import SkipCounter
from cologen.testing import recipe_fixtures as F
from data_recipes import check, omniedit
from data_recipes.shapeworld import ShapeWorldConfig, make_sample, subject_pool


def _good(root, n, task="inpainting"):
    url = str(Path(root) / task / "train-0000.tar")
    return list(wds.tarfile_samples([{"url": url}]))[:n]


def _members(sample):
    return sorted((k, v) for k, v in sample.items() if not k.startswith("__"))


def _shard(path, samples, keys=None):
    """A shard (with its manifest) of `samples` renamed good-t000, good-t001, ..."""
    keys = keys or [f"good-t{i:03d}" for i in range(len(samples))]
    with ShardWriter(path) as w:
        for key, s in zip(keys, samples):
            w.write(key, _members(s))
    return str(path)


def _offsets(path):
    """(key, header offset) of every member, in order."""
    with tarfile.open(path) as tf:
        return [(m.name.split(".")[0], m.offset, m.offset_data, m.size) for m in tf.getmembers()]


def _cut(path, at):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:at])


def _first_member_of(path, key):
    return next(o for o in _offsets(path) if o[0] == key)


def _read(url):
    problems = []
    keys = [s["__key__"] for s in ShardReader(problems.append).read(url)]
    return keys, [(p.category, p.key, p.reason) for p in problems]


# ------------------------------------------------------------------------------------------------- writers


def test_every_writer_puts_a_manifest_beside_its_shard(shapeworld_dir, tmp_path):
    shards = sorted(Path(shapeworld_dir).rglob("*.tar"))
    assert shards
    for shard in shards:
        m = read_manifest(str(shard))
        keys = [s["__key__"] for s in wds.tarfile_samples([{"url": str(shard)}])]
        assert m is not None and m.url == shard.name and list(m.keys) == keys and m.nsamples == len(keys)
        assert m.filesize == shard.stat().st_size and m.sha256 == file_sha256(shard)
    index = json.loads(Path(manifest_path(shards[0])).read_text())  # webdataset's wids shard index format
    assert index["__kind__"] == "wids-shard-index-v1" and index["shardlist"][0]["nsamples"] == 30
    out = tmp_path / "omniedit"
    omniedit.main(["--input", str(F.write_parquet(F.omniedit_table(5), tmp_path / "in" / "t.parquet")),
                   "--output", str(out), "--shard-size", "2", "--quiet"])
    for shard in sorted(out.glob("*.tar")):
        m = read_manifest(str(shard))
        assert m is not None and list(m.keys) == [s["__key__"] for s in F.read_samples(out) if
                                                  s["__shard__"] == shard.name]


def test_shapeworld_bytes_are_webdataset_tarwriters(tmp_path):
    """The common writer keeps ShapeWorld's shards byte for byte what webdataset's TarWriter wrote."""
    cfg = ShapeWorldConfig()
    for task in ("customized", "editing"):
        pool = subject_pool(cfg) if task == "customized" else None
        samples = [make_sample(cfg, task, "train", i, 3, pool) for i in range(4)]
        with wds.TarWriter(str(tmp_path / f"{task}-ref.tar"), encoder=False, mtime=0, user="shapeworld",
                           group="shapeworld") as sink:
            for s in samples:
                sink.write(s)
        with ShardWriter(tmp_path / f"{task}.tar", user="shapeworld", group="shapeworld") as w:
            for s in samples:
                w.write(s["__key__"], _members(s))
        assert (tmp_path / f"{task}.tar").read_bytes() == (tmp_path / f"{task}-ref.tar").read_bytes()


def test_writer_refuses_a_key_twice(tmp_path):
    w = ShardWriter(tmp_path / "a.tar")
    w.write("k", [("json", b"{}")])
    with pytest.raises(ValueError, match="written twice"):
        w.write("k", [("json", b"{}")])
    w.abort()
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("where", ["member boundary", "inside a header", "inside a member"])
def test_a_cut_shard_is_truncated_once_and_placed_after_the_right_key(shapeworld_dir, tmp_path, where):
    url = _shard(tmp_path / "s.tar", _good(shapeworld_dir, 14))
    _, header, data, size = _first_member_of(url, "good-t010")
    _cut(url, {"member boundary": header, "inside a header": header + 100, "inside a member": data + size // 2}[where])
    keys, problems = _read(url)
    assert keys == [f"good-t{i:03d}" for i in range(10)]
    assert len(problems) == 1, problems  # one failure, counted once (no separate tar error)
    category, place, reason = problems[0]
    assert category == "truncated" and place == "after good-t009"
    assert reason.startswith("s.tar: 10 of 14 samples (missing good-t010, good-t011, good-t012 and 1 more)")
    assert "\n" not in reason

    assert check.main([url]) == 1  # the validator no longer passes a short shard


def test_the_loader_counts_truncated_shards_and_keeps_going(shapeworld_dir, tmp_path):
    good = _good(shapeworld_dir, 20)
    cut = _shard(tmp_path / "cut.tar", good[:10])
    _cut(cut, _first_member_of(cut, "good-t006")[1])
    whole = _shard(tmp_path / "whole.tar", good[10:], keys=[f"whole-{i}" for i in range(10)])
    dm = MixtureDataModule({"inpainting": [cut, whole]}, {"inpainting": 1.0}, batch_size=4, num_workers=0,
                           batches_per_epoch=10, shuffle_buffer=0, resampled=False)
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert len(keys) == 40 and all(k.startswith(("good-t00", "whole-")) for k in keys)
    counts = dm.bad_samples
    assert counts["truncated"] >= 2 and counts["total"] == counts["truncated"], counts  # once per read, nothing else


def test_a_cut_inside_a_member_without_a_manifest_is_one_tar_error(shapeworld_dir, tmp_path):
    path = tmp_path / "plain.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:  # someone else's shard: no manifest
        for i, s in enumerate(_good(shapeworld_dir, 6)):
            sink.write({"__key__": f"good-t{i:03d}", **dict(_members(s))})
    _, _, data, size = _first_member_of(str(path), "good-t004")
    _cut(path, data + size // 2)
    counter = SkipCounter()
    reader = ShardReader(counter)
    keys = [s["__key__"] for s in reader.read(str(path))]
    assert keys == [f"good-t{i:03d}" for i in range(4)] and reader.last.place() == "after good-t003"
    assert counter.by_category()["tar"] == 1 and counter.total() == 1  # today: 2, iterator and expander each


# ---------------------------------------------------------------------------------------------- duplicates


def test_duplicate_keys_and_members_are_never_delivered_twice(shapeworld_dir, tmp_path, capsys):
    good = _good(shapeworld_dir, 6)
    path = tmp_path / "dup.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for key, s in [("a", good[0]), ("b", good[1]), ("a", good[2]), ("c", good[3])]:
            sink.write({"__key__": key, **dict(_members(s))})
    with tarfile.open(path, "a") as tf:  # a sample whose record appears twice
        for name, data in [("d.json", good[4]["json"]), ("d.image.png", good[4]["image.png"]),
                           ("d.json", good[5]["json"])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    keys, problems = _read(str(path))
    assert keys == ["a", "b", "c"]
    assert [(c, k) for c, k, _ in problems] == [("duplicate", "a"), ("duplicate", "d")]
    assert all("\n" not in r and "dict_keys" not in r for _, _, r in problems)  # one line, no tuple repr

    dm = MixtureDataModule({"inpainting": str(path)}, {"inpainting": 1.0}, val_shards={"inpainting": str(path)},
                           val_tasks=["inpainting"], num_workers=0, val_samples_per_task=10, batch_size=2, batches_per_epoch=3,
                           shuffle_buffer=0, resampled=False)
    val_keys = [k for loader in dm.val_dataloader() for b in loader for k in b["key"]]
    assert sorted(val_keys) == ["a", "b", "c"]  # today: a, a, b, c, d
    train_keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert train_keys == ["a", "b", "c", "a", "b", "c"]  # pass after pass, each key once per pass
    assert dm.bad_samples["duplicate"] >= 2 and dm.bad_samples["tar"] == 0

    assert check.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "dup.tar a [duplicate] a appears again in dup.tar; delivered once" in out
    assert "dup.tar d [duplicate] a member of d appears twice in dup.tar" in out


# ------------------------------------------------------------------------------------------- categories


def test_a_zero_byte_image_is_a_decode_error_in_one_line(shapeworld_dir, tmp_path, capsys):
    good = _good(shapeworld_dir, 2)
    url = _shard(tmp_path / "z.tar", [dict(good[0], **{"image.png": b""}), good[1]])
    assert check.main([url]) == 1
    out = capsys.readouterr().out
    assert "z.tar good-t000 [decode] image.png is empty (0 bytes)" in out
    assert "[build]" not in out and "error:" not in out


def test_the_validator_checks_shards_against_their_manifests(shapeworld_dir, tmp_path, capsys):
    good = _good(shapeworld_dir, 4)
    url = _shard(tmp_path / "m.tar", good)
    assert check.main([url]) == 0
    capsys.readouterr()
    # the same number of samples, but other keys and other bytes
    with ShardWriter(tmp_path / "other.tar") as w:
        for key, s in zip(["good-t000", "good-t001", "good-t002", "intruder"], good):
            w.write(key, _members(s))
    Path(url).write_bytes((tmp_path / "other.tar").read_bytes())
    assert check.main([url]) == 1
    out = capsys.readouterr().out
    assert "m.tar (manifest) [manifest] 1 samples not in the manifest: intruder" in out
    assert "m.tar (manifest) [manifest] 1 samples of the manifest are missing: good-t003" in out
    assert "[manifest] the shard's sha256 differs from its manifest's" in out


def test_shards_without_a_manifest_load_with_one_warning_and_can_get_one(shapeworld_dir, tmp_path, caplog):
    good = _good(shapeworld_dir, 8)
    urls = []
    for n in range(2):
        path = tmp_path / f"old-{n}.tar"
        with wds.TarWriter(str(path), encoder=False) as sink:
            for i, s in enumerate(good[4 * n: 4 * n + 4]):
                sink.write({"__key__": f"k{n}{i}", **dict(_members(s))})
        urls.append(str(path))
    dm = MixtureDataModule({"inpainting": urls}, {"inpainting": 1.0}, num_workers=0, batch_size=4,
                           batches_per_epoch=2, shuffle_buffer=0, resampled=False)
    with caplog.at_level(logging.WARNING, logger="cologen.data"):
        keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert sorted(keys) == sorted(f"k{n}{i}" for n in range(2) for i in range(4))
    warnings = [r.getMessage() for r in caplog.records if "no manifest" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 2 shards" in warnings[0]

    assert check.main([*urls, "--write-manifests", "--no-build"]) == 0
    assert all(read_manifest(u).nsamples == 4 for u in urls)
