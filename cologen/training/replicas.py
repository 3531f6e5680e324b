"""ReplicaReport: what each rank of a multi-process run trained, written per rank, compared across ranks.

Data-parallel ranks must hold identical trainable weights after every optimizer step; a rank that drifts (a
gradient that was not synchronized, a parameter unfrozen after the strategy wrapped the model) trains silently
wrong. The callback records, every `every_n_steps` optimizer steps, a digest of each expert's and the routers' full
weights (gathered when sharded), of the frozen base (optional: it reads every base weight), the curriculum step and
the number of active experts; it writes `rank{R}.json` into `dirpath` at the end of training and logs a warning
when the ranks' digests differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from cologen.sharding import full_tensor

log = logging.getLogger("cologen.replicas")


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """sha256 of the tensors' full values (DTensors are gathered: every rank must call this in the same order)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(full_tensor(t).detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class ReplicaReport(Callback):
    """Args:
    dirpath: where `rank{R}.json` goes (one file per rank).
    every_n_steps: record every this many optimizer steps (and after the last).
    include_base: also digest the frozen base (reads every base weight: cheap on toy models, slow on FLUX).
    """

    def __init__(self, dirpath: str, every_n_steps: int = 1, include_base: bool = False):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.include_base = include_base
        self.records: list[dict[str, Any]] = []
        self._last = -1

    @staticmethod
    def _curriculum_index(trainer: L.Trainer) -> int | None:
        for cb in trainer.callbacks:
            if type(cb).__name__ == "CurriculumCallback":
                return cb.index
        return None

    def snapshot(self, trainer: L.Trainer, module) -> dict[str, Any]:
        model = module.model
        record: dict[str, Any] = {"global_step": int(trainer.global_step), "num_active": int(model.num_active),
                                  "curriculum_step": self._curriculum_index(trainer)}
        record["experts"] = [tensor_digest(model.expert_parameters(e)) for e in range(model.prw.num_experts)]
        record["routers"] = tensor_digest(model.router_parameters())
        record["trainable"] = [e for e in range(model.prw.num_experts)
                               if any(p.requires_grad for p in model.expert_parameters(e))]
        if self.include_base:
            record["base"] = tensor_digest(model.base_parameters())
        return record

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._last and step % self.every_n_steps == 0:
            self._last = step
            self.records.append(self.snapshot(trainer, pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.records.append(self.snapshot(trainer, pl_module))
        self.dirpath.mkdir(parents=True, exist_ok=True)
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "records": self.records}
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=1) + "\n")
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, self.records[-1])
            if any(g != gathered[0] for g in gathered):
                log.warning("ranks disagree on their trained weights at step %d: %s", trainer.global_step, gathered)


def read_reports(dirpath: str | Path) -> dict[int, list[dict[str, Any]]]:
    """The records of every rank's `rank{R}.json` in `dirpath`, by rank."""
    reports = [json.loads(p.read_text()) for p in sorted(Path(dirpath).glob("rank*.json"))]
    return {r["rank"]: r["records"] for r in reports}
