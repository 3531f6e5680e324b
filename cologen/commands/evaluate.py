"""`cologen eval PROTOCOL`: score a model on a benchmark protocol and write a JSON and a markdown table.

    cologen eval shapeworld --ckpt runs/tiny/stage3/last.ckpt --probes 64 --oracle --out runs/tiny/stage3/eval
    cologen eval shapeworld --base --config experiments/tiny/curriculum.yaml --out runs/tiny/base_only
    cologen eval shapeworld --ckpt runs/tiny/stage3/last.ckpt --tasks grounding --routing-terms
    cologen eval shapeworld --ckpt runs/tiny/stage3/last.ckpt --tasks editing grounding --by-kind
    cologen eval denoising --ckpt runs/tiny/grounding_alone/last.ckpt --tasks grounding --oracle-gates both
    cologen eval gates --ckpt runs/tiny/stage3/last.ckpt --tasks inpainting grounding editing --out runs/tiny/gates
    cologen eval dreambench --ckpt CKPT_OR_EXPORT --data data/eval/dreambench --clip CLIP --dino DINO --out OUT
    cologen eval multigen --condition canny --ckpt ... --data data/eval/multigen_canny_eval --clip CLIP --out OUT

`shapeworld` scores the validation probes of each task (the same ones SampleValidation uses, each with its own
noise seed) with 95% confidence intervals, with the routers' choice and with oracle routing; `--config` takes a
training config whose `data.init_args.builder` builds the probes; `--routing-terms` splits each block's routing
margin (a task's own expert over its strongest rival) into the router's terms; `--by-kind` scores each kind of probe
apart too (an edit's operation, grounding's overlay, control's condition type, inpainting's mask shape). `denoising` measures the one-step
error of the clean-image estimate on the tokens a task changes and on those it keeps, by noise level, optionally with
the token gates forced to the truth (`cologen.eval.denoising`); `gates`, how well the hard token gates find those
changed tokens (recall and precision per block and for their union, `cologen.eval.gate_accuracy`). The benchmark protocols (`dreambench`,
`magicbrush`, `emu_edit`, `gedit_bench`, `multigen`) read the evaluation shards the data_recipes commands write
and take the metric networks from local paths (docs/metrics.md names the command for each paper table).

`--out` receives `metrics.json`, `table.md` and `scores.jsonl` (one line per sample; ShapeWorld: per probe and
routing mode).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import math
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from cologen import checkpoints
from cologen.data.tasks import CURRICULUM_TASKS, MULTI_CONDITION_TASKS, SCENE_TASKS, stored_task
from cologen.errors import MissingInput, UsageError

DEFAULT_DATA = "data/shapeworld"


def load_module(checkpoint: str | None, base: str = "builtin"):
    """A CoLoGenModule from a checkpoint, or a tiny base with its (zero-initialised) first expert: the committed
    one ('builtin') or a base folder (what `make base` and `save_base` write)."""
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule

    if checkpoint is None:
        return CoLoGenModule(preset=TinyPreset(base=base))
    checkpoints.verify(checkpoint)
    return CoLoGenModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)


def builder_from_config(path: str | None) -> dict:
    """`data.init_args.builder` of a training config (YAML), or {} for the defaults."""
    if path is None:
        return {}
    from omegaconf import OmegaConf

    if not Path(path).is_file():
        raise MissingInput(f"config {path} does not exist")
    data = OmegaConf.to_container(OmegaConf.load(path)).get("data") or {}
    return dict((data.get("init_args") or {}).get("builder") or {})


def val_datasets(data: str, tasks: list[str], n: int, seed: int = 0, builder: dict | None = None) -> dict:
    """Each task's validation dataset of `n` examples (collated batches), built as the curriculum's validation
    builds them."""
    from cologen.data.builders import BuilderConfig
    from cologen.data.datamodule import MixtureDataModule

    root = Path(data)
    # the base's scene tasks (text-to-image) read any scene record: the inpainting shards', as `make base` does
    folder = {t: "inpainting" if t in SCENE_TASKS else stored_task(t) for t in tasks}
    missing = [t for t in tasks if not list((root / folder[t]).glob("val-*.tar"))]
    if missing:
        raise MissingInput(f"no validation shards for {missing} under {root}: run `make data` (ShapeWorld) or "
                                "pass --data")
    shards = {t: str(root / folder[t] / "val-*.tar") for t in tasks}  # derived tasks read their source's
    dm = MixtureDataModule(train_shards=shards, val_shards=shards, mixture={tasks[0]: 1.0}, num_workers=0,
                           val_samples_per_task=n, val_tasks=tasks, seed=seed,
                           builder=BuilderConfig(**(builder or {})))
    return dm.val_datasets()


def load_probes(data: str, tasks: list[str], n: int, seed: int = 0, builder: dict | None = None):
    """The first `n` validation examples of each task (`val_datasets`), as standalone probes."""
    from cologen.eval.probes import probes_from_batch

    return {task: [p for i in range(len(ds)) for p in probes_from_batch(ds[i], n)][:n]
            for task, ds in val_datasets(data, tasks, n, seed, builder).items()}


def evaluate(module, probes: dict, *, steps: int = 16, seed: int = 0, oracle: bool = False,
             routing_terms: dict | None = None, sampler: dict | None = None, other_sources: bool = False,
             true_gates: bool = False, learned: bool = True) -> list[dict]:
    """Per-probe score lines (`task`, `index`, `key`, `routing`, `{task}/{metric}`...) for every task. A dict
    given as `routing_terms` receives, per task, what each block's learned routing rested on
    (`cologen.eval.routing_terms`). `sampler`: further sampler settings (`cfg_scale`, `image_cfg_scale`, `strength`, `effect_mask`) and
    `keep_unmasked` (`sample_probes`).
    `other_sources`: each probe is sampled with the next probe's condition image and scored against its own target
    (`with_other_conditions`: what the model takes from its condition). `true_gates`: each task's probes are also
    sampled with the token gates forced to the truth (`run_probes_with_true_gates`), lines `routing: true_gates`
    (the routers' choice, a perfect localiser's gates). `learned` False skips the routers' own (and the oracle's)
    sampling: the true gates' lines alone, for a checkpoint whose learned scores exist already."""
    sampler = dict(sampler or {})
    from cologen.eval.probes import (
        oracle_repeats_learned,
        own_expert_share,
        run_probes,
        run_probes_with_true_gates,
        with_other_conditions,
    )
    from cologen.eval.routing_terms import record_routing_terms, summarize_routing_terms
    from cologen.eval.shapeworld import probe_kind

    module.eval()
    modes = ([False, True] if oracle and module.model.num_active > 1 else [False]) if learned else []
    lines = []
    for task, task_probes in probes.items():
        recording = record_routing_terms(module.model) if routing_terms is not None else contextlib.nullcontext({})
        if other_sources:
            sampler["sample_with"] = with_other_conditions(task_probes)
        if learned:
            with recording as records:
                routed = run_probes(module, task, task_probes, seed=seed, steps=steps, **sampler)
            if routing_terms is not None and task in module.task_experts:
                routing_terms[task] = summarize_routing_terms(records, module.task_experts[task],
                                                              module.model.num_active)
        for forced in modes:
            # the learned run is exactly the oracle's when every decision already chose the task's own expert
            run = routed if not forced or oracle_repeats_learned(module, task, routed) else run_probes(
                module, task, task_probes, seed=seed, oracle=True, steps=steps, **sampler)
            own = module.task_experts.get(task)
            share = own_expert_share(run.routing, own) if own is not None and not forced else float("nan")
            for i, (p, row) in enumerate(zip(task_probes, run.rows)):
                kind = probe_kind(p)
                lines.append({"task": task, "index": i, "key": p["key"], "routing": "oracle" if forced else "learned",
                              **({"kind": kind} if kind is not None else {}), "own_expert": share, **row})
        gated = run_probes_with_true_gates(module, task, task_probes, seed=seed, steps=steps, **sampler) \
            if true_gates and module.model.num_active else None
        for i, (p, row) in enumerate(zip(task_probes, gated.rows if gated is not None else [])):
            kind = probe_kind(p)
            lines.append({"task": task, "index": i, "key": p["key"], "routing": "true_gates",
                          **({"kind": kind} if kind is not None else {}), **row})
    return lines


def summarize(lines: list[dict], by_kind: bool = False) -> dict[str, dict]:
    """`{routing}/{task}/{metric}` -> mean and 95% interval (bootstrap over probes); with `by_kind`, also
    `{routing}/{task}[{kind}]/{metric}` over the probes of each kind (`cologen.eval.shapeworld.probe_kind`)."""
    from cologen.metrics.stats import bootstrap_ci

    groups: dict[str, list[float]] = {}
    for line in lines:
        for key, value in line.items():
            if "/" in key and isinstance(value, (int, float)):
                groups.setdefault(f"{line['routing']}/{key}", []).append(float(value))
                if by_kind and "kind" in line:
                    task, metric = key.split("/", 1)
                    groups.setdefault(f"{line['routing']}/{task}[{line['kind']}]/{metric}", []).append(float(value))
    return {k: bootstrap_ci([v]).as_dict() for k, v in sorted(groups.items())}


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def markdown_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = [header, tuple("---" for _ in header), *rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


class ModelGenerate:
    """`generate(sample)` for the protocol loop with a `CoLoGenPipeline`: the protocol's task, the sample's prompt
    and condition image, `size` x `size`, seed `seed + index`."""

    def __init__(self, pipe, task: str, *, steps: int | None, size: int | None, seed: int):
        self.pipe, self.task, self.steps, self.seed, self.count = pipe, task, steps, seed, 0
        self.size = size or self.pipe.sample_size

    def __call__(self, sample: dict):
        seed, self.count = self.seed + self.count, self.count + 1
        return self.pipe(str(sample["prompt"]), image=sample.get("condition"), task=self.task, height=self.size,
                         width=self.size, num_inference_steps=self.steps, seed=seed, progress=False).images[0]


def check_benchmark_inputs(args: argparse.Namespace) -> None:
    """The protocol's shards and every metric-network path given, checked before anything loads (one line each)."""
    from cologen.eval.protocols import PROTOCOLS, eval_shards

    eval_shards(args.data)
    for weight in PROTOCOLS[args.protocol].weights:
        path = getattr(args, weight, None)
        if path is not None and not Path(path).exists():
            raise MissingInput(f"--{weight}: {path} does not exist")


def benchmark_samples(args: argparse.Namespace) -> Iterator[dict]:
    """The protocol's samples from its evaluation shards, at most `args.limit`."""
    from cologen.eval.protocols import PROTOCOLS, read_eval_shards

    protocol = PROTOCOLS[args.protocol]
    samples = (protocol.to_sample(stored, raw, args) for stored, raw in read_eval_shards(args.data))
    return itertools.islice(samples, args.limit)


def run_benchmark(args: argparse.Namespace, pipe=None) -> dict[str, float]:
    """One benchmark protocol end to end: shards -> generate -> score; writes the outputs to `args.out`. `pipe`:
    the model to score (default: loaded from `args.ckpt`, a checkpoint or an exported folder)."""
    from cologen.commands.export import load_pipeline
    from cologen.eval.loop import run_protocol
    from cologen.eval.protocols import PROTOCOLS

    protocol = PROTOCOLS[args.protocol]
    check_benchmark_inputs(args)  # every input is checked before a network loads
    scorer = protocol.scorer(args)  # the metric networks load (or fail with the missing path) before the model
    pipe = load_pipeline(args.ckpt, args.base_model) if pipe is None else pipe
    generate = ModelGenerate(pipe, protocol.task, steps=args.steps, size=args.size, seed=args.seed)
    out = Path(args.out)
    means = run_protocol(benchmark_samples(args), generate, scorer, batch_size=args.batch_size, limit=args.limit,
                         jsonl_path=out / "scores.jsonl", output_dir=out / "images", desc=args.protocol)
    (out / "metrics.json").write_text(json.dumps({k: _clean(v) for k, v in means.items()}, indent=1) + "\n")
    rows = [(k, "n/a" if not math.isfinite(v) else f"{v:.4f}") for k, v in means.items()]
    (out / "table.md").write_text(f"# {args.protocol} ({protocol.table})\n\n" + markdown_table(rows, ("metric",
                                                                                                  "mean")))
    return means


def benchmark_args(command: str, out: str | Path, limit: int | None = None) -> argparse.Namespace:
    """The arguments of `cologen eval COMMAND` (e.g. "dreambench --data ... --clip ... --dino ...") for a model in
    hand rather than on disk (no --ckpt), writing to `out`."""
    argv = shlex.split(command)
    if "--ckpt" in argv or "--out" in argv:
        raise UsageError(f"benchmark {command!r}: give neither --ckpt (the model is the training run's) nor --out")
    if argv and argv[0] == "shapeworld":
        raise UsageError("benchmark 'shapeworld': SampleValidation scores the ShapeWorld probes")
    argv[1:1] = ["--ckpt", "(the training run)", "--out", str(out)] + (["--limit", str(limit)] if limit else [])
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):  # argparse prints its usage and error, then exits
            return _parser().parse_args(argv)
    except SystemExit:
        reason = (errors.getvalue().strip().splitlines() or ["not a cologen eval command"])[-1]
        raise UsageError(f"benchmark {command!r}: {reason}") from None


