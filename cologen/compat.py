"""Every private or internal API of another library that cologen uses, in one place.

Written against torch 2.13, lightning 2.6.6, diffusers 0.42.1 and wandb 0.31.0; pyproject.toml pins the upper
bounds of those packages accordingly. `tests/test_compat.py` touches each name below and compares the code cologen
copied from a library (`COPIED`) with the installed version's, so an upgrade that breaks one fails loudly, naming
it, instead of misbehaving in a run. Nothing else in cologen imports a `_private` name of another library; the
strategies override two of Lightning's protected hooks (`DDPStrategy._setup_model` in training/strategies.py,
`ModelParallelStrategy._setup_distributed` in training/fsdp.py), which the test checks too.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

WRITTEN_AGAINST = {"torch": "2.13.0", "lightning": "2.6.6", "diffusers": "0.42.1", "wandb": "0.31.0"}

# Library code cologen mirrors, with the sha256 (first 16 hex digits) of its source in WRITTEN_AGAINST's versions:
# when the installed source differs, re-read it and carry its change into the copy named here, then update the hash.
COPIED = {
    # CoLoGenFSDPStrategy.setup (cologen/training/fsdp.py)
    "lightning.pytorch.strategies.ModelParallelStrategy.setup": "fdf402066d49c198",
    # PRWAttnProcessor.__call__ (cologen/model/attention.py)
    "diffusers.models.transformers.transformer_flux.FluxAttnProcessor.__call__": "d5b36134887ebe45",
}


def source_hash(dotted: str) -> str:
    """The sha256 (16 hex digits) of the source of `module.Class.attr` as installed."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
    raise ImportError(dotted)


# ----------------------------------------------------------------------------------------------------- diffusers
def active_attention_backend():
    """diffusers' process-wide default attention backend (`_AttentionBackendRegistry`)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry.get_active_backend()[0]


def set_active_attention_backend(backend) -> None:
    """Set diffusers' process-wide default attention backend (an `AttentionBackendName` or its value)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(backend)


def set_attention_backend(transformer, backend: str) -> None:
    """diffusers' `set_attention_backend` for this model's processors only: it also changes the process-wide
    default, which would leak into every other model in the process, so that default is restored."""
    previous = active_attention_backend()
    transformer.set_attention_backend(backend)
    set_active_attention_backend(previous)


# ----------------------------------------------------------------------------------------------------- lightning
def optimizers_to_device(optimizers, device) -> None:
    """Move the optimizers' state to `device` (Lightning's `_optimizers_to_device`, as ModelParallelStrategy.setup
    calls it)."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    _optimizers_to_device(optimizers, device)


def rekey_optimizer_state(state: dict[str, Any], module) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter index, re-keyed by parameter name as torch's distributed
    `set_optimizer_state_dict` wants it (Lightning's `_rekey_optimizer_state_if_needed`)."""
    from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed

    return _rekey_optimizer_state_if_needed(state, module)


# --------------------------------------------------------------------------------------------------------- torch
def shutdown_dataloader_workers(loader) -> None:
    """Stop a DataLoader's (persistent) workers now, as its iterator's `__del__` does (and Lightning, the same way);
    a later `iter()` starts new ones."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


# --------------------------------------------------------------------------------------------------------- wandb
def load_sweep_config(path: str) -> dict[str, Any] | None:
    """A sweep YAML read as `wandb sweep` reads it (wandb.sdk.launch.sweeps.utils)."""
    from wandb.sdk.launch.sweeps import utils

    return utils.load_sweep_config(path)


def sweep_violations_text(violations) -> str:
    """The message `wandb sweep` prints for the schema violations of a sweep config."""
    from wandb.sdk.launch.sweeps import utils

    return utils.sweep_config_err_text_from_jsonschema_violations(violations)


def sweep_command(command: list) -> list:
    """The sweep's `command` with W&B's default filled in (the agent's `create_sweep_command`)."""
    from wandb.sdk.launch.sweeps import utils

    return utils.create_sweep_command(command)


def sweep_command_args(params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ${args} / ${args_no_hyphens} / ... macro values of a trial's parameters (the agent's
    `create_sweep_command_args`)."""
    from wandb.sdk.launch.sweeps import utils

    return utils.create_sweep_command_args(params)


def save_wandb_config(path: str, config: dict[str, Any]) -> None:
    """Write a W&B config file, the format of `WANDB_SWEEP_PARAM_PATH` (wandb.sdk.lib.config_util)."""
    from wandb.sdk.lib import config_util

    config_util.save_config_file_from_dict(path, config)


def wandb_run_id() -> str:
    """A new W&B run id, as the agent generates it (wandb.sdk.lib.runid)."""
    from wandb.sdk.lib.runid import generate_id

    return generate_id()
