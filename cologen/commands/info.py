"""`cologen info CKPT`: a JSON summary of a checkpoint (no model is built)."""

from __future__ import annotations

import argparse
import json
import sys

from cologen import checkpoints
from cologen.errors import UsageError


def summarize(path: str) -> dict:
    ckpt = checkpoints.check(path)
    meta = ckpt["cologen"]
    curriculum = checkpoints.curriculum_state(ckpt)
    num_active = meta["num_active"]
    out = {
        "checkpoint": str(path),
        "preset": meta["preset"],
        "global_step": ckpt.get("global_step"),
        "epoch": ckpt.get("epoch"),
        "experts": {"allocated": meta["prw"]["num_experts"], "active": list(range(num_active)),
                    "frozen": list(range(max(num_active - 1, 0))),
                    "training": num_active - 1 if num_active else None},
        "trainable_parameters": meta.get("trainable_parameters"),
        "stored_tensors": len(ckpt["state_dict"]),
        "routing": meta.get("routing"),
    }
    if curriculum and curriculum.get("index") is not None:
        step = curriculum["spec"]["steps"][curriculum["index"]]
        out["curriculum"] = {"step": curriculum["index"], "name": step["name"], "stage": step["stage"],
                             "steps_done_in_step": curriculum["done"], "step_length": step["steps"],
                             "run_steps": curriculum["spec"].get("run_steps")}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cologen info", description=__doc__)
    parser.add_argument("checkpoint")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(summarize(args.checkpoint), indent=2))
    except UsageError as err:
        print(f"cologen info: {err}", file=sys.stderr)
        raise SystemExit(2) from None
