"""`cologen ARGS` run in this process (the tests of the command line), with its exit status and output."""

from __future__ import annotations


def run_in_process(capfd, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `cologen ARGS`; `capfd` is pytest's fixture."""
    from cologen.cli import main

    capfd.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    out, err = capfd.readouterr()
    return code, out, err


def run_fit(*configs, extra=(), processes: int = 1, env: dict | None = None, timeout: int = 400):
    """`cologen fit --config C ...` in a subprocess from the repository root, on `processes` CPU processes
    (torchrun when more than one), with one OpenMP thread each and W&B disabled unless `env` says otherwise;
    asserts it succeeded (the output's tail in the message) and returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                          str(processes)]
    cmd = [sys.executable, *launcher, "-m", "cologen.cli", "fit"]
    for config in configs:
        cmd += ["--config", str(config)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    proc = subprocess.run([*cmd, *map(str, extra)], cwd=root, env=environment, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc
