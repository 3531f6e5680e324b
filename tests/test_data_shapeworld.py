"""ShapeWorld: determinism, exact ground truth, and a dataset that the validator accepts."""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from cologen.data.records import decode_sample
from data_recipes import check, shapeworld
from data_recipes.shapeworld import (
    ShapeWorldConfig,
    ensure_shapeworld,
    generate,
    shard_patterns,
    subject_pool,
)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.tar"))}


def _samples(root: Path, task: str, split: str = "train") -> list:
    urls = sorted(str(p) for p in (root / task).glob(f"{split}-*.tar"))
    return [decode_sample(raw) for raw in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None,
                                                        workersplitter=None)]


def test_same_seed_gives_byte_identical_shards(tmp_path):
    cfg = ShapeWorldConfig(shard_size=7)
    generate(tmp_path / "a", train=16, val=4, seed=5, config=cfg, workers=1, progress=False)
    generate(tmp_path / "b", train=16, val=4, seed=5, config=cfg, workers=2, progress=False)  # process count
    generate(tmp_path / "c", train=16, val=4, seed=6, config=cfg, workers=1, progress=False)
    a, b, c = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert len(a) == 5 * (3 + 1) and a == b
    assert all(a[k] != c[k] for k in a)


def test_generated_shards_pass_the_validator(shapeworld_dir):
    urls = sorted(str(p) for p in Path(shapeworld_dir).rglob("*.tar"))
    report = check.check(urls, build=True)
    assert report.ok, report.bad[:5]
    assert dict(report.counts) == {t: 144 for t in shapeworld.TASKS}


