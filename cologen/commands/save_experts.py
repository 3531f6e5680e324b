"""`python -m cologen.commands.save_experts CKPT OUT_DIR`: the trained tiny experts that ship with cologen (what
`cologen demo` serves on a fresh clone): the checkpoint exported as a pipeline folder with float16 adapters, their
sha256 (checked on load), and the ShapeWorld examples of `examples/requests.jsonl` for the demo page."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cologen.commands.export import export
from cologen.model.presets import file_sha256
from cologen.pipeline import ADAPTER_FILE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def save_experts(checkpoint: str, out_dir: str, examples: Path = EXAMPLES) -> str:
    out = export(checkpoint, out_dir, "float16")
    digest = file_sha256(out / ADAPTER_FILE)
    (out / "sha256").write_text(digest + "\n")
    shutil.rmtree(out / "examples", ignore_errors=True)
    (out / "examples").mkdir()
    listing = []
    for line in (examples / "requests.jsonl").read_text().splitlines():
        request = json.loads(line)
        entry = {"task": request["task"], "prompt": request["prompt"], "source": request.get("source")}
        if entry["source"]:
            shutil.copy(examples / entry["source"], out / "examples" / entry["source"])
        listing.append(entry)
    (out / "examples" / "examples.json").write_text(json.dumps(listing, indent=1) + "\n")
    return digest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    digest = save_experts(args.checkpoint, args.out_dir)
    print(f"tiny experts written to {args.out_dir} (sha256 {digest[:16]}...)")


if __name__ == "__main__":
    main()
