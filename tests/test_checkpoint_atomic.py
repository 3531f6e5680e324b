"""Checkpoints are written atomically: killing the writer mid-save never leaves an unloadable last.ckpt."""

import os
import signal
import subprocess
import sys
import time

import torch

WRITER = r"""
import sys, torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
path = sys.argv[1]
io = TorchCheckpointIO()  # the checkpoint IO Lightning's Trainer.save_checkpoint uses
step = 0
while True:
    step += 1
    io.save_checkpoint({"step": step, "state_dict": {"w": torch.full((3_000_000,), float(step))}}, path)
    print(step, flush=True)
"""


def test_killing_the_writer_never_corrupts_last_ckpt(tmp_path):
    path = tmp_path / "last.ckpt"
    seen_steps = []
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # one complete save exists before we start killing
        assert first.strip()
        time.sleep(0.05 + 0.1 * round_)  # land the kill at different points of a later save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(path, weights_only=True)
        w = ckpt["state_dict"]["w"]
        assert w.numel() == 3_000_000 and bool((w == ckpt["step"]).all())
        seen_steps.append(ckpt["step"])
    assert max(seen_steps) >= 1