def test_grounding_expression_is_unique_and_box_exact(shapeworld_dir):
    for s in _samples(shapeworld_dir, "grounding")[:60]:
        g, objs = s.record["grounding"], s.record["objects"]
        words = g["expression"].split()[1:]  # "the small red triangle" -> attributes + class
        matches = [i for i, o in enumerate(objs)
                   if o["class"] == words[-1] and all(w in (o["size"], o["color"]) for w in words[:-1])]
        assert matches == [g["object_index"]]
        ys, xs = np.nonzero(s.instances == g["object_index"] + 1)
        assert g["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert g["instances"] == [objs[i]["box"] for i in g["instance_indices"]]
        assert all(objs[i]["class"] == g["class"] for i in g["instance_indices"])


def test_customized_pairs_share_a_distinctive_subject(shapeworld_dir):
    pool = subject_pool(ShapeWorldConfig())
    assert len({(p["shape"], p["pattern"], *p["colors"]) for p in pool}) == len(pool) == 64
    assert all(p["colors"][0] != p["colors"][1] for p in pool)
    by_id = {p["id"]: p for p in pool}
    for s in _samples(shapeworld_dir, "customized")[:40]:
        sub = s.record["subject"]
        assert sub["id"] in by_id and sub["colors"] == by_id[sub["id"]]["colors"]
        assert s.record["prompt"] == sub["target_description"] != sub["source_description"]
        assert s.source is not None and s.mask.any() and s.source_mask.any()
        # both colours of the subject are visible in both views
        for img, mask in ((s.image, s.mask), (s.source, s.source_mask)):
            pixels = {tuple(p) for p in img[mask > 0]}
            assert {tuple(shapeworld.COLORS[c]) for c in sub["colors"]} <= pixels


def test_customized_views_put_the_subject_where_their_prompt_says_and_far_apart(shapeworld_dir):
    """The prompt fixes the target's layout (so a metric can tell a copy of the reference from the asked scene):
    the subject is centred in the named cell (moved inside the image) at the named size, the two views' cells are
    at least two apart and their background colours differ."""
    cfg = ShapeWorldConfig()
    words = {"at the top left": (0, 0), "at the top": (0, 1), "at the top right": (0, 2), "on the left": (1, 0),
             "in the center": (1, 1), "on the right": (1, 2), "at the bottom left": (2, 0), "at the bottom": (2, 1),
             "at the bottom right": (2, 2)}
    for s in _samples(shapeworld_dir, "customized")[:60]:
        sub = s.record["subject"]
        cells = []
        for desc, objs, bg in ((sub["target_description"], s.record["objects"], s.record["background"]),
                               (sub["source_description"], sub["source_objects"], sub["source_background"])):
            _, size_word, where = desc.split(", ")[:3]
            assert where in words and size_word in cfg.subject_sizes
            cell = words[where]
            x0, y0, x1, y1 = objs[0]["box"]
            r = cfg.subject_sizes[size_word] * cfg.size / 2
            expected = [float(np.clip((k + 0.5) * cfg.size / 3 - 0.5, r, cfg.size - 1 - r)) for k in cell[::-1]]
            assert abs((x0 + x1) / 2 - 0.5 - expected[0]) <= 1.0 and abs((y0 + y1) / 2 - 0.5 - expected[1]) <= 1.0
            assert bg["rgb"] == list(shapeworld.BACKGROUND_COLORS[bg["color"]]) and objs[0]["rgbs"]
            cells.append(cell)
        assert abs(cells[0][0] - cells[1][0]) + abs(cells[0][1] - cells[1][1]) >= cfg.subject_cell_distance
        assert s.record["background"]["color"] != sub["source_background"]["color"]


def test_edits_change_exactly_the_edit_region(shapeworld_dir):
    ops = set()
    for s in _samples(shapeworld_dir, "editing"):
        ops.add(s.record["edit"]["operation"])
        region = s.mask > 0
        assert region.any()
        diff = (s.image != s.source).any(-1)
        assert not diff[~region].any(), s.key  # nothing outside the region changes
        assert diff.any(), s.key
    assert ops == set(shapeworld.EDIT_OPERATIONS)


def test_control_maps_match_the_scene(shapeworld_dir):
    for s in _samples(shapeworld_dir, "control")[:30]:
        for i, o in enumerate(s.record["objects"]):
            sel = s.instances == i + 1
            assert (np.abs(s.depth[sel].astype(int) - o["depth"] * 255) <= 1).all()  # record keeps 3 decimals
            assert (s.seg[sel] == shapeworld.SEG_PALETTE[o["class"]]).all()


def test_ensure_generates_once_and_patterns_expand(tmp_path):
    cfg = ShapeWorldConfig(shard_size=5, tasks=("inpainting", "editing"))
    m1 = ensure_shapeworld(tmp_path, train=10, val=5, seed=1, config=cfg, progress=False)
    stamp = (tmp_path / "editing" / "train-0001.tar").stat().st_mtime_ns
    time.sleep(0.01)
    m2 = ensure_shapeworld(tmp_path, train=10, val=5, seed=1, config=cfg, progress=False)
    assert m1 == m2 and (tmp_path / "editing" / "train-0001.tar").stat().st_mtime_ns == stamp
    pats = shard_patterns(tmp_path, "train")
    assert set(pats) == {"inpainting", "editing", "t2i", "reconstruct"}
    assert pats["t2i"] == pats["inpainting"] and pats["editing"].endswith("train-{0000..0001}.tar")
    ensure_shapeworld(tmp_path, train=15, val=5, seed=1, config=cfg, progress=False)  # a new request
    assert json.loads((tmp_path / "shapeworld.json").read_text())["train"] == 15
    assert (tmp_path / "editing" / "train-0002.tar").exists()


def test_command_line(tmp_path, capsys):
    assert shapeworld.main(["--out", str(tmp_path), "--train", "3", "--val", "2", "--seed", "2",
                            "--tasks", "grounding", "--size", "48", "--workers", "1"]) == 0
    s = _samples(tmp_path, "grounding")[0]
    assert s.image.shape == (48, 48, 3) and s.record["width"] == 48
