"""Model zoo: re-implementations of deployed architectures plus a registry of example inputs.

Every family lives in its own module (``deployprune.zoo.resnet``, ``deployprune.zoo.vit`` ...) and lists its
registered models in a module-level ``SPECS`` tuple. The registry imports those modules lazily.

    from deployprune import zoo
    zoo.names("zoo")                 # small test-size models
    spec = zoo.get("resnet_basic")
    model = zoo.build("resnet_basic")          # seeded, eval(), BatchNorm statistics set
    inputs = zoo.example_inputs(spec)          # deterministic tuple of tensors
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from ._spec import TASKS, InputSpec, ModelSpec

if __name__ != "deployprune.zoo":  # the folder imported by its old top-level name (e.g. from the repo root)
    raise ImportError(f"the model zoo is the package deployprune.zoo, not {__name__!r}: "
                      "`pip install -e .` and import deployprune.zoo")

__all__ = [
    "TASKS",
    "InputSpec",
    "ModelSpec",
    "build",
    "example_inputs",
    "get",
    "names",
    "randomize_normalization",
    "spec_for_factory",
    "canonical_factory_path",
]

# Family modules, in the order the documentation lists them.
FAMILY_MODULES: tuple[str, ...] = (
    "lenet",
    "mnist_net",
    "mlp",
    "resnet",
    "mobilenet",
    "efficientnet",
    "densenet",
    "shufflenet",
    "inception",
    "squeezenet",
    "regnet",
    "vgg",
    "convnext",
    "vit",
    "mixer",
    "bert",
    "unet",
    "audio",
)

_REGISTRY: dict[str, ModelSpec] | None = None


def _registry() -> dict[str, ModelSpec]:
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, ModelSpec] = {}
        for module_name in FAMILY_MODULES:
            module = importlib.import_module(f"{__name__}.{module_name}")
            for spec in module.SPECS:
                if spec.name in found:
                    raise RuntimeError(f"model name {spec.name!r} registered twice")
                found[spec.name] = spec
        _REGISTRY = found
    return _REGISTRY


def names(tag: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally only those carrying ``tag``."""
    return sorted(n for n, s in _registry().items() if tag is None or tag in s.tags)


def get(name: str) -> ModelSpec:
    """The spec registered under ``name``; ``ValueError`` naming the known models otherwise."""
    registry = _registry()
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(registry))}")
    return registry[name]


def _as_spec(spec_or_name: ModelSpec | str) -> ModelSpec:
    return spec_or_name if isinstance(spec_or_name, ModelSpec) else get(spec_or_name)


