"""A quantized frozen base (torchao): the transformer blocks' Linear weights stored in int8 or float8.

Only memory that never trains is quantized: the nn.Linear layers of the double- and single-stream blocks of the
frozen FLUX base (attention projections, MLPs, the AdaLN modulation layers: 11.83B of FLUX.1-dev's 11.90B base
weights). Left alone: the PRW expert bank, the routers and the token gates (they train, in fp32), and the base's
input and output layers outside the blocks (the patch, text, timestep and guidance embedders, the final norm and
projection: 64M weights together, where low precision costs accuracy and buys no memory).

Modes (torchao configs applied by `torchao.quantization.quantize_` with a filter):
- 'int8_weight_only': `Int8WeightOnlyConfig()`, per output channel: the matmul runs in the activations' dtype
  (bf16 on FLUX, fp32 on the tiny CPU models) with the int8 weight scaled back. Any device.
- 'float8': `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`: weights in float8 e4m3 per output
  channel, activations quantized per token at run time, `torch._scaled_mm`. CUDA GPUs of compute capability >= 8.9
  (Ada, Hopper and newer) with a bf16 base only.

Training through a quantized layer: the experts upstream of a frozen layer need the gradient with respect to its
input, `grad_out @ W`. torchao's quantized linear is written for inference: its int8 weight-only path would save a
dequantized (bf16) copy of every weight for the backward pass (more memory than the unquantized base), and
`_scaled_mm` has no backward at all. So every quantized layer becomes a `QuantizedFrozenLinear` (an nn.Linear
whose forward is torchao's quantized matmul, run without autograd), and the backward dequantizes the weight
transiently for `grad_out @ W` (what QLoRA-style trainers do). Only the reference to the quantized weight is kept
between the passes; the weight itself gets no gradient. Parameter names and the state-dict keys do not change.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES: tuple[str, ...] = ("int8_weight_only", "float8")
INSTALL_HINT = "pip install 'cologen[quant]'"
# the blocks of a diffusers FluxTransformer2DModel: everything quantized lives under these
BLOCK_LISTS: tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks")
# submodules of a block that are the adapters (registered on the attention module by CoLoGenTransformer)
ADAPTER_NAMES: tuple[str, ...] = ("prw_experts", "prw_router")
FLOAT8_MIN_CAPABILITY = (8, 9)


def require_torchao():
    """The `torchao` module; a one-line ImportError naming the extra when it is not installed."""
    try:
        # (its import notices on a CPU-only torch are filtered with the others in cologen.quiet)
        import torchao
        import torchao.quantization  # noqa: F401
    except ImportError as err:
        raise ImportError(f"a quantized base needs torchao: {INSTALL_HINT} ({err})") from None
    return torchao


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def check_quantize_base(mode: str | None, train_base: bool = False) -> None:
    """CoLoGenModule's `quantize_base` checks, run before the backbone is built (a FLUX base loads for minutes):
    the value, no `train_base`, torchao installed, and for 'float8' a GPU that runs it."""
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"quantize_base must be one of {', '.join(MODES)} (or null), got {mode!r}")
    if train_base:
        raise ValueError("quantize_base quantizes the frozen base: it cannot be combined with train_base "
                         "(set one of them)")
    require_torchao()
    if mode == "float8":
        check_float8_support()


def _base_device(model: nn.Module) -> torch.device:
    return next(model.transformer.parameters()).device


def check_float8_support(device: torch.device | None = None) -> None:
    """Raise a one-line RuntimeError unless float8 matmuls can run: a CUDA GPU of compute capability >= 8.9 (the
    model's GPU, or the current one for a model still on the host, as CoLoGenModule builds it)."""
    if device is not None and device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"float8 quantization needs a CUDA GPU of compute capability >= 8.9, not {device.type}")
    if not torch.cuda.is_available():
        raise RuntimeError("float8 quantization needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or "
                           "newer); none is available here: use 'int8_weight_only'")
    index = device.index if device is not None and device.type == "cuda" and device.index is not None else None
    capability = torch.cuda.get_device_capability(index)
    if capability < FLOAT8_MIN_CAPABILITY:
        raise RuntimeError(f"float8 quantization needs a CUDA GPU of compute capability >= 8.9, "
                           f"{torch.cuda.get_device_name(index)} has {capability[0]}.{capability[1]}: "
                           f"use 'int8_weight_only'")


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether `weight` is a torchao quantized tensor (`Int8Tensor`, `Float8Tensor`, `AffineQuantizedTensor`...)."""
    return type(weight).__module__.split(".")[0] == "torchao"


def frozen_base_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """{name: layer} of the Linear layers a quantized base quantizes (names relative to `model.transformer`):
    every nn.Linear inside the double- and single-stream blocks that is not part of an adapter (expert bank,
    router, token gate)."""
    tf = model.transformer
    out: dict[str, nn.Linear] = {}
    for blocks_name in BLOCK_LISTS:
        for name, module in getattr(tf, blocks_name).named_modules(prefix=blocks_name):
            if not isinstance(module, nn.Linear):
                continue
            if any(part in ADAPTER_NAMES for part in name.split(".")):
                continue
            out[name] = module
    return out


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """y = linear(x, W_q, b) with W_q frozen: the gradient reaches x (and a trainable bias), never W_q."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: QuantizedFrozenLinear) -> torch.Tensor:
        # The quantized weight travels as an attribute of `layer`, not as an input: a tensor subclass among the
        # inputs would route `apply` itself through its __torch_function__.
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, layer.weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.weight.dequantize(grad.dtype)  # (out, in), freed after this matmul
            grad_x = grad @ weight
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class QuantizedFrozenLinear(nn.Linear):
    """An nn.Linear with a torchao-quantized frozen weight whose backward reaches its input (see the module
    docstring). Layers become one by a class swap in `quantize_frozen_base`, so parameters and state-dict keys
    stay those of the nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return _FrozenQuantizedMatmul.apply(x, self.bias, self)
        return F.linear(x, self.weight, self.bias)


def _config(mode: str):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow

    # set_inductor_config=False: torchao would otherwise change process-wide torch._inductor settings
    if mode == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def quantize_frozen_base(model: nn.Module, mode: str) -> int:
    """Quantize the frozen base's block Linear layers of a CoLoGenTransformer in place (`frozen_base_linears`)
    and return how many were quantized (layers already quantized are left as they are and not counted).

    mode: 'int8_weight_only' (any device) or 'float8' (CUDA compute capability >= 8.9, bf16 base). Quantize on
    the device the model trains on or on the host before moving it; the experts and routers keep their dtype.
    """
    check_mode(mode)
    torchao = require_torchao()
    if mode == "float8":
        check_float8_support(_base_device(model))
    layers = {name: layer for name, layer in frozen_base_linears(model).items() if not is_quantized(layer.weight)}
    training = [name for name, layer in layers.items() if layer.weight.requires_grad]
    if training:
        raise ValueError(f"only a frozen base can be quantized: {len(training)} block layers train ({training[0]}, "
                         f"...); freeze it first (CoLoGenTransformer.freeze_for_curriculum)")
    if mode == "float8":
        dtypes = {layer.weight.dtype for layer in layers.values()}
        if dtypes - {torch.bfloat16}:
            raise ValueError(f"float8 quantization expects a bf16 base (per-row scaled float8 matmuls write bf16), "
                             f"got {sorted(str(d) for d in dtypes)}")
        # _scaled_mm needs both dimensions divisible by 16 (every FLUX block layer is)
        layers = {n: m for n, m in layers.items() if m.in_features % 16 == 0 and m.out_features % 16 == 0}
    if not layers:
        return 0
    selected = {id(layer) for layer in layers.values()}
    torchao.quantization.quantize_(model.transformer, _config(mode), filter_fn=lambda module, fqn: id(module) in selected)
    count = 0
    for layer in layers.values():
        if is_quantized(layer.weight):
            layer.__class__ = QuantizedFrozenLinear
            count += 1
    return count
