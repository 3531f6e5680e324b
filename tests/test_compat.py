"""The private APIs of cologen.compat still exist and the library code cologen copied is unchanged: an upgrade of
torch, lightning, diffusers or wandb that breaks one fails here, naming it."""

import importlib

import pytest

from cologen import compat


@pytest.mark.parametrize("dotted", sorted(compat.COPIED))
def test_copied_library_code_is_unchanged(dotted):
    assert compat.source_hash(dotted) == compat.COPIED[dotted], (
        f"{dotted} changed since cologen copied it (written against {compat.WRITTEN_AGAINST}): carry the change into "
        "the copy named in cologen/compat.py's COPIED, then update its hash")


@pytest.mark.parametrize(("module", "name"), [
    ("diffusers.models.attention_dispatch", "_AttentionBackendRegistry"),
    ("lightning.fabric.utilities.optimizer", "_optimizers_to_device"),
    ("lightning.fabric.strategies.model_parallel", "_rekey_optimizer_state_if_needed"),
    ("lightning.pytorch.strategies.DDPStrategy", "_setup_model"),
    ("lightning.pytorch.strategies.ModelParallelStrategy", "_setup_distributed"),
    ("torch.utils.data.dataloader._MultiProcessingDataLoaderIter", "_shutdown_workers"),
    ("wandb.sdk.launch.sweeps.utils", "load_sweep_config"),
    ("wandb.sdk.launch.sweeps.utils", "sweep_config_err_text_from_jsonschema_violations"),
    ("wandb.sdk.launch.sweeps.utils", "create_sweep_command"),
    ("wandb.sdk.launch.sweeps.utils", "create_sweep_command_args"),
    ("wandb.sdk.lib.config_util", "save_config_file_from_dict"),
    ("wandb.sdk.lib.runid", "generate_id"),
])
def test_private_names_exist(module, name):
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    for attr in parts[i:] + [name]:
        assert hasattr(obj, attr), f"{module}.{name} is gone (cologen.compat was written against {compat.WRITTEN_AGAINST})"
        obj = getattr(obj, attr)


def test_attention_backend_helpers_round_trip(restore_attention_backend):
    from diffusers.models.attention_dispatch import AttentionBackendName

    compat.set_active_attention_backend(AttentionBackendName.NATIVE)
    assert compat.active_attention_backend() == AttentionBackendName.NATIVE
    assert isinstance(compat.wandb_run_id(), str)