def check_model_args(args: argparse.Namespace) -> None:
    """`--ckpt` or `--base`, and a readable checkpoint, checked before any data or model loads (fail fast)."""
    if (args.ckpt is None) == (not args.base):
        raise UsageError("give --ckpt or --base (not both)")
    if args.ckpt is not None:
        checkpoints.check(args.ckpt)
    elif args.base != "builtin" and not (Path(args.base) / "model.safetensors").is_file():
        raise MissingInput(f"--base {args.base} holds no model.safetensors: give a tiny base folder (make base, "
                           "cologen.commands.save_base) or --base alone for the committed one")


def set_open_rule(module, rule: str) -> None:
    """`--open-rule`: sample with another rule for which noisy tokens take the expert's velocity than the one the
    model trained with (`prw.open_rule`); a model it does not apply to is one line."""
    try:
        module.model.prw = dataclasses.replace(module.model.prw, open_rule=rule)
    except ValueError as err:
        raise UsageError(f"--open-rule {rule}: {err}") from None


def run_shapeworld(args: argparse.Namespace) -> dict[str, dict]:
    from cologen.eval.routing_terms import routing_terms_table

    check_model_args(args)
    if args.true_gates and (args.cfg_scale != 1.0 or args.image_cfg_scale != 1.0):
        raise UsageError("--true-gates forces one sampler batch's gates, and guidance doubles the batch: leave "
                         "--cfg-scale and --image-cfg-scale at 1")
    if args.skip_learned and not args.true_gates:
        raise UsageError("--skip-learned leaves the true gates' rows alone: give --true-gates too")
    if args.skip_learned and (args.oracle or args.routing_terms):
        raise UsageError("--skip-learned skips the routers' own sampling, which --oracle and --routing-terms need")
    if args.true_gates and args.other_sources:
        raise UsageError("--true-gates takes the truth from each probe's own condition: it does not combine with "
                         "--other-sources")
    probes = load_probes(args.data, args.tasks, args.probes, args.seed, builder_from_config(args.config))
    module = load_module(args.ckpt, args.base or "builtin")
    if args.open_rule:
        set_open_rule(module, args.open_rule)
    terms: dict | None = {} if args.routing_terms else None
    guidance = {"cfg_scale": args.cfg_scale, "image_cfg_scale": args.image_cfg_scale, "strength": args.strength,
                "effect_mask": args.effect_mask, "keep_unmasked": args.keep_unmasked}
    lines = evaluate(module, probes, steps=args.steps, seed=args.seed, oracle=args.oracle, routing_terms=terms,
                     sampler=guidance, other_sources=args.other_sources, true_gates=args.true_gates,
                     learned=not args.skip_learned)
    table = summarize(lines, by_kind=args.by_kind)
    if terms is not None:
        print(routing_terms_table(terms))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if terms is not None:
            (out / "routing_terms.json").write_text(json.dumps(terms, indent=1) + "\n")
            (out / "routing_terms.md").write_text("# routing terms\n\n" + routing_terms_table(terms))
        with open(out / "scores.jsonl", "w") as f:
            for line in lines:
                f.write(json.dumps({k: _clean(v) for k, v in line.items()}) + "\n")
        (out / "metrics.json").write_text(json.dumps({k: {m: _clean(x) for m, x in v.items()}
                                                      for k, v in table.items()}, indent=1) + "\n")
        rows = [(k, f"{e['mean']:.3f}", f"[{e['low']:.3f}, {e['high']:.3f}]", str(e["n"])) for k, e in table.items()]
        (out / "table.md").write_text("# shapeworld\n\n" + markdown_table(rows, ("routing/task/metric", "mean",
                                                                                  "95% CI", "n")))
    return table


