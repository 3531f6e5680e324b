"""The `cologen` command: LightningCLI's `fit | validate | test | predict --config experiments/...`, plus `info`,
`export`, `eval` and `demo` (`cologen --help` lists them all).

Configs are YAML with omegaconf interpolation (`${trainer.default_root_dir}`); the resolved config of every run is
written to its run directory (`trainer.default_root_dir`) as `config.yaml`. Mistakes the user fixes (a config key,
a missing data folder, a file that is not a checkpoint) end the command with one line naming the fix and status 2,
before anything (run folder, W&B run) is created.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from .quiet import quiet_known_messages

quiet_known_messages()  # before Lightning and transformers are imported, by any command

# name -> (module with main(argv) for commands outside LightningCLI, one-line summary)
COMMANDS: dict[str, tuple[str | None, str]] = {
    "fit": (None, "train: a curriculum stage (`make stage1`) or any config; resume with --ckpt_path"),
    "validate": (None, "validation losses, samples and metrics of a checkpoint, into <run>/validate/<checkpoint>/"),
    "test": (None, "Lightning's test loop over the config's test data, into <run>/test/<checkpoint>/"),
    "predict": (None, "generate images for a JSONL of requests (experiments/tiny/predict.yaml)"),
    "info": ("cologen.commands.info", "JSON summary of a checkpoint (preset, curriculum position, experts)"),
    "export": ("cologen.commands.export", "write a CoLoGenPipeline folder (experts and routers as safetensors)"),
    "eval": ("cologen.commands.evaluate", "score a model on a benchmark protocol (ShapeWorld, DreamBench, MagicBrush...)"),
    "demo": ("cologen.commands.demo", "try a model in the browser (Gradio; default: the committed tiny experts)"),
}
LIGHTNING_COMMANDS = tuple(name for name, (module, _) in COMMANDS.items() if module is None)


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: cologen COMMAND [options]    (cologen COMMAND --help: that command's options)", "",
             "CoLoGen: LoRA experts, a router and a curriculum on a FLUX transformer.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "examples:", "  cologen fit --config experiments/tiny/curriculum.yaml --config experiments/tiny/stage1.yaml",
              "  cologen info runs/tiny/stage1/last.ckpt"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        raise SystemExit(0 if args else 2)
    name = args[0]
    if name not in COMMANDS and not name.startswith("-"):
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"cologen: unknown command {name!r} ({hint}commands: {', '.join(COMMANDS)})", file=sys.stderr)
        raise SystemExit(2)
    module = COMMANDS.get(name, (None, ""))[0]
    if module is not None:
        return importlib.import_module(module).main(args[1:])
    # Lightning is imported only for its commands: `cologen demo`, `eval` and the rest start without it
    from .errors import UsageError
    from .lightning_cli import RequestsFailed, RunFinished, _run_lightning_cli

    saved = sys.argv
    sys.argv = [saved[0] if saved else "cologen", *args]  # LightningCLI warns when given args beside sys.argv
    try:
        _run_lightning_cli()
    except UsageError as err:
        print(f"cologen {name}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunFinished as done:
        print(f"cologen {name}: {done}")
    except RequestsFailed as failed:
        print(f"cologen {name}: {failed}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
