"""Sharded training of CoLoGen with FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning.

Layout (docs/memory.md, "Sharded training", says why):
* every double- and single-stream block is its own FSDP unit: the frozen bf16 base is sharded, all-gathered block
  by block (each block runs twice per forward, once per stream; FSDP2 handles repeated calls);
* each block's expert bank (`attn.prw_experts`, fp32) is a unit of its own inside the block's, so every unit has one
  dtype and the bank's gradients are reduce-scattered in fp32;
* the root unit (the CoLoGenTransformer) holds the embedders and the output layers;
* the routers stay replicated, outside FSDP: a new expert's router entry is written row by row
  (`NoisyTop1Router.init_entry`), and rows of a dim-0-sharded parameter that cross a shard boundary are silently not
  copied by DTensor (measured), so their gradients are all-reduced by the strategy after each backward instead.
  With `shard_adapters=False` the expert banks are replicated the same way (needed by 8-bit optimizers, which cannot
  step DTensors); only the frozen base is sharded then.

FSDP2 takes a parameter's `requires_grad` from the sharded parameter at every all-gather, so the curriculum may
unfreeze the next expert after wrapping; frozen veterans get no gradient at all (and the CurriculumCallback drops any).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from cologen.compat import optimizers_to_device, rekey_optimizer_state
from cologen.model.cologen_transformer import CoLoGenTransformer
from cologen.sharding import full_tensor


def data_parallel_mesh(device_type: str, world_size: int, replicate_groups: int = 1) -> DeviceMesh:
    """1-D mesh (shard over every rank) or, with `replicate_groups` > 1, HSDP's 2-D (replicate, shard) mesh:
    parameters sharded within a group (e.g. a node), replicated across groups."""
    if replicate_groups <= 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if world_size % replicate_groups:
        raise ValueError(f"replicate_groups ({replicate_groups}) must divide the world size ({world_size})")
    return init_device_mesh(device_type, (replicate_groups, world_size // replicate_groups),
                            mesh_dim_names=("replicate", "shard"))


def _unshard_before_source_kv_backward():
    """FSDP gathers a unit's weights for the backward pass when the gradient reaches the unit's outputs. The source
    pass's keys/values leave a block through the PRW context, not through its outputs, so their backward (through
    `to_k` / `to_v`) could run on resharded weights; a gradient hook on them gathers the block first. (With
    gradient checkpointing the recomputation gathers them anyway.)"""

    def hook(block: nn.Module, args, kwargs, output) -> None:
        ctx = (kwargs.get("joint_attention_kwargs") or {}).get("prw")
        if ctx is None or ctx.mode != "source" or ctx.kv_out is None:
            return
        for t in ctx.kv_out:
            if t.requires_grad:
                t.register_hook(lambda grad: (block.unshard(), grad)[1])

    return hook


def replicated_parameters(model: CoLoGenTransformer, shard_adapters: bool = True) -> list[nn.Parameter]:
    """The parameters FSDP leaves alone (kept whole on every rank, gradients all-reduced by the strategy)."""
    return model.router_parameters() + ([] if shard_adapters else model.expert_parameters())


def shard_cologen(model: CoLoGenTransformer, mesh: DeviceMesh, reshard_after_forward: bool | int = True,
                  shard_adapters: bool = True) -> list[nn.Module]:
    """Apply fully_shard bottom-up: expert banks, blocks, then the root. Returns the units, root last."""
    replicated = replicated_parameters(model, shard_adapters)
    ids = {id(p) for p in replicated}

    def ignored(module: nn.Module) -> set[nn.Parameter]:
        return {p for p in module.parameters() if id(p) in ids}

    units: list[nn.Module] = []
    if shard_adapters:
        for attn in model.prw_modules():
            units.append(fully_shard(attn.prw_experts, mesh=mesh, reshard_after_forward=reshard_after_forward))
    for _, block in model._named_blocks():
        units.append(fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward,
                                 ignored_params=ignored(block)))
        block.register_forward_hook(_unshard_before_source_kv_backward(), with_kwargs=True)
    units.append(fully_shard(model, mesh=mesh, ignored_params=ignored(model)))
    return units  # FSDP moved the shards to the mesh's device; the replicated parameters stay where they were


@torch.no_grad()
def load_full_state(module: nn.Module, state: dict[str, Any]) -> None:
    """Copy full (unsharded) tensors into a partly sharded module: each rank slices its own shard (every rank read
    the same file, so no communication); non-tensor entries are module extra state (the active-expert count)."""
    targets = module.state_dict(keep_vars=True)
    for key, value in state.items():
        if key.endswith("_extra_state"):
            module.get_submodule(key[: -len("_extra_state")].rstrip(".")).set_extra_state(value)
            continue
        if key not in targets:
            raise KeyError(f"checkpoint tensor {key} has no counterpart in the model")
        target = targets[key]
        value = value.to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.copy_(value)


def all_reduce_mean(params: list[nn.Parameter], group=None) -> None:
    """Average the gradients of replicated parameters over the ranks in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not dist.is_initialized():
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


