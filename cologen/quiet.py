"""Messages every command would print that tell a cologen user nothing: filtered once, here.

- Lightning's "Found N module(s) in eval mode at the start of training": the frozen text encoder and base keep
  dropout off on purpose (they are inference-only parts of the model); the experts and routers train.
- Lightning's tips advertising its cloud products (litlogger, litmodels), and "Seed set to N" (the config's
  `seed_everything`, which `config.yaml` records).
- transformers' "Loading weights" bar when the tiny preset loads MiniLM (a 90 MB file, under a second).
- what importing diffusers prints where torchao is installed (the `quant` extra; diffusers imports it): torchao's
  "Failed to load" of its CUDA-only extensions on a CPU build of torch, torch's notice about torchao's Enum
  registrations, and diffusers' "Unable to import `torchao` Tensor objects" (none of which cologen uses).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# logger -> message prefixes dropped from it
_DROP = {"lightning.pytorch.utilities.rank_zero": ("💡 Tip:",), "lightning.fabric.utilities.seed": ("Seed set to",),
         "torchao": ("Failed to load",), "torch.utils._pytree": ("<enum ",),
         "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",)}


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_known_messages() -> None:
    """Install the filters (idempotent). Call before Lightning or transformers load anything."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its torchvision notice at import time
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar
    if "huggingface_hub" in sys.modules:  # already imported (in-process runs): the variable was read at import
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    for name, prefixes in _DROP.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefixes))