def example_inputs(spec_or_name: ModelSpec | str, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs: same (spec, batch, seed) gives the same tensors.

    Float inputs are standard normal; integer inputs are uniform in ``[0, high)``; the
    batch dimension of each :class:`InputSpec` shape is replaced by ``batch``.
    """
    spec = _as_spec(spec_or_name)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for item in spec.inputs:
        shape = (batch, *item.shape[1:])
        if item.dtype.is_floating_point:
            t = torch.randn(shape, generator=generator, dtype=torch.float32).to(item.dtype)
        elif item.dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=generator).bool()
        else:
            assert item.high is not None
            t = torch.randint(0, item.high, shape, generator=generator, dtype=item.dtype)
        tensors.append(t)
    return tuple(tensors)


#: The zoo's import name before it moved into the deployprune package (deployprune <= 0.1 saved
#: factory paths such as ``"models.lenet:TorchModel"`` in checkpoints).
LEGACY_PACKAGE = "models"


def canonical_factory_path(path: str) -> str:
    """``path`` with the zoo's old spelling (``"models.lenet:TorchModel"``) replaced by the current
    one (``"deployprune.zoo.lenet:TorchModel"``); any other path is returned unchanged.

    Only paths into one of the zoo's own family modules are mapped, so a user's unrelated
    ``models`` package (``models.yolo:Model``) is never taken for the zoo.
    """
    module, sep, attr = path.strip().partition(":")
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == LEGACY_PACKAGE and parts[1] in FAMILY_MODULES:
        return f"{__name__}.{'.'.join(parts[1:])}{sep}{attr}"
    return path


def spec_for_factory(path_or_callable: str | Callable[..., nn.Module]) -> ModelSpec | None:
    """The spec whose factory is ``path_or_callable`` (``"deployprune.zoo.lenet:TorchModel"`` or the
    callable itself); ``None`` when no registered model uses it."""
    if isinstance(path_or_callable, str):
        path = canonical_factory_path(path_or_callable.strip())
        if ":" not in path and "." in path:
            module, _, attr = path.rpartition(".")
            path = f"{module}:{attr}"
        for spec in _registry().values():
            if spec.factory_path == path:
                return spec
        return None
    for spec in _registry().values():
        if spec.factory is path_or_callable:
            return spec
    module = getattr(path_or_callable, "__module__", None)
    qualname = getattr(path_or_callable, "__qualname__", None)
    if module and qualname:
        return spec_for_factory(f"{module}:{qualname}")
    return None


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return True
    # Hand-written norms (e.g. ConvNeXt's channels-first LayerNorm) follow the naming habit.
    return type(module).__name__.endswith(("Norm", "Norm2d", "Norm1d"))


@torch.no_grad()
def randomize_normalization(
    model: nn.Module, calibration_inputs: tuple[torch.Tensor, ...] | None = None, seed: int = 0
) -> nn.Module:
    """Give normalization layers non-default, seeded statistics so parity tests mean something.

    Affine weights are drawn from U(0.5, 1.5) and biases from U(-0.25, 0.25) for every
    BatchNorm/LayerNorm/GroupNorm (and hand-written ``*Norm`` modules). BatchNorm running
    statistics are then measured on ``calibration_inputs`` (a cumulative average over one
    forward pass with only the BatchNorm layers in training mode, each variance floored at a
    tenth of the layer's median), so activations stay in a sane range however deep the model
    is; without inputs they are drawn at random. The model is left in eval mode.
    """
    generator = torch.Generator().manual_seed(seed + 7919)

    def uniform_like(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        r = torch.rand(t.shape, generator=generator, dtype=torch.float32)
        return (low + (high - low) * r).to(dtype=t.dtype, device=t.device)

    batchnorms: list[nn.modules.batchnorm._NormBase] = []
    for module in model.modules():
        if not _is_norm(module):
            continue
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if isinstance(weight, nn.Parameter):
            weight.copy_(uniform_like(weight, 0.5, 1.5))
        if isinstance(bias, nn.Parameter):
            bias.copy_(uniform_like(bias, -0.25, 0.25))
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(uniform_like(module.running_mean, -0.5, 0.5))
            module.running_var.copy_(uniform_like(module.running_var, 0.5, 2.0))
            batchnorms.append(module)

    if batchnorms and calibration_inputs is not None:
        saved = [(bn, bn.momentum) for bn in batchnorms]
        model.eval()
        for bn in batchnorms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: one pass gives the batch statistics
            bn.train()
        try:
            model(*calibration_inputs)
        finally:
            for bn, momentum in saved:
                bn.momentum = momentum
        for bn in batchnorms:
            # A channel that happened to be near-constant on the calibration batch would
            # otherwise be amplified by 1/sqrt(eps) on any other input.
            var = bn.running_var
            assert var is not None
            floor = max(0.1 * float(var.median()), 1e-3)
            var.clamp_(min=floor)
    return model.eval()


def build(name: str, seed: int = 0) -> nn.Module:
    """Build the registered model ``name`` reproducibly, in eval mode.

    The factory runs under ``torch.manual_seed(seed)`` (the caller's global RNG state is
    restored afterwards); normalization layers then get seeded non-default affine parameters
    and BatchNorm statistics measured on a batch of example inputs (8 for
    test-size inputs, 2 for ImageNet-size ones)
    (see :func:`randomize_normalization`).
    """
    spec = get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.factory()
    # Small inputs reach 1x1 feature maps: a batch of 8 keeps the variances well estimated there.
    small = all(torch.Size(i.shape).numel() <= 3 * 64 * 64 for i in spec.inputs)
    calibration = example_inputs(spec, batch=8 if small else 2, seed=seed + 1)
    return randomize_normalization(model, calibration, seed=seed)