class CoLoGenFSDPStrategy(ModelParallelStrategy):
    """FSDP2 for CoLoGen (layout in this module's docstring); checkpoints hold only what the module stores
    (experts, routers, expert schedule: the format of the single-device and DDP runs) and resume from it.

    Args:
        replicate_groups: 1 shards over all ranks; N > 1 is HSDP: N replica groups (e.g. one per node) sharding
            within the group, so the all-gathers stay on the node's interconnect.
        reshard_after_forward: free each block's gathered weights after its forward (True; saves memory, each
            block is gathered again in backward) or keep them (False; faster, more memory).
        shard_adapters: shard the expert banks (True) or replicate them with the routers (False; for 8-bit
            optimizers).
        process_group_backend / timeout: as Lightning's strategies ('nccl' on GPUs, 'gloo' on CPUs by default).
    """

    strategy_name = "cologen_fsdp"

    def __init__(self, replicate_groups: int = 1, reshard_after_forward: bool = True, shard_adapters: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.replicate_groups = replicate_groups
        self.reshard_after_forward = reshard_after_forward
        self.shard_adapters = shard_adapters
        self._replicated: list[nn.Parameter] = []
        self._sync_replicated = True

    # ------------------------------------------------------------------------------------------------- setup
    def setup_environment(self) -> None:
        self._setup_distributed()
        self._device_mesh = data_parallel_mesh(self.root_device.type, self.world_size, self.replicate_groups)
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup(self, trainer: pl.Trainer) -> None:
        # Copied from lightning.pytorch.strategies.ModelParallelStrategy.setup (lightning 2.6.6; cologen.compat.COPIED
        # checks it has not changed) with these changes: the sharding (shard_cologen) is applied here instead of in
        # the module's configure_model hook, so the FSDP1 check and _materialize_distributed_module go; precision
        # is checked (not converted: the preset sets the base's dtype); clipping and 8-bit optimizers are refused.
        self.accelerator.setup(trainer)
        module = self.lightning_module
        cologen = getattr(module, "model", None)
        if not isinstance(cologen, CoLoGenTransformer):
            raise TypeError(f"{type(self).__name__} shards a CoLoGenModule (its `model` is a CoLoGenTransformer)")
        if trainer.gradient_clip_val:
            raise ValueError(f"{type(self).__name__} does not clip gradients (torch's clip_grad_norm_ cannot mix the "
                             "sharded experts' and the replicated routers' gradients): unset trainer.gradient_clip_val")
        probe = nn.Linear(1, 1, dtype=torch.float32)
        if self.precision_plugin.convert_module(probe).weight.dtype != torch.float32:
            raise ValueError(f"{type(self).__name__}: use trainer.precision '32-true' (the preset sets the base's "
                             "dtype; experts and routers stay fp32) or 'bf16-mixed', not a '-true' half precision")
        # shard first (each rank moves only its shards to the device), then move the rest: codec, text encoder,
        # the replicated parameters
        shard_cologen(cologen, self.device_mesh, self.reshard_after_forward, self.shard_adapters)
        module.to(self.root_device)
        self._replicated = replicated_parameters(cologen, self.shard_adapters)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._check_optimizers()
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            optimizers_to_device(self.optimizers, self.root_device)

    def _check_optimizers(self) -> None:
        for optimizer in self.optimizers:
            if type(optimizer).__module__.startswith("bitsandbytes") and self.shard_adapters:
                raise ValueError("8-bit optimizers cannot step sharded (DTensor) parameters: set the strategy's "
                                 "shard_adapters: false (experts replicated, the frozen base still sharded)")

    # ------------------------------------------------------------------------------------- gradient sync
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        if self._sync_replicated:
            all_reduce_mean(self._replicated)

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Gradient accumulation: no reduce-scatter / all-reduce until the micro-batch that steps."""
        model = self.lightning_module.model
        if not isinstance(model, FSDPModule):
            yield
            return
        model.set_requires_gradient_sync(False)
        self._sync_replicated = False
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
            self._sync_replicated = True

    # ------------------------------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """What the module stores (not the frozen base), gathered to full tensors on the CPU (a collective: every
        rank runs it, in the same key order)."""
        module = self.lightning_module
        frozen = module.frozen_state_keys() if hasattr(module, "frozen_state_keys") else set()
        out = {}
        for key, value in module.state_dict().items():
            if key in frozen:
                continue
            out[key] = full_tensor(value).detach().cpu() if isinstance(value, torch.Tensor) else value
        return out

    # Restore as DDP does, before the strategy shards the model: the callbacks' state (the curriculum step) is back
    # before `on_fit_start`, the weights go into the unsharded model, the optimizer state into the sharded one.
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return False

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """A single-file checkpoint written by this strategy, by DDP or on one device (the same format)."""
        return torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=False)

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        state = checkpoint["state_dict"]
        wanted = module.adapter_state_keys() if hasattr(module, "adapter_state_keys") else list(state)
        missing = [k for k in wanted if k not in state]
        if missing and strict:
            raise KeyError(f"checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[0]})")
        load_full_state(module, {k: state[k] for k in wanted if k in state})
        # requires_grad is not part of a state dict: derive it from the restored active-expert count, or the
        # expert that trained before the restored one (the curriculum's setup activated it) would train on
        if isinstance(getattr(module, "model", None), CoLoGenTransformer):
            module.model.freeze_for_curriculum()

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        module = self.lightning_module
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            state = rekey_optimizer_state(state, module)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
