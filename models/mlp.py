"""A plain multilayer perceptron on tabular features."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._spec import InputSpec, ModelSpec


class MLP(nn.Module):
    """Linear → ReLU → Dropout blocks followed by a Linear head."""

    def __init__(
        self,
        in_features: int = 32,
        hidden: Sequence[int] = (64, 64),
        num_classes: int = 10,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(x))


def mlp() -> MLP:
    return MLP(in_features=32, hidden=(64, 64), num_classes=10)


SPECS = (
    ModelSpec(
        name="mlp",
        factory=mlp,
        inputs=(InputSpec((1, 32)),),
        task="classification",
        output_layers=("head",),
        description="Linear/ReLU/Dropout MLP on 32 features",
        tags=("zoo",),
    ),
)
