"""cologen: progressive LoRA experts on a FLUX diffusion transformer (CoLoGen, arXiv 2602.22150)."""

__version__ = "0.1.0"
