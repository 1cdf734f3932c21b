"""The MNIST network of coremltools' magnitude-pruning tutorial, and an 8x8 digits variant."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ._spec import InputSpec, ModelSpec


def mnist_net(num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """conv(1→12, 3x3, 'same') → ReLU → 2x2 max-pool → flatten → dense → log-softmax.

    The tutorial writes ``nn.LogSoftmax()`` with an implicit dimension; ``dim=1`` is what
    that resolves to for (N, C) inputs, spelled out to avoid torch's deprecation warning.
    """
    pooled = image_size // 2
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(1, 12, 3, padding="same")),
                ("relu", nn.ReLU()),
                ("pool", nn.MaxPool2d(2, stride=2, padding=0)),
                ("flatten", nn.Flatten()),
                ("dense", nn.Linear(12 * pooled * pooled, num_classes)),
                ("softmax", nn.LogSoftmax(dim=1)),
            ]
        )
    )


def mnist_net_digits(num_classes: int = 10) -> nn.Sequential:
    """The same network for scikit-learn's bundled 8x8 digits (dense in-features 12*4*4)."""
    return mnist_net(num_classes=num_classes, image_size=8)


SPECS = (
    ModelSpec(
        name="mnist_net",
        factory=mnist_net,
        inputs=(InputSpec((1, 1, 28, 28)),),
        task="classification",
        output_layers=("dense",),
        description="coremltools pruning-tutorial net: Sequential conv/ReLU/pool/nn.Flatten/Linear/LogSoftmax",
        tags=("zoo", "sample"),
    ),
    ModelSpec(
        name="mnist_net_digits",
        factory=mnist_net_digits,
        inputs=(InputSpec((1, 1, 8, 8)),),
        task="classification",
        output_layers=("dense",),
        description="mnist_net sized for scikit-learn's 8x8 digits (dense 192→10)",
        tags=("zoo",),
    ),
)
