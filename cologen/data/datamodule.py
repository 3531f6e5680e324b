"""`MixtureDataModule`: the streaming, task-mixing, DDP-safe data of every CoLoGen run.

Training: per rank, logical streams of batches (`stream.py`, one per worker), each a pure function of (seed,
rank, epoch, position) and the mixture schedule: resampled shards by default, shuffled before decoding, bad
samples counted and replaced, batches assembled per worker, `batches_per_epoch` batches per epoch on every
rank (so DDP ranks never wait on each other). Attached to a trainer, the loader starts where the trainer's
progress says (a resumed fit continues with exactly the batches an uninterrupted one would have drawn).
The mixture is one schedule of (first batch, weights) entries: `set_mixture_schedule` sets it (the curriculum's
exact switches), `set_mixture` is its shorthand for "these weights from the next batch no worker has started";
`state_dict` carries it across a resume.

Validation: a list of per-task DataLoaders (in `val_tasks` order) over a fixed, non-resampled set of
`val_samples_per_task` examples each; every batch also carries its `task` field.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from cologen.data.builders import BuilderConfig
from cologen.data.collate import already_collated
from cologen.data.geometry import make_buckets
from cologen.data.manifest import without_manifest
from cologen.data.mixture import MixtureDataset, MixtureLoader
from cologen.data.precomputed import COUNTS, PrecomputedArrays
from cologen.data.schedule import MixtureState, Schedule, check_schedule, entry_at
from cologen.data.shards import expand_shards
from cologen.data.skips import SharedCounts, SkipCounter
from cologen.data.tasks import SCENE_TASKS, TASKS, check_task
from cologen.data.validation import FixedTaskDataset, RankShare

log = logging.getLogger("cologen.data")
ShardSpec = str | list[str]


def _with_scene_fallback(shards: Mapping[str, ShardSpec]) -> dict[str, ShardSpec]:
    """`t2i` and `reconstruct` read the inpainting scenes unless given shards of their own."""
    out = {check_task(t): v for t, v in shards.items()}
    for t in SCENE_TASKS:
        if t not in out and "inpainting" in out:
            out[t] = out["inpainting"]
    return out


class MixtureDataModule(L.LightningDataModule):
    """Streaming mixture of CoLoGen tasks. See docs/data.md ("The DataModule") for every argument.

    Args:
        train_shards: per task, shard paths / brace patterns / globs / directories (or a list of them).
            `t2i` and `reconstruct` fall back to the inpainting shards.
        mixture: sampling weight per task (normalized; tasks absent or 0 are not drawn): the schedule
            `[(0, mixture)]` until `set_mixture_schedule` / `set_mixture` / a checkpoint says otherwise.
        val_shards: per task, the validation shards (same forms; same fallback).
        batch_size: examples per batch, assembled inside each worker.
        num_workers: DataLoader workers per rank.
        resolution: output side in pixels (32 for the tiny preset); with `aspect_buckets`, the bucket area.
        aspect_buckets: FLUX preset: batch by aspect-ratio bucket instead of centre-cropping to a square.
        bucket_multiple: bucket sides are multiples of this (16 = VAE 8 x 2x2 packing).
        seed: base seed of every stream (combined with rank, epoch and logical stream).
        batches_per_epoch: batches per epoch on every rank.
        val_samples_per_task: size of each task's fixed validation set.
        val_batch_size: defaults to `batch_size`.
        val_tasks: tasks to validate (default: every task with validation shards).
        builder: task builder options (mask proportions, overlay kinds and colours, control types,
            annotator weight paths, prompt templates).
        resampled: draw shards with replacement (the DDP-safe default); False splits shards by rank and
            worker and needs at least ranks x workers shards per task.
        shuffle_buffer: raw samples per task and worker in the shuffle buffer.
        prefetch_factor: batches each worker keeps ready.
        max_consecutive_skips: this many bad samples in a row in one worker raise instead of spinning.
        rank, world_size: override the distributed rank (normally read from the trainer).
        use_precomputed: put the arrays of `data_recipes.precompute` shards into the batch (`text_tokens`,
            `text_pooled`, `target_latent`, `source_latent`) where they match what was built (see
            `cologen/data/precomputed.py`); `precomputed_counts` says how many were used and why not.
    """

    def __init__(
        self,
        train_shards: dict[str, ShardSpec],
        mixture: dict[str, float],
        val_shards: dict[str, ShardSpec] | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        resolution: int = 32,
        aspect_buckets: bool = False,
        bucket_multiple: int = 16,
        seed: int = 0,
        batches_per_epoch: int = 1000,
        val_samples_per_task: int = 64,
        val_batch_size: int | None = None,
        val_tasks: list[str] | None = None,
        builder: BuilderConfig | None = None,
        resampled: bool = True,
        shuffle_buffer: int = 500,
        prefetch_factor: int = 2,
        max_consecutive_skips: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        use_precomputed: bool = True,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("resolution", resolution),
                            ("batches_per_epoch", batches_per_epoch), ("val_samples_per_task", val_samples_per_task),
                            ("prefetch_factor", prefetch_factor), ("bucket_multiple", bucket_multiple)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"rank and world_size go together with 0 <= rank < world_size, got {rank}, {world_size}")
        self.train_shards = _with_scene_fallback(train_shards)
        self.val_shards = _with_scene_fallback(val_shards or {})
        self.builder = builder or BuilderConfig()
        self.builder.validate()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.resolution, self.seed = resolution, seed
        self.buckets = make_buckets(resolution, bucket_multiple) if aspect_buckets else None
        self.batches_per_epoch = batches_per_epoch
        self.val_samples_per_task = val_samples_per_task
        self.val_batch_size = val_batch_size or batch_size
        self.val_tasks = [check_task(t) for t in val_tasks] if val_tasks is not None else [
            t for t in TASKS if t in self.val_shards]
        missing = [t for t in self.val_tasks if t not in self.val_shards]
        if missing:
            raise ValueError(f"val_tasks {missing} have no val_shards")
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.prefetch_factor = prefetch_factor
        self._rank, self._world_size = rank, world_size
        # train tasks in canonical order; the shared state is created here so that the mixture setters and
        # load_state_dict work before, during and after iteration
        tasks = [t for t in TASKS if t in self.train_shards]
        self._tasks = tasks
        self._state = MixtureState(tasks, self._checked_schedule([(0, mixture)], "mixture"))
        self._explicit_schedule = False  # set in this process: wins over a checkpoint's schedule
        # weak: the loader holds the DataModule (its start), and a cycle would leave the loader's workers to
        # the cyclic garbage collector, whose shutdown of them stalls (5 s per worker)
        self._loader_ref: weakref.ref[MixtureLoader] | None = None
        self._next_epoch = 0  # outside a trainer, each new train iterator starts the next epoch
        self._skips = SkipCounter(slots=num_workers + 1, max_consecutive=max_consecutive_skips)
        self.use_precomputed = use_precomputed
        self._arrays = PrecomputedArrays(SharedCounts(COUNTS, slots=num_workers + 1)) if use_precomputed else None
        self._urls: dict[str, list[str]] | None = None
        self._val_sets: dict[str, FixedTaskDataset] | None = None

    # --- mixture ---------------------------------------------------------------------------------------

    def _checked_schedule(self, schedule: Sequence[tuple[int, Mapping[str, float]]],
                          what: str | None = None) -> Schedule:
        for entry in schedule:
            for t in entry[1] if isinstance(entry, (tuple, list)) and len(entry) == 2 else ():
                check_task(t)
        return check_schedule(schedule, self._tasks, what)

    def set_mixture_schedule(self, schedule: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """Draw batch g (global index of this fit on this rank: epoch e, batch b -> e x batches_per_epoch + b)
        with the weights of the last entry whose start <= g. Call it before the training iterator starts
        (a callback's `setup` / `on_fit_start`); it replaces the whole schedule (and a checkpoint's). The first
        entry must start at 0."""
        if self._loader is not None and self._loader.active and self._loader.frontier > 0:
            log.warning("set_mixture_schedule on a running loader: batches before %d may already be drawn with "
                        "the previous schedule", self._loader.frontier)
        self._use_schedule(self._checked_schedule(schedule))

    def _use_schedule(self, checked: Schedule) -> None:
        self._state.set_schedule(checked)
        self._explicit_schedule = True
        log.info("data mixture schedule set: %s", [(g, {t: round(w, 4) for t, w in m.items()}) for g, m in checked])

    @property
    def train_tasks(self) -> list[str]:
        """The tasks with train shards (`t2i` and `reconstruct` through the inpainting fallback), in canonical order."""
        return list(self._tasks)

    @property
    def mixture_schedule(self) -> Schedule:
        return self._state.schedule()

    def set_mixture(self, weights: Mapping[str, float]) -> None:
        """The schedule's entries before `next_batch` followed by `(next_batch, weights)`: `weights` for the rest
        of the fit from the next batch no worker has started. On a running loader that is `frontier` (at most
        `mixture_latency_batches` after the batch the training step holds). Deterministic given when it is
        called, and recorded in the schedule, so a checkpoint replays it."""
        p = self._checked_schedule([(0, weights)], "mixture")[0][1]
        start = self.next_batch
        kept = [(g, w) for g, w in self._state.schedule() if g < start]
        self._use_schedule(kept + [(start, p)] if kept else [(0, p)])

    @property
    def next_batch(self) -> int:
        """The global index of the first batch no worker can have started: the train loader's `frontier`; before
        any loader, where the next train iterator starts."""
        loader = self._loader
        if loader is not None:
            return loader.frontier
        start = self.train_position()
        return self._next_epoch * self.batches_per_epoch if start is None else start

    @property
    def mixture(self) -> dict[str, float]:
        """The normalized weights of the next batch to be drawn."""
        return dict(entry_at(self._state.schedule(), self.next_batch)[1])

    @property
    def mixture_latency_batches(self) -> int:
        """Batches the training step may still receive with the old weights after `set_mixture` returns on a
        running loader: those the workers may have started (prefetch_factor each) and the one Lightning
        prefetches."""
        return self.num_workers * self.prefetch_factor + 1

    @property
    def mixture_latency_samples(self) -> int:
        return self.mixture_latency_batches * self.batch_size

    # --- bad samples -----------------------------------------------------------------------------------

    @property
    def bad_samples(self) -> dict[str, int]:
        """Skipped samples so far (train and validation, all workers) per category, plus 'total'."""
        counts = self._skips.by_category()
        counts["total"] = sum(counts.values())
        return counts

    @property
    def bad_sample_count(self) -> int:
        return self._skips.total()

    @property
    def precomputed_counts(self) -> dict[str, int]:
        """Samples that carried precomputed arrays, samples whose arrays were not used by reason (`prompt`,
        `resolution`, `view`, `unreadable`), and batches that dropped an array not every sample had
        (`mixed_batch`); train and validation, all workers. Empty with `use_precomputed=False`."""
        return self._arrays.counts.totals() if self._arrays is not None else {}

    # --- distributed -----------------------------------------------------------------------------------

    def _dist(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank, self._world_size
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _train_urls(self) -> dict[str, list[str]]:
        if self._urls is None:
            self._urls = {t: expand_shards(self.train_shards[t], f"data.train_shards.{t}") for t in self._state.tasks}
            self._warn_without_manifest("train_shards", self._urls)
        return self._urls

    def _warn_without_manifest(self, what: str, urls: Mapping[str, Sequence[str]]) -> None:
        """Once per shard list: shards without a manifest load, but a truncated one reads as a shorter one."""
        every = list(dict.fromkeys(u for task_urls in urls.values() for u in task_urls))  # t2i reuses inpainting's
        missing = without_manifest(every)
        if missing:
            log.warning("%s: %d of %d shards have no manifest (e.g. %s): a truncated one cannot be told from a "
                        "shorter one; `python -m data_recipes.check --write-manifests` adds them", what, len(missing),
                        len(every), missing[0])

    def locate_shards(self, stage: str = "fit") -> None:
        """Expand every shard pattern `stage` reads (fit: train and validation; validate / test: validation) and
        fail with one line naming the first that matches nothing and the command that writes it. Commands call it
        before they create anything (run folder, loggers)."""
        if stage == "fit":
            self._train_urls()
        if stage in ("fit", "validate", "test"):
            for t in self.val_tasks:
                expand_shards(self.val_shards[t], f"data.val_shards.{t}")

    def check_shards(self) -> None:
        """Without resampling each rank x worker reads its own shards: refuse too few of them."""
        if self.resampled:
            return
        rank, world = self._dist()
        need = world * max(1, self.num_workers)
        for t, urls in self._train_urls().items():
            if len(urls) < need:
                raise ValueError(f"train_shards.{t}: {len(urls)} shards for {world} ranks x {max(1, self.num_workers)} "
                                 f"workers = {need} readers with resampled=False; add shards or set resampled=True")

    # --- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._train_urls()
            self.check_shards()

    def train_position(self) -> int | None:
        """The global batch index the trainer's training loop is at (None outside a fit): epochs done x
        batches_per_epoch + batches processed in the current epoch. Lightning restores these counters before
        it calls `iter()` on the train loader, and counts only batches that went through `training_step`,
        so its one-batch prefetch does not shift this."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        epochs = trainer.fit_loop.epoch_progress.current
        # between `processed` and the next `started` the batch counters still describe the finished epoch
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed if epochs.started > epochs.processed else 0
        return epochs.processed * self.batches_per_epoch + batches

    def _iterator_start(self) -> int:
        """Where a new train iterator starts (the trainer's position, else the epoch after the previous
        iterator's, whichever loader it came from)."""
        start = self.train_position()
        start = self._next_epoch * self.batches_per_epoch if start is None else start
        self._next_epoch = start // self.batches_per_epoch + 1
        return start

    def train_dataloader(self) -> MixtureLoader:
        self.check_shards()
        rank, world = self._dist()
        dataset = MixtureDataset(
            self._train_urls(), self._state, self._skips, builder=self.builder, resolution=self.resolution,
            buckets=self.buckets, batch_size=self.batch_size, seed=self.seed, rank=rank, world_size=world,
            resampled=self.resampled, shuffle_buffer=self.shuffle_buffer, batches_per_epoch=self.batches_per_epoch,
            arrays=self._arrays)
        if self._loader is not None:
            self._loader.close()  # replaced (e.g. reload_dataloaders_every_n_epochs): stop its workers now
        loader = MixtureLoader(dataset, self.batches_per_epoch, self._iterator_start,
                               num_workers=self.num_workers, prefetch_factor=self.prefetch_factor)
        self._loader_ref = weakref.ref(loader)
        return loader

    @property
    def _loader(self) -> MixtureLoader | None:
        """The latest train loader, while someone holds it."""
        return self._loader_ref() if self._loader_ref is not None else None

    def val_datasets(self) -> dict[str, FixedTaskDataset]:
        if self._val_sets is None:
            urls = {t: expand_shards(self.val_shards[t], f"val_shards.{t}") for t in self.val_tasks}
            self._warn_without_manifest("val_shards", urls)
            self._val_sets = {
                t: FixedTaskDataset(urls[t], t,
                                    self.val_samples_per_task, self._skips, builder=self.builder,
                                    resolution=self.resolution, buckets=self.buckets, seed=self.seed,
                                    batch_size=self.val_batch_size, arrays=self._arrays)
                for t in self.val_tasks}
        return self._val_sets

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task of `val_tasks` (dataloader_idx i is val_tasks[i]); batches hold one task. Under DDP
        each batch goes to one rank, and shorter ranks run padding batches (`valid` False) that metrics drop."""
        rank, world = self._dist()
        return [DataLoader(ds, batch_size=None, shuffle=False, num_workers=0, collate_fn=already_collated,
                           sampler=RankShare(len(ds), rank, world) if world > 1 else None)
                for ds in self.val_datasets().values()]

    def state_dict(self) -> dict[str, Any]:
        """The schedule (with every `set_mixture`) and the weights of the next batch; Lightning saves it in
        checkpoints."""
        return {"schedule": [[g, w] for g, w in self._state.schedule()], "mixture": self.mixture}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checkpoint's schedule, unless this process already set one (`set_mixture_schedule` /
        `set_mixture`, e.g. in a callback's `setup`): the explicit one wins."""
        if self._explicit_schedule:
            return
        if "schedule" in state_dict:
            self._state.set_schedule(self._checked_schedule([(int(g), w) for g, w in state_dict["schedule"]]))

    def teardown(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self._loader is not None:
            self._loader.close()
        counts = self.bad_samples
        if stage in (None, "fit"):
            msg = f"data: {counts['total']} bad samples skipped" + (
                f" ({', '.join(f'{k} {v}' for k, v in counts.items() if v and k != 'total')})" if counts["total"] else "")
            rank, world = self._dist()
            msg = f"[rank {rank}] {msg}" if world > 1 else msg
            log.info(msg)
            print(msg)
