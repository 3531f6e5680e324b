"""Small synthetic copies of the public releases, with exactly their column names and types.

Used by the tests and the conversion benchmark, and useful for a dry run of a recipe before a download
finishes. Every builder can add malformed rows of the kinds real data has (`bad=True`); the docstring says
which and where. Images are drawn (gradients and boxes) so that crops, masks and boxes can be checked.
"""

from __future__ import annotations

import functools
import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# The Hugging Face `Image` feature as stored in parquet.
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

SUBJECTS_COMPOSITE = (1056, 528)
SUBJECTS_LEFT = (8, 8, 520, 520)
SUBJECTS_RIGHT = (528, 8, 1040, 520)


def draw_image(width: int, height: int, seed: int, boxes: list[tuple[int, int, int, int]] | None = None,
               color: tuple[int, int, int] | None = None, noise: float = 0.0) -> Image.Image:
    """A smooth gradient with filled rectangles: cheap to encode, and boxes are visible in the pixels.

    `noise` (grey-level std) adds photo-like texture, so encoded sizes and codec times come near real
    photographs' (the benchmark uses it; tests leave it at 0 so that pixels can be checked exactly)."""
    rng = random.Random(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    a, b = np.array([rng.randint(0, 255) for _ in range(3)]), np.array([rng.randint(0, 255) for _ in range(3)])
    arr = (a * (1 - x) * (1 - y) + b * x * y + 60 * y).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(np.broadcast_to(arr, (height, width, 3)).copy())
    draw = ImageDraw.Draw(im)
    for box in boxes or []:
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1],
                       fill=color or tuple(rng.randint(0, 255) for _ in range(3)))
    if noise:
        grain = np.roll(_grain(height, width, noise), (seed * 7) % height, axis=0)  # varied, drawn once
        im = Image.fromarray((np.asarray(im, np.int16) + grain).clip(0, 255).astype(np.uint8))
    return im


@functools.lru_cache(maxsize=8)
def _grain(height: int, width: int, noise: float) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, noise, (height, width, 3)).round().astype(np.int16)


def encode(im: Image.Image, fmt: str = "jpg") -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        im.convert("RGB").save(buf, format="JPEG", quality=90)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


def image_cell(data: bytes | None, path: str | None = None) -> dict[str, Any]:
    return {"bytes": data, "path": path}


