"""Bad samples are skipped and counted, the loader keeps going, and the validator names each one."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from cologen.data.datamodule import MixtureDataModule
from data_recipes import check


def _good_samples(root, n):
    url = str(Path(root) / "inpainting" / "train-0000.tar")
    return list(wds.tarfile_samples([{"url": url}]))[:n]


def _write(path, samples):
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})


def _bad_shards(root, tmp_path):
    good = _good_samples(root, 12)
    rec = json.loads(good[0]["json"])
    box_outside = dict(rec, objects=[dict(rec["objects"][0], box=[20, 20, 40, 40])])
    bad = [
        {"__key__": "bad-decode", "json": good[0]["json"], "image.png": b"\x89PNG this is not an image"},
        {"__key__": "bad-missing", "json": good[1]["json"], "instances.png": good[1]["instances.png"]},
        {"__key__": "bad-box", "json": json.dumps(box_outside).encode(), "image.png": good[2]["image.png"]},
        {"__key__": "bad-utf8", "image.png": good[3]["image.png"],
         "json": b'{"task": "inpainting", "prompt": "caf\xe9 \xff\xfe", "width": 32, "height": 32}'},
    ]
    mixed = [dict(s, __key__=f"good-{i}") for i, s in enumerate(good[:6])]
    mixed[1:1] = bad[:2]
    mixed[5:5] = bad[2:]
    _write(tmp_path / "mixed.tar", mixed)
    # a tar cut in the middle of a member's data
    _write(tmp_path / "full.tar", [dict(s, __key__=f"tail-{i}") for i, s in enumerate(good[6:])])
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        member = tf.getmembers()[-4]
    cut = member.offset_data + member.size // 2
    (tmp_path / "truncated.tar").write_bytes(data[:cut])
    (tmp_path / "full.tar").unlink()
    return [str(tmp_path / "mixed.tar"), str(tmp_path / "truncated.tar")]


def test_validator_lists_every_malformed_sample_with_key_and_reason(shapeworld_dir, tmp_path, capsys):
    urls = _bad_shards(shapeworld_dir, tmp_path)
    assert check.main(urls) == 1
    out = capsys.readouterr().out
    for key, category, reason in [("bad-decode", "decode", "cannot decode image.png"),
                                  ("bad-missing", "missing", "no target image"),
                                  ("bad-box", "record", "objects[0].box [20, 20, 40, 40] is outside the 32x32"),
                                  ("bad-utf8", "encoding", "record is not valid UTF-8")]:
        assert f"{key} [{category}] {reason}" in out
    assert "truncated.tar after tail-" in out and "[tar]" in out
    assert "inpainting" in out and "malformed" in out
    report = check.check(urls)
    assert report.counts["inpainting"] >= 6 + 2  # the good samples, including those before the cut


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_skips_counts_and_keeps_going(shapeworld_dir, tmp_path, num_workers):
    urls = _bad_shards(shapeworld_dir, tmp_path)
    dm = MixtureDataModule({"inpainting": urls}, {"inpainting": 1.0}, batch_size=4, num_workers=num_workers,
                           batches_per_epoch=25, shuffle_buffer=0, resampled=False)
    keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert len(keys) == 100 and all(k.startswith(("good-", "tail-")) for k in keys)
    counts = dm.bad_samples
    for category in ("decode", "missing", "record", "encoding", "tar"):
        assert counts[category] >= 1, counts
    assert counts["total"] == dm.bad_sample_count > 0


def test_a_shard_of_only_bad_samples_raises_instead_of_spinning(shapeworld_dir, tmp_path):
    good = _good_samples(shapeworld_dir, 1)[0]
    _write(tmp_path / "bad.tar", [{"__key__": f"b{i}", "json": good["json"], "image.png": b"junk"} for i in range(5)])
    dm = MixtureDataModule({"inpainting": str(tmp_path / "bad.tar")}, {"inpainting": 1.0}, num_workers=0,
                           max_consecutive_skips=50)
    with pytest.raises(RuntimeError, match="50 bad samples in a row, the last \\[decode\\]"):
        next(iter(dm.train_dataloader()))