def examples_and_module(args: argparse.Namespace) -> tuple[dict, object]:
    """The diagnostic protocols' validation datasets per task (`--data`, `--tasks`, `--probes`, `--seed`, `--config`)
    and model (`--ckpt` / `--base`), the model's arguments checked first."""
    check_model_args(args)
    datasets = val_datasets(args.data, args.tasks, args.probes, args.seed, builder_from_config(args.config))
    return datasets, load_module(args.ckpt, args.base or "builtin")


def write_table_and_json(folder: str, stem: str, title: str, table: str, data) -> None:
    """`folder/stem.md` (a titled markdown table) and `folder/stem.json`."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(f"# {title}\n\n{table}")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")


def run_denoising(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Per task (and gate forcing): the one-step x0 error on changed and kept tokens by noise level."""
    from cologen.eval.denoising import denoising_errors, errors_table, summarize_errors

    datasets, module = examples_and_module(args)
    forcings = {"learned": ()} | {f"forced on {g}": (("source", "noisy") if g == "both" else (g,))
                                  for g in args.oracle_gates}
    summaries = {f"{task}, gates {label}": summarize_errors(denoising_errors(
                     module, (ds[i] for i in range(len(ds))), args.timesteps, args.seed, gates))
                 for task, ds in datasets.items() for label, gates in forcings.items()}
    table = errors_table(summaries)
    print(table, end="")
    if args.out:
        write_table_and_json(args.out, "denoising", "one-step denoising error (x0 estimate, mean squared, per token)",
                             table, {k: [{"t": r["t"], **{name: e.as_dict() for name, e in r.items() if name != "t"}}
                                         for r in v] for k, v in summaries.items()})
    return summaries