def write_parquet(table: pa.Table, path: Path, row_group_size: int = 4) -> Path:
    """Small row groups, so resuming mid-file and batch boundaries are exercised as on real shards.
    No dictionary encoding: repeated images (benchmark fixtures) must take their full size, as unique
    images do in the releases."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size, use_dictionary=False)
    return path


# ---------------------------------------------------------------------------------------------- Subjects200K

SUBJECTS_SCHEMA = pa.schema([
    ("image", IMAGE),
    ("collection", pa.string()),
    ("quality_assessment", pa.struct([("compositeStructure", pa.int64()), ("objectConsistency", pa.int64()),
                                      ("imageQuality", pa.int64())])),
    ("description", pa.struct([("item", pa.string()), ("description_0", pa.string()),
                               ("description_1", pa.string()), ("category", pa.string()),
                               ("description_valid", pa.bool_())])),
])


def subjects_composite(seed: int, noise: float = 0.0) -> Image.Image:
    """Grey margins, a red-ish left view and a blue-ish right view, so each crop is recognisable."""
    im = Image.new("RGB", SUBJECTS_COMPOSITE, (128, 128, 128))
    left = draw_image(512, 512, seed, [(100, 100, 300, 300)], color=(230, 30, 30), noise=noise)
    right = draw_image(512, 512, seed + 1, [(200, 150, 400, 350)], color=(30, 30, 230), noise=noise)
    im.paste(left, SUBJECTS_LEFT[:2])
    im.paste(right, SUBJECTS_RIGHT[:2])
    return im


@functools.lru_cache(maxsize=64)
def _composite_jpeg(seed: int, noise: float) -> bytes:
    return encode(subjects_composite(seed, noise))


def subjects200k_table(n: int, seed: int = 0, bad: bool = False, noise: float = 0.0,
                       distinct: int | None = None) -> pa.Table:
    """`n` good rows; with `bad`, 4 more at the end: missing image bytes, null quality struct,
    a score below 5, and a composite that is not two square views side by side. `distinct` cycles that many images (fast, for
    benchmarks); by default every row has its own."""
    rows = []
    for i in range(n):
        rows.append({
            "image": image_cell(_composite_jpeg(seed + 2 * (i % distinct if distinct else i), noise), None),
            "collection": "collection_2" if i % 2 else "collection_1",
            "quality_assessment": {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5},
            "description": {"item": f"item {i}", "description_0": f"left scene {i}",
                            "description_1": f"right scene {i}", "category": "Toys",
                            "description_valid": True},
        })
    if bad:
        good = rows[0] if rows else None
        template = dict(good) if good else {
            "collection": "collection_2",
            "description": {"item": "x", "description_0": "l", "description_1": "r", "category": "c",
                            "description_valid": True}}
        img = image_cell(encode(subjects_composite(seed + 999)), None)
        rows.append(template | {"image": image_cell(None, None),
                                "quality_assessment": {"compositeStructure": 5, "objectConsistency": 5,
                                                       "imageQuality": 5}})
        rows.append(template | {"image": img, "quality_assessment": None})
        rows.append(template | {"image": img, "quality_assessment": {"compositeStructure": 5,
                                                                     "objectConsistency": 3,
                                                                     "imageQuality": 5}})
        rows.append(template | {"image": image_cell(encode(draw_image(1000, 528, 1))),
                                "quality_assessment": {"compositeStructure": 5, "objectConsistency": 5,
                                                       "imageQuality": 5}})
    return pa.Table.from_pylist(rows, schema=SUBJECTS_SCHEMA)


# ---------------------------------------------------------------------------------------------- editing

OMNIEDIT_SCHEMA = pa.schema([
    ("omni_edit_id", pa.string()), ("task", pa.string()), ("src_img", IMAGE), ("edited_img", IMAGE),
    ("edited_prompt_list", pa.list_(pa.string())), ("width", pa.int64()), ("height", pa.int64()),
    ("sc_score_1", pa.int64()), ("sc_score_2", pa.int64()), ("sc_reasoning", pa.string()),
    ("pq_score", pa.int64()), ("pq_reasoning", pa.string()), ("o_score", pa.float64()),
])

OMNIEDIT_TASKS = ("object_addition", "object_removal", "object_swap", "attribute_modification",
                  "background_swap", "environment", "style")


@functools.lru_cache(maxsize=64)
def _edit_pair(i: int, seed: int, size: tuple[int, int], noise: float = 0.0) -> tuple[bytes, bytes]:
    w, h = size
    src = draw_image(w, h, seed + i, [(w // 4, h // 4, w // 2, h // 2)], color=(200, 40, 40), noise=noise)
    tgt = draw_image(w, h, seed + i, [(w // 4, h // 4, w // 2, h // 2)], color=(40, 200, 40), noise=noise)
    return encode(src), encode(tgt)


def omniedit_table(n: int, seed: int = 0, bad: bool = False, size: tuple[int, int] = (64, 48),
                   noise: float = 0.0, distinct: int | None = None) -> pa.Table:
    """`n` good rows (three phrasings each); with `bad`, 3 more at the end: missing source bytes, an empty
    instruction list, a null o_score. `distinct` cycles that many image pairs (see `subjects200k_table`)."""
    rows = []
    for i in range(n):
        src, tgt = _edit_pair(i % distinct if distinct else i, seed, size, noise)
        rows.append({
            "omni_edit_id": f"omni-{i}", "task": OMNIEDIT_TASKS[i % len(OMNIEDIT_TASKS)],
            "src_img": image_cell(src, f"{i}_src.jpg"), "edited_img": image_cell(tgt, f"{i}_tgt.jpg"),
            "edited_prompt_list": [f"make the box green {i}", f"turn the red box green {i}",
                                   f"change the square to green {i}"],
            "width": size[0], "height": size[1], "sc_score_1": 9, "sc_score_2": 8, "sc_reasoning": "ok",
            "pq_score": 8, "pq_reasoning": "ok", "o_score": 8.5 + (i % 3) * 0.25,
        })
    if bad:
        src, tgt = _edit_pair(n, seed, size)
        base = {"omni_edit_id": "bad", "task": "style", "width": size[0], "height": size[1], "sc_score_1": 9,
                "sc_score_2": 9, "sc_reasoning": "", "pq_score": 9, "pq_reasoning": "", "o_score": 9.0,
                "src_img": image_cell(src), "edited_img": image_cell(tgt),
                "edited_prompt_list": ["make it a painting"]}
        rows.append(base | {"src_img": image_cell(None)})
        rows.append(base | {"edited_prompt_list": []})
        rows.append(base | {"o_score": None})
    return pa.Table.from_pylist(rows, schema=OMNIEDIT_SCHEMA)


MAGICBRUSH_SCHEMA = pa.schema([
    ("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", IMAGE), ("mask_img", IMAGE),
    ("instruction", pa.string()), ("target_img", IMAGE),
])

EDIT_BOX = (16, 12, 40, 30)  # the region every editing fixture changes (and masks), in a 64 x 48 image


def _masked_pair(i: int, seed: int, size: tuple[int, int]) -> tuple[Image.Image, Image.Image, Image.Image]:
    w, h = size
    src = draw_image(w, h, seed + i, [(4, 4, 12, 12)], color=(10, 10, 10))
    ImageDraw.Draw(src).rectangle([44, 30, 51, 37], fill=(255, 255, 255))  # white already, not edited
    tgt = src.copy()
    ImageDraw.Draw(tgt).rectangle([EDIT_BOX[0], EDIT_BOX[1], EDIT_BOX[2] - 1, EDIT_BOX[3] - 1], fill=(0, 160, 0))
    mask = src.copy()  # MagicBrush: the source with the edited region painted white
    ImageDraw.Draw(mask).rectangle([EDIT_BOX[0], EDIT_BOX[1], EDIT_BOX[2] - 1, EDIT_BOX[3] - 1],
                                   fill=(255, 255, 255))
    return src, tgt, mask


def magicbrush_table(n: int, seed: int = 0, bad: bool = False, size: tuple[int, int] = (64, 48)) -> pa.Table:
    """`n` good rows; with `bad`, 2 more at the end: missing target bytes, an empty instruction."""
    rows = []
    for i in range(n + (2 if bad else 0)):
        src, tgt, mask = _masked_pair(i, seed, size)
        rows.append({"img_id": str(100 + i // 2), "turn_index": 1 + i % 2,
                     "source_img": image_cell(encode(src, "png")), "mask_img": image_cell(encode(mask, "png")),
                     "instruction": f"put a green box in the middle {i}",
                     "target_img": image_cell(encode(tgt, "png"))})
    if bad:
        rows[n]["target_img"] = image_cell(None)
        rows[n + 1]["instruction"] = "  "
    return pa.Table.from_pylist(rows, schema=MAGICBRUSH_SCHEMA)


ULTRAEDIT_SCORES = ("clip_sim_source", "clip_sim_target", "clip_sim_dir", "clip_sim_image", "dinov2_sim", "ssim")


def ultraedit_table(n: int, seed: int = 0, bad: bool = False, region: bool = False,
                    size: tuple[int, int] = (64, 48)) -> pa.Table:
    """Free-form split (`edit_object` and `mask_image` are null-typed columns) or the region-based one
    (string and image). With `bad`, 1 more row: missing edited image bytes."""
    fields = [(c, pa.float64()) for c in ULTRAEDIT_SCORES] + [
        ("source_caption", pa.string()), ("target_caption", pa.string()), ("idx", pa.int64()),
        ("edit_prompt", pa.string()), ("edit_object", pa.string() if region else pa.null()),
        ("source_image", IMAGE), ("edited_image", IMAGE), ("mask_image", IMAGE if region else pa.null())]
    rows = []
    for i in range(n + (1 if bad else 0)):
        src, tgt, _ = _masked_pair(i, seed, size)
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).rectangle([EDIT_BOX[0], EDIT_BOX[1], EDIT_BOX[2] - 1, EDIT_BOX[3] - 1], fill=255)
        rows.append({c: 0.5 + 0.01 * k for k, c in enumerate(ULTRAEDIT_SCORES)} | {
            "source_caption": f"a picture {i}", "target_caption": f"a picture with a green box {i}", "idx": i,
            "edit_prompt": f"add a green box {i}", "edit_object": "box" if region else None,
            "source_image": image_cell(encode(src)), "edited_image": image_cell(encode(tgt)),
            "mask_image": image_cell(encode(mask, "png")) if region else None})
    if bad:
        rows[n]["edited_image"] = image_cell(None)
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


IP2P_SCHEMA = pa.schema([
    ("original_prompt", pa.string()), ("original_image", IMAGE), ("edit_prompt", pa.string()),
    ("edited_prompt", pa.string()), ("edited_image", IMAGE),
])


def instructpix2pix_table(n: int, seed: int = 0, bad: bool = False, size: tuple[int, int] = (64, 64)) -> pa.Table:
    """`n` good rows; with `bad`, 1 more: a null edit prompt."""
    rows = []
    for i in range(n + (1 if bad else 0)):
        src, tgt = _edit_pair(i, seed, size)
        rows.append({"original_prompt": f"a red box {i}", "original_image": image_cell(src),
                     "edit_prompt": f"make it green {i}", "edited_prompt": f"a green box {i}",
                     "edited_image": image_cell(tgt)})
    if bad:
        rows[n]["edit_prompt"] = None
    return pa.Table.from_pylist(rows, schema=IP2P_SCHEMA)


# ---------------------------------------------------------------------------------------------- benchmarks

GEDIT_SCHEMA = pa.schema([
    ("task_type", pa.string()), ("key", pa.string()), ("instruction", pa.string()),
    ("instruction_language", pa.string()), ("input_image", IMAGE), ("input_image_raw", IMAGE),
    ("Intersection_exist", pa.bool_()),
])


def gedit_table(n: int, seed: int = 0, bad: bool = False) -> pa.Table:
    """`n` rows alternating en/cn; with `bad`, 1 more: missing input image."""
    rows = []
    for i in range(n + (1 if bad else 0)):
        im = draw_image(64, 48, seed + i)
        rows.append({"task_type": ["background_change", "color_alter", "style_change"][i % 3],
                     "key": f"k{i:04d}", "instruction": f"change the background {i}",
                     "instruction_language": "en" if i % 2 == 0 else "cn", "input_image": image_cell(encode(im)),
                     "input_image_raw": image_cell(encode(draw_image(128, 96, seed + i))),
                     "Intersection_exist": bool(i % 2)})
    if bad:
        rows[n]["input_image"] = image_cell(None)
    return pa.Table.from_pylist(rows, schema=GEDIT_SCHEMA)


EMU_SCHEMA = pa.schema([
    ("instruction", pa.string()), ("image", IMAGE), ("task", pa.string()), ("split", pa.string()),
    ("idx", pa.int64()), ("hash", pa.string()), ("input_caption", pa.string()), ("output_caption", pa.string()),
])


def emu_edit_table(n: int, seed: int = 0, bad: bool = False, split: str = "test") -> pa.Table:
    """`n` rows; with `bad`, 1 more: an empty instruction."""
    rows = []
    for i in range(n + (1 if bad else 0)):
        rows.append({"instruction": f"add a hat {i}", "image": image_cell(encode(draw_image(64, 64, seed + i))),
                     "task": ["add", "remove", "background"][i % 3], "split": split, "idx": i,
                     "hash": f"h{i}", "input_caption": f"a dog {i}", "output_caption": f"a dog with a hat {i}"})
    if bad:
        rows[n]["instruction"] = ""
    return pa.Table.from_pylist(rows, schema=EMU_SCHEMA)


DREAMBENCH_SUBJECTS = {"backpack": "backpack", "dog": "dog", "red_cartoon": "cartoon"}


def dreambench_folder(root: Path, seed: int = 0, images_per_subject: int = 2) -> Path:
    """`dataset/` as in the DreamBooth repository: one folder of JPEGs per subject and
    prompts_and_classes.txt (with 3 prompts per list instead of 25). Returns the `dataset` folder."""
    ds = root / "dataset"
    for k, subject in enumerate(DREAMBENCH_SUBJECTS):
        (ds / subject).mkdir(parents=True, exist_ok=True)
        for j in range(images_per_subject):
            encode_to = ds / subject / f"{j:02d}.jpg"
            encode_to.write_bytes(encode(draw_image(80, 64, seed + 10 * k + j)))
    classes = "\n".join(f"{s},{c}" for s, c in DREAMBENCH_SUBJECTS.items())
    obj = ["'a {0} {1} in the jungle'.format(unique_token, class_token),",
           "'a {0} {1} in the snow'.format(unique_token, class_token),",
           "'a cube shaped {0} {1}'.format(unique_token, class_token)"]
    live = ["'a {0} {1} in the jungle'.format(unique_token, class_token),",
            "'a {0} {1} wearing a red hat'.format(unique_token, class_token),",
            "'a cube shaped {0} {1}'.format(unique_token, class_token)"]
    text = (f"Classes\n\nsubject_name,class\n{classes}\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
            + "\n".join(obj) + "\n]\n\nLive Subject Prompts\n\nprompt_list = [\n" + "\n".join(live) + "\n]\n")
    (ds / "prompts_and_classes.txt").write_text(text)
    return ds


def magicbrush_test_folder(root: Path, sessions: int = 2, seed: int = 0) -> Path:
    """The MagicBrush test archive: `test/edit_sessions.json` and `test/images/{img_id}/...`, plus
    `global_descriptions.json`. The first session has two turns. Returns the `test` folder."""
    test = root / "test"
    edits: dict[str, list[dict[str, str]]] = {}
    descriptions: dict[str, dict[str, str]] = {}
    for s in range(sessions):
        img_id = str(2000 + s)
        folder = test / "images" / img_id
        folder.mkdir(parents=True, exist_ok=True)
        turns = 2 if s == 0 else 1
        src, tgt, mask = _masked_pair(s, seed, (64, 48))
        (folder / f"{img_id}-input.png").write_bytes(encode(src, "png"))
        descriptions[img_id] = {f"{img_id}-input.png": f"a scene {s}"}
        edits[img_id] = []
        for t in range(1, turns + 1):
            (folder / f"{img_id}-output{t}.png").write_bytes(encode(tgt, "png"))
            (folder / f"{img_id}-mask{t}.png").write_bytes(encode(mask, "png"))
            inp = f"{img_id}-input.png" if t == 1 else f"{img_id}-output{t - 1}.png"
            edits[img_id].append({"input": inp, "mask": f"{img_id}-mask{t}.png",
                                  "output": f"{img_id}-output{t}.png", "instruction": f"add a green box {s}.{t}"})
            descriptions[img_id][f"{img_id}-output{t}.png"] = f"a scene with a green box {s}.{t}"
    (test / "edit_sessions.json").write_text(json.dumps(edits))
    (test / "global_descriptions.json").write_text(json.dumps(descriptions))
    return test


# ---------------------------------------------------------------------------------------------- grounding

COCO_CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 18, "name": "dog", "supercategory": "animal"},
                   {"id": 62, "name": "chair", "supercategory": "furniture"}]


def _polygon(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def coco_like(root: Path, n_images: int = 3, seed: int = 0, folder: str = "train2014",
              file_pattern: str = "COCO_train2014_{:012d}.jpg", size: tuple[int, int] = (96, 64),
              lvis: bool = False) -> dict[str, Any]:
    """COCO-format annotations and an image folder `root/folder`. Each image has two dogs and a person
    (polygons), plus one crowd annotation with an RLE on image 0. `lvis=True` writes LVIS v1 fields instead
    (`coco_url` and no `file_name`, categories with `synonyms`, no `iscrowd`). Returns the JSON dict."""
    w, h = size
    images, anns = [], []
    (root / folder).mkdir(parents=True, exist_ok=True)
    boxes = [(18, (4.0, 6.0, 20.0, 18.0)), (18, (40.0, 10.0, 24.5, 30.0)), (1, (70.0, 20.0, 15.0, 40.0))]
    for i in range(n_images):
        img_id = 100 + i
        name = file_pattern.format(img_id)
        ints = [(int(x), int(y), int(x + bw + 0.99), int(y + bh + 0.99)) for _, (x, y, bw, bh) in boxes]
        (root / folder / name).write_bytes(encode(draw_image(w, h, seed + i, ints)))
        entry = {"id": img_id, "width": w, "height": h}
        if lvis:
            entry |= {"coco_url": f"http://images.cocodataset.org/{folder}/{name}", "neg_category_ids": [],
                      "not_exhaustive_category_ids": []}
        else:
            entry["file_name"] = name
        images.append(entry)
        for cat, (x, y, bw, bh) in boxes:
            ann = {"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "bbox": [x, y, bw, bh],
                   "area": bw * bh, "segmentation": [_polygon(x, y, bw, bh)]}
            if not lvis:
                ann["iscrowd"] = 0
            anns.append(ann)
    if not lvis and n_images:
        # An uncompressed RLE (column-major counts) covering rows 50..59 of columns 0..9 of image 0.
        counts = [50]
        for col in range(10):  # runs alternate 0s and 1s and continue across columns
            counts += [10, (h - 60) + (50 if col < 9 else h * (w - 10))]
        anns.append({"id": len(anns) + 1, "image_id": 100, "category_id": 62, "bbox": [0.0, 50.0, 10.0, 10.0],
                     "area": 100.0, "iscrowd": 1, "segmentation": {"size": [h, w], "counts": counts}})
    cats = [c | {"synonyms": [c["name"], c["name"] + "s"], "frequency": "f"} for c in COCO_CATEGORIES] \
        if lvis else COCO_CATEGORIES
    return {"images": images, "annotations": anns, "categories": cats}


def add_bad_annotations(data: dict[str, Any]) -> dict[str, Any]:
    """A box entirely outside image 0 and an annotation of an image that is not listed."""
    img = data["images"][0]
    data["annotations"].append({"id": 9001, "image_id": img["id"], "category_id": 1,
                                "bbox": [img["width"] + 50.0, 5.0, 10.0, 10.0], "area": 100.0,
                                "segmentation": [], "iscrowd": 0})
    data["annotations"].append({"id": 9002, "image_id": 999999, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0],
                                "area": 25.0, "segmentation": [], "iscrowd": 0})
    return data


REFCOCO_SCHEMA = pa.schema([
    ("sent_ids", pa.list_(pa.int64())), ("file_name", pa.string()), ("ann_id", pa.int64()),
    ("ref_id", pa.int64()), ("image_id", pa.int64()), ("split", pa.string()),
    ("sentences", pa.list_(pa.struct([("raw", pa.string()), ("sent", pa.string()), ("sent_id", pa.int64()),
                                      ("tokens", pa.list_(pa.string()))]))),
    ("category_id", pa.int64()), ("raw_anns", pa.string()), ("raw_image_info", pa.string()),
    ("raw_sentences", pa.string()), ("image_path", pa.string()), ("bbox", pa.list_(pa.float64())),
    ("captions", pa.list_(pa.string())), ("global_image_id", pa.string()), ("anns_id", pa.string()),
])


def refcoco_table(coco: dict[str, Any], bad: bool = False) -> pa.Table:
    """`jxu124/refcoco` rows, one per non-crowd annotation of `coco` (two sentences each), pointing at
    `coco/train2014/...`. With `bad`, 2 more: a box outside the image, an empty sentence list."""
    images = {im["id"]: im for im in coco["images"]}
    rows = []
    anns = [a for a in coco["annotations"] if not a.get("iscrowd") and a["image_id"] in images]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for k, ann in enumerate(anns):
        im = images[ann["image_id"]]
        x = ann["bbox"][0]
        side = "left" if x < im["width"] / 2 else "right"
        texts = [f"the {side} {names[ann['category_id']]} {k}", f"{names[ann['category_id']]} on the {side}"]
        sents = [{"raw": t.upper(), "sent": t, "sent_id": 10 * k + j, "tokens": t.split()}
                 for j, t in enumerate(texts)]
        rows.append({
            "sent_ids": [s["sent_id"] for s in sents], "file_name": im["file_name"].replace(".jpg", f"_{k}.jpg"),
            "ann_id": ann["id"], "ref_id": k, "image_id": im["id"], "split": "train", "sentences": sents,
            "category_id": ann["category_id"], "raw_anns": json.dumps(ann),
            "raw_image_info": json.dumps({"id": im["id"], "file_name": im["file_name"], "width": im["width"],
                                          "height": im["height"]}),
            "raw_sentences": json.dumps(sents), "image_path": f"coco/train2014/{im['file_name']}",
            "bbox": list(ann["bbox"]), "captions": texts, "global_image_id": f"coco.{im['id']}",
            "anns_id": str(ann["id"])})
    if bad and rows:
        out = dict(rows[0]) | {"ref_id": 900, "bbox": [5000.0, 5000.0, 10.0, 10.0], "raw_anns": ""}
        empty = dict(rows[0]) | {"ref_id": 901, "sentences": [], "sent_ids": [], "captions": []}
        rows += [out, empty]
    return pa.Table.from_pylist(rows, schema=REFCOCO_SCHEMA)


REFCOCO_EVAL_SCHEMA = pa.schema([
    ("question_id", pa.string()), ("image", IMAGE), ("question", pa.string()), ("answer", pa.list_(pa.string())),
    ("segmentation", pa.list_(pa.float32())), ("bbox", pa.list_(pa.float32())), ("iscrowd", pa.int8()),
    ("file_name", pa.string()),
])


def refcoco_eval_table(n: int, seed: int = 0, bad: bool = False) -> pa.Table:
    """`lmms-lab/RefCOCO` rows (images inside). Box i is (8 + i, 10, 30, 20) in x, y, w, h.
    With `bad`, 2 more: missing image bytes, a box outside the image."""
    rows = []
    for i in range(n + (2 if bad else 0)):
        x, y, w, h = 8.0 + i, 10.0, 30.0, 20.0
        im = draw_image(96, 64, seed + i, [(int(x), int(y), int(x + w), int(y + h))])
        rows.append({"question_id": f"q{i}", "image": image_cell(encode(im)),
                     "question": "Please carefully observe the area circled in the image and come up with a "
                                 "caption for the area.",
                     "answer": [f"the box {i}", f"box number {i}"], "segmentation": _polygon(x, y, w, h),
                     "bbox": [x, y, w, h], "iscrowd": 0, "file_name": f"COCO_train2014_{i:012d}.jpg"})
    if bad:
        rows[n]["image"] = image_cell(None)
        rows[n + 1]["bbox"] = [500.0, 500.0, 10.0, 10.0]
    return pa.Table.from_pylist(rows, schema=REFCOCO_EVAL_SCHEMA)


# ---------------------------------------------------------------------------------------------- control

def _depth_map(w: int, h: int, seed: int) -> Image.Image:
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    return Image.fromarray(np.broadcast_to(y, (h, w)).astype(np.uint8), mode="L")


def multigen_table(kind: str, n: int, seed: int = 0, bad: bool = False, size: tuple[int, int] = (64, 64)) -> pa.Table:
    """MultiGen-20M tables. `kind`: "depth" (`image`, `control_depth`, `text`), "canny" (`image`, `text`),
    "seg" (Captioned_ADE20K / COCOStuff: `image`, `control_seg`, `seg_map`, `prompt`).
    With `bad`, 1 more row: missing control map bytes (or image bytes for canny)."""
    w, h = size
    rows = []
    for i in range(n + (1 if bad else 0)):
        img = image_cell(encode(draw_image(w, h, seed + i, [(10, 10, 30, 40)])))
        if kind == "depth":
            rows.append({"image": img, "control_depth": image_cell(encode(_depth_map(w, h, i), "png")),
                         "text": f"a room {i}"})
        elif kind == "canny":
            rows.append({"image": img, "text": f"a street {i}"})
        elif kind == "seg":
            labels = np.zeros((h, w), np.uint8)
            labels[10:40, 10:30] = 7
            colour = np.zeros((h, w, 3), np.uint8)
            colour[labels == 7] = (120, 120, 80)
            rows.append({"image": img, "control_seg": image_cell(encode(Image.fromarray(colour), "png")),
                         "seg_map": image_cell(encode(Image.fromarray(labels, mode="L"), "png")),
                         "prompt": f"a bedroom {i}"})
        else:
            raise ValueError(kind)
    if bad:
        col = {"depth": "control_depth", "canny": "image", "seg": "control_seg"}[kind]
        rows[n][col] = image_cell(None)
    schema = {"depth": [("image", IMAGE), ("control_depth", IMAGE), ("text", pa.string())],
              "canny": [("image", IMAGE), ("text", pa.string())],
              "seg": [("image", IMAGE), ("control_seg", IMAGE), ("seg_map", IMAGE), ("prompt", pa.string())]}[kind]
    return pa.Table.from_pylist(rows, schema=pa.schema(schema))


# ---------------------------------------------------------------------------------------------- inpainting

def t2i_tars(folder: Path, n_tars: int = 2, per_tar: int = 3, seed: int = 0, bad: bool = False) -> list[Path]:
    """text-to-image-2M style webdataset tars: `{key}.jpg` + `{key}.json` ({"prompt": ...}).
    With `bad`, the last tar gets a sample without a prompt and one whose jpg is empty."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in range(n_tars):
        path = folder / f"data_{t:06d}.tar"
        entries = []
        for j in range(per_tar):
            key = f"{t:04d}{j:05d}"
            entries.append((key, encode(draw_image(64, 64, seed + 100 * t + j)),
                            json.dumps({"prompt": f"a painting {t}-{j}"}).encode()))
        if bad and t == n_tars - 1:
            entries.append(("9999noprompt", encode(draw_image(64, 64, 5)), json.dumps({"caption": "x"}).encode()))
            entries.append(("9999emptyjpg", b"", json.dumps({"prompt": "nothing"}).encode()))
        with tarfile.open(path, "w") as tf:
            for key, jpg, meta in entries:
                for ext, data in (("jpg", jpg), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- reading back

def read_samples(folder: Path) -> list[dict[str, Any]]:
    """Every sample of the `*.tar` shards in `folder` (sorted), as `{"__key__", "json": record, field: bytes}`.

    A plain-tarfile reader for inspecting a recipe's output; training reads shards through webdataset.
    """
    samples: list[dict[str, Any]] = []
    for path in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(path) as tf:
            current: dict[str, Any] | None = None
            for info in tf:
                key, _, fld = info.name.partition(".")
                if current is None or current["__key__"] != key:
                    current = {"__key__": key, "__shard__": path.name}
                    samples.append(current)
                data = tf.extractfile(info).read()
                current[fld] = json.loads(data) if fld == "json" else data
    return samples


def decode(data: bytes) -> np.ndarray:
    """Image bytes -> array (H, W[, C]) in the stored mode."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def read_through_datamodule(folder: Path, task: str, n: int, resolution: int = 64,
                            **builder: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """Read converted shards the way training does: (a validation batch of the first `n` samples, one
    training batch of `n`, the DataModule's bad-sample counts). `builder` sets `BuilderConfig` fields,
    e.g. `control_types={"depth": 1.0}` for depth-only shards."""
    from cologen.data.builders import BuilderConfig
    from cologen.data.datamodule import MixtureDataModule

    dm = MixtureDataModule(train_shards={task: str(folder)}, mixture={task: 1.0}, val_shards={task: str(folder)},
                           batch_size=n, num_workers=0, resolution=resolution, val_samples_per_task=n,
                           batches_per_epoch=1, builder=BuilderConfig(**builder))
    val = next(iter(dm.val_dataloader()[0]))
    train = next(iter(dm.train_dataloader()))
    return val, train, dm.bad_samples
