"""Add cached FLUX text embeddings and VAE latents to existing shards, so training can skip the frozen encoders.

    python -m data_recipes.precompute --input data/real/omniedit --output data/real_flux512/omniedit \\
        --flux /models/FLUX.1-dev --resolution 512 --device cuda

Every input shard is copied to the output folder member for member (same bytes), with per sample:

* `t5.npy` (L, 4096) and `clip.npy` (768,), float16: the T5 token states and CLIP pooled vector of the prompt
  the task builder renders with its default templates (editing: the instruction; customized: the target
  description; inpainting / control: the caption). Grounding prompts are drawn per example (overlay kind and
  colour), so what is cached there is the expression only; a consumer must compare prompts (below).
* `latent.npy` (16, H/8, W/8), float16: the VAE latent (shift/scale-normalized) of the target exactly as the
  builder frames it at `--resolution` (same centre crop, or aspect bucket with `--aspect-buckets`).
* `source_latent.npy`: the same for the given source of editing and customized samples (not for inpainting,
  grounding or control, whose sources are drawn on the fly).
* `precomputed` in the record: `{"text": FLUX folder, "latent": FLUX folder, "resolution": [H, W],
  "prompt": the encoded text, "max_length": L}`. Cached arrays are valid only for a run at that resolution
  whose built prompt equals `prompt`; customized samples assume `swap_subject_pairs: 0`.

T5 states are large (L x 4096 x 2 bytes: 4 MiB per sample at L = 512); `--max-length` trades prompt length
for disk. Output shards are written to a temp name and renamed, each with its manifest (`docs/data.md`); a re-run skips
shards already written.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cologen.data.manifest import ShardWriter
from cologen.data.precomputed import ARRAY_KEYS, load_npy, stack_precomputed  # noqa: F401 - re-exported (recipes API)
from data_recipes._cli import fail, require_path, resolve_inputs

NAME = "precompute"
WITH_SOURCE = ("editing", "customized")


def builder_prompt(record: dict[str, Any]) -> str:
    """The prompt the task builders render with their default templates (see cologen/data/prompts.py)."""
    task = record["task"]
    if task == "editing":
        return (record.get("edit") or {}).get("instruction") or record["prompt"]
    if task == "customized":
        return (record.get("subject") or {}).get("target_description") or record["prompt"]
    if task in ("inpainting", "control", "t2i", "reconstruct"):
        return record.get("caption") or record["prompt"]
    return (record.get("grounding") or {}).get("expression") or record["prompt"]


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array.astype(np.float16)), allow_pickle=False)
    return buf.getvalue()


def iter_tar_samples(path: Path) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(field, bytes), ...]) in shard order, members in their stored order."""
    with tarfile.open(path) as tf:
        key, members = None, []
        for info in tf:
            if not info.isfile():
                continue
            k, _, fld = Path(info.name).name.partition(".")
            if key is not None and k != key:
                yield key, members
                members = []
            key = k
            members.append((fld, tf.extractfile(info).read()))
        if key is not None:
            yield key, members


@dataclass
class Stats:
    shards_written: int = 0
    shards_skipped: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def text(self) -> str:
        rate = self.samples / self.seconds if self.seconds else 0.0
        lines = [f"shards: {self.shards_written} written, {self.shards_skipped} already done (skipped)",
                 f"samples with arrays: {self.samples} ({rate:.1f}/s)"]
        if self.skipped:
            lines.append("samples copied without arrays, by reason:")
            lines += [f"  {n:>8}  {r}" for r, n in self.skipped.most_common()]
        return "\n".join(lines)