def run_gates(args: argparse.Namespace) -> dict[str, dict[str, dict[str, int]]]:
    """Per task: how well the hard token gates find the changed tokens, per block and for their union."""
    from cologen.eval.gate_accuracy import accuracy, gate_counts, gates_table

    datasets, module = examples_and_module(args)
    try:
        results = {task: gate_counts(module, (ds[i] for i in range(len(ds))), args.seed)
                   for task, ds in datasets.items()}
    except ValueError as err:  # no token gates, or a task without a source of the target's size
        raise UsageError(str(err)) from None
    table = gates_table(results)
    print(table, end="")
    if args.out:
        write_table_and_json(args.out, "gates", "token gates against the changed tokens", table,
                             {task: {name: {**c, **{k: _clean(v) for k, v in accuracy(c).items()}}
                                     for name, c in per_block.items()} for task, per_block in results.items()})
    return results


def _parser() -> argparse.ArgumentParser:
    from cologen.eval.protocols import PROTOCOLS

    parser = argparse.ArgumentParser(prog="cologen eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    sw = sub.add_parser("shapeworld", help="ShapeWorld probes per task, with 95%% intervals (the tiny preset)")
    sw.add_argument("--ckpt", help="a cologen checkpoint (or --base)")
    sw.add_argument("--base", nargs="?", const="builtin", metavar="FOLDER",
                    help="evaluate a tiny base alone (no expert): the committed one, or a base folder (make base's)")
    sw.add_argument("--data", default=DEFAULT_DATA, help="ShapeWorld folder (default: %(default)s)")
    sw.add_argument("--tasks", nargs="+", default=list(CURRICULUM_TASKS),
                    choices=(*CURRICULUM_TASKS, *MULTI_CONDITION_TASKS, "t2i"),
                    help="tasks to score; t2i: the base's text-to-image from each scene's caption (object_iou: "
                         "are the caption's objects drawn where, as large and as shaped as in the scene)")
    sw.add_argument("--probes", type=int, default=64, help="probes per task (default: %(default)s)")
    sw.add_argument("--steps", type=int, default=16, help="sampler steps (default: %(default)s)")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--cfg-scale", type=float, default=1.0,
                    help="classifier-free guidance on the prompt (default: %(default)s, off, as validation samples)")
    sw.add_argument("--image-cfg-scale", type=float, default=1.0,
                    help="guidance on the source image, InstructPix2Pix's formula (default: %(default)s, off)")
    sw.add_argument("--strength", type=float, default=1.0,
                    help="img2img: start from the source image noised to this level and run that share of the "
                         "steps (default: %(default)s, off; tasks whose source is the output's size)")
    sw.add_argument("--effect-mask", type=float, default=0.0,
                    help="a token the gates open keeps the base's copy where the expert's effect is at most this "
                         "share of its largest (default: %(default)s, off; models with isolate_closed_tokens: "
                         "output)")
    sw.add_argument("--keep-unmasked", action="store_true",
                    help="inpainting: keep the source outside each probe's mask at every sampler step, as diffusers' "
                         "FluxInpaintPipeline does for a model without mask channels (exact with the tiny preset's "
                         "pixel codec; other tasks are sampled as without it)")
    sw.add_argument("--open-rule", choices=["any", "majority", "all"],
                    help="which noisy tokens take the expert's velocity: those any, most or all PRW blocks' gates "
                         "open (default: the model's prw.open_rule; models with isolate_closed_tokens: output)")
    sw.add_argument("--oracle", action="store_true", help="also score with oracle routing")
    sw.add_argument("--true-gates", action="store_true",
                    help="also score with every expert's token gates forced to the truth (the tokens each probe's "
                         "target changes, on both streams): what a perfect localiser would give (rows true_gates/...)")
    sw.add_argument("--skip-learned", action="store_true",
                    help="with --true-gates: only the true gates' rows, without the routers' own sampling (make "
                         "report's, for a checkpoint whose validation holds the learned scores)")
    sw.add_argument("--other-sources", action="store_true",
                    help="sample each probe with the next probe's condition image, scored against its own target: "
                         "a model that reads its condition scores lower than with its own, one that ignores it the same")
    sw.add_argument("--config", help="training config whose data.init_args.builder builds the probes")
    sw.add_argument("--routing-terms", action="store_true",
                    help="print (and write to --out) what each block's routing rested on: the margin of a task's "
                         "own expert over its strongest rival, split into the source, prompt, timestep and "
                         "entry-offset terms")
    sw.add_argument("--by-kind", action="store_true",
                    help="also score each kind of probe apart: an edit's operation, grounding's overlay, control's "
                         "condition type, inpainting's mask shape (rows task[kind]/metric)")
    sw.add_argument("--out", help="folder for scores.jsonl, metrics.json and table.md (and routing_terms.*)")
    dn = sub.add_parser("denoising", help="ShapeWorld: one-step x0 error on the tokens a task changes and on those "
                                          "it keeps, by noise level (where a model loses its copy)")
    dn.add_argument("--ckpt", help="a cologen checkpoint (or --base)")
    dn.add_argument("--base", nargs="?", const="builtin", metavar="FOLDER",
                    help="a tiny base alone (no expert): the committed one, or a base folder (make base's)")
    dn.add_argument("--data", default=DEFAULT_DATA, help="ShapeWorld folder (default: %(default)s)")
    dn.add_argument("--tasks", nargs="+", default=["grounding"], choices=list(CURRICULUM_TASKS),
                    help="tasks with a source image (default: %(default)s)")
    dn.add_argument("--probes", type=int, default=64, help="validation examples per task (default: %(default)s)")
    dn.add_argument("--timesteps", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9, 0.98],
                    help="noise levels t of x_t = (1 - t) x0 + t n (default: %(default)s)")
    dn.add_argument("--oracle-gates", nargs="*", default=[], choices=("source", "noisy", "both"),
                    help="also measure with the experts' token gates forced to the truth (open on the changed "
                         "tokens only) on these streams")
    dn.add_argument("--seed", type=int, default=0)
    dn.add_argument("--config", help="training config whose data.init_args.builder builds the examples")
    dn.add_argument("--out", help="folder for denoising.md and denoising.json")
    gt = sub.add_parser("gates", help="ShapeWorld: how well the token gates find the tokens a task changes (recall "
                                      "and precision per block and for their union)")
    gt.add_argument("--ckpt", required=True, help="a cologen checkpoint whose experts have token gates")
    gt.set_defaults(base=False)
    gt.add_argument("--data", default=DEFAULT_DATA, help="ShapeWorld folder (default: %(default)s)")
    gt.add_argument("--tasks", nargs="+", default=["inpainting", "grounding", "editing"],
                    choices=list(CURRICULUM_TASKS), help="tasks with a source image (default: %(default)s)")
    gt.add_argument("--probes", type=int, default=64, help="validation examples per task (default: %(default)s)")
    gt.add_argument("--seed", type=int, default=0)
    gt.add_argument("--config", help="training config whose data.init_args.builder builds the examples")
    gt.add_argument("--out", help="folder for gates.md and gates.json")
    for name, protocol in PROTOCOLS.items():
        p = sub.add_parser(name, help=f"{protocol.table}: the {protocol.task} benchmark {name}")
        p.add_argument("--ckpt", required=True, help="a cologen checkpoint or an exported CoLoGenPipeline folder")
        p.add_argument("--base-model", help="an export's base: the local FLUX.1 folder (flux_dev exports)")
        p.add_argument("--data", required=True, help="the benchmark's evaluation shards (a folder of *.tar)")
        p.add_argument("--out", required=True, help="folder for metrics.json, table.md, scores.jsonl, images/")
        p.add_argument("--limit", type=int, help="score only the first N samples")
        p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
        p.add_argument("--size", type=int, help="output side in pixels (default: the model's sample size)")
        p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default: %(default)s)")
        p.add_argument("--batch-size", type=int, default=8, help="samples per scoring batch")
        p.add_argument("--device", help="device of the metric networks (default: cuda when available)")
        for weight in ("clip", "dino", "depth", "segmenter", "hed", "lineart", "fid"):
            helptext = "local path (docs/metrics.md)" if weight in protocol.weights else argparse.SUPPRESS
            p.add_argument(f"--{weight}", help=helptext)
        if name == "multigen":
            p.add_argument("--condition", required=True, choices=("canny", "depth", "hed", "lineart", "seg"))
            p.add_argument("--resolution", type=int, default=512, help="scoring side (default: %(default)s)")
            p.add_argument("--reduce-zero-label", action="store_true", help="ADE20K: label 0 is 'other'")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from cologen.metrics.models import MissingModelPath

    try:
        if args.protocol == "denoising":
            run_denoising(args)
        elif args.protocol == "gates":
            run_gates(args)
        elif args.protocol == "shapeworld":
            table = run_shapeworld(args)
            width = max(len(k) for k in table) if table else 0
            for key, est in table.items():
                print(f"{key:<{width}}  {est['mean']:.3f}  [{est['low']:.3f}, {est['high']:.3f}]  n={est['n']}")
        else:
            for key, value in run_benchmark(args).items():
                print(f"{key:<24} {value:.4f}")
    except (UsageError, MissingModelPath) as err:
        print(f"cologen eval: {err}", file=sys.stderr)
        raise SystemExit(2) from None
