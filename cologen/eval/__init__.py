"""Evaluation protocols: ShapeWorld, DreamBench, MagicBrush / Emu Edit, MultiGen-20M."""

from cologen.eval.dreambench import run_dreambench
from cologen.eval.editing import run_editing, run_emu_edit, run_magicbrush
from cologen.eval.loop import run_protocol
from cologen.eval.multigen import run_multigen
from cologen.eval.shapeworld import run_shapeworld

__all__ = [
    "run_dreambench",
    "run_editing",
    "run_emu_edit",
    "run_magicbrush",
    "run_multigen",
    "run_protocol",
    "run_shapeworld",
]