class Precomputer:
    """Encodes samples with a text encoder and a latent codec (either may be None to skip that part).

    `text_encoder.encode(list[str]) -> TextEmbeddings(tokens (B, L, D), pooled (B, P))` and
    `codec.encode(float (B, 3, H, W) in [-1, 1]) -> (B, C, H/f, W/f)`, as in `cologen.model`.
    """

    def __init__(self, text_encoder, codec, origin: str, resolution: int = 512, aspect_buckets: bool = False,
                 bucket_multiple: int = 16, batch_size: int = 8, device: str = "cpu"):
        from cologen.data.builders import TaskBuilder
        from cologen.data.geometry import make_buckets

        self.text_encoder, self.codec, self.origin = text_encoder, codec, origin
        self.builder = TaskBuilder(resolution=resolution,
                                   buckets=make_buckets(resolution, bucket_multiple) if aspect_buckets else None)
        self.batch_size, self.device = batch_size, device

    def _prepare(self, key: str, members: list[tuple[str, bytes]]) -> dict[str, Any]:
        """Decode one sample into what is encoded: the prompt and the framed target (and source)."""
        from cologen.data.geometry import warp
        from cologen.data.records import decode_sample

        sample = decode_sample({"__key__": key, **dict(members)}, fields=("image", "source"))
        frame = self.builder.frame_for(*sample.size)
        item = {"record": sample.record, "prompt": builder_prompt(sample.record),
                "target": warp(sample.image, frame), "resolution": [frame.height, frame.width]}
        if sample.task in WITH_SOURCE and sample.source is not None:
            item["source"] = warp(sample.source, frame)  # as the builders do: refitted to the target's frame
        return item

    def _images(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """VAE latents, batched by image size (aspect buckets differ)."""
        import torch

        out: list[np.ndarray | None] = [None] * len(arrays)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, a in enumerate(arrays):
            by_shape.setdefault(a.shape, []).append(i)
        for idx in by_shape.values():
            x = torch.from_numpy(np.stack([arrays[i] for i in idx])).permute(0, 3, 1, 2).float()
            x = (x / 127.5 - 1.0).to(self.device)
            with torch.no_grad():
                lat = self.codec.encode(x).float().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = lat[j]
        return out  # type: ignore[return-value]

    def encode(self, items: list[dict[str, Any]]) -> list[dict[str, bytes]]:
        """Per item, the new members (`t5.npy`, ...)."""
        import torch

        new: list[dict[str, bytes]] = [{} for _ in items]
        if self.text_encoder is not None:
            with torch.no_grad():
                emb = self.text_encoder.encode([it["prompt"] for it in items])
            tokens, pooled = emb.tokens.float().cpu().numpy(), emb.pooled.float().cpu().numpy()
            for n, t, p in zip(new, tokens, pooled):
                n["t5.npy"], n["clip.npy"] = npy_bytes(t), npy_bytes(p)
        if self.codec is not None:
            for n, lat in zip(new, self._images([it["target"] for it in items])):
                n["latent.npy"] = npy_bytes(lat)
            with_source = [i for i, it in enumerate(items) if "source" in it]
            if with_source:
                lats = self._images([items[i]["source"] for i in with_source])
                for i, lat in zip(with_source, lats):
                    new[i]["source_latent.npy"] = npy_bytes(lat)
        return new

    def _record(self, item: dict[str, Any]) -> bytes:
        rec = dict(item["record"])
        rec["precomputed"] = {
            "text": self.origin if self.text_encoder is not None else None,
            "latent": self.origin if self.codec is not None else None,
            "resolution": item["resolution"], "prompt": item["prompt"],
            "max_length": getattr(self.text_encoder, "max_length", None)}
        return json.dumps(rec, ensure_ascii=False).encode("utf-8")

    def process_shard(self, src: Path, dst: Path, stats: Stats, bar: tqdm | None = None) -> None:
        """Write `dst` from `src` (temp name, then rename)."""
        from cologen.data.records import BadSample

        dst.parent.mkdir(parents=True, exist_ok=True)
        with ShardWriter(dst) as out:  # a temp name renamed when complete, with its manifest
            pending: list[tuple[str, list[tuple[str, bytes]], dict[str, Any] | None]] = []

            def flush() -> None:
                ready = [p for p in pending if p[2] is not None]
                encoded = iter(self.encode([p[2] for p in ready])) if ready else iter(())
                for key, members, item in pending:
                    extra, record = ({}, None) if item is None else (next(encoded), self._record(item))
                    _write(out, key, members, record, extra)
                    stats.samples += int(item is not None)
                if bar is not None:
                    bar.update(len(pending))
                pending.clear()

            for key, members in iter_tar_samples(src):
                members = [(f, d) for f, d in members if not f.endswith(".npy")]  # re-running replaces arrays
                try:
                    item = self._prepare(key, members)
                except BadSample as e:
                    stats.skipped[f"{e.category}: {e.reason}"] += 1
                    item = None  # copied through untouched, without arrays
                pending.append((key, members, item))
                if len(pending) >= self.batch_size:
                    flush()
            flush()


def _write(out: ShardWriter, key: str, members: list[tuple[str, bytes]], record: bytes | None,
           extra: dict[str, bytes]) -> None:
    out.write(key, [(f, record if f == "json" and record is not None else d) for f, d in members]
              + sorted(extra.items()))


def shard_pairs(specs: Sequence[str], output: Path) -> list[tuple[Path, Path]]:
    """(input shard, output shard): a folder's shards keep their path relative to it."""
    pairs = []
    for spec in specs:
        root = Path(spec)
        for path in resolve_inputs([spec], (".tar",)):
            rel = path.relative_to(root) if root.is_dir() else Path(path.name)
            pairs.append((path, output / rel))
    if len({dst for _, dst in pairs}) != len(pairs):
        fail("two input shards map to the same output name; convert the folders separately")
    return pairs


def run(pairs: Sequence[tuple[Path, Path]], precomputer: Precomputer, progress: bool = True) -> Stats:
    stats = Stats()
    t0 = time.perf_counter()
    bar = tqdm(desc=NAME, unit="sample", disable=not progress, dynamic_ncols=True)
    for src, dst in pairs:
        if dst.exists():
            stats.shards_skipped += 1
            continue
        precomputer.process_shard(src, dst, stats, bar)
        stats.shards_written += 1
    bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def main(argv: Sequence[str] | None = None) -> Stats:
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m data_recipes.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="shard files, folders or globs")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--flux", required=True, help="local diffusers-format FLUX.1 folder")
    p.add_argument("--resolution", type=int, default=512, help="the training run's data.resolution")
    p.add_argument("--aspect-buckets", action="store_true", help="as data.aspect_buckets")
    p.add_argument("--bucket-multiple", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512, help="T5 tokens per prompt (FLUX.1-dev: 512)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", help="encoder dtype (float32 on CPU)")
    p.add_argument("--no-text", action="store_true", help="latents only")
    p.add_argument("--no-latents", action="store_true", help="text embeddings only")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    flux = require_path(args.flux, "FLUX folder")
    pairs = shard_pairs(args.input, args.output)

    from cologen.model.codecs import VAECodec
    from cologen.model.presets import parse_dtype
    from cologen.model.text_encoders import FluxTextEncoder

    dtype = parse_dtype(args.dtype)
    text = None if args.no_text else FluxTextEncoder.from_pretrained(flux, dtype=dtype, device=args.device,
                                                                      max_length=args.max_length)
    codec = None if args.no_latents else VAECodec.from_pretrained(flux, dtype=dtype, device=args.device)
    pre = Precomputer(text, codec, str(flux.resolve()), args.resolution, args.aspect_buckets, args.bucket_multiple,
                      args.batch_size, args.device)
    stats = run(pairs, pre, progress=not args.quiet)
    print(stats.text())
    return stats


if __name__ == "__main__":
    main()
