"""Small models and ONNX helpers shared by the validation and report tests."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class TinyNet(nn.Module):
    """Conv stem, two blocks (the first conv of each followed by BatchNorm), linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(torch.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics so folding changes the weights
        for bn in (model.layer1.bn1, model.layer2.bn1):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def export_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, *,
                dynamic_batch: bool = True) -> Path:
    """TorchScript exporter (dynamo=False, opset 17): one file, /module/path/Op node names."""
    names = [f"input{i}" for i in range(len(inputs))]
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17,
                          input_names=names, dynamic_axes=axes)
    return path


def perturb_onnx_weight(src: Path, dst: Path, node_name: str, delta: float = 0.5) -> str:
    """Copy ``src`` to ``dst`` with the weight of ``node_name`` changed: ``delta`` added to
    the filter of its first output channel. Returns the initializer name that was changed.
    """
    model = onnx.load(str(src))
    node = next(n for n in model.graph.node if n.name == node_name)
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    w = numpy_helper.to_array(init).copy()
    w[0] += delta
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(dst))
    return init.name


class MaskedNet(nn.Module):
    """conv1 (3->8) -> relu -> conv2 (8->4) -> mean -> fc; used masked and compacted."""

    def __init__(self, mid: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, mid, 3, padding=1)
        self.conv2 = nn.Conv2d(mid, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(x.mean(dim=(2, 3)))


PRUNED = [1, 3, 5]


def masked_and_compact() -> tuple[MaskedNet, MaskedNet]:
    """A model with conv1 output channels 1, 3, 5 zeroed and its physically smaller twin."""
    torch.manual_seed(1)
    masked = MaskedNet().eval()
    with torch.no_grad():
        masked.conv1.weight[PRUNED] = 0
        masked.conv1.bias[PRUNED] = 0
    keep = [i for i in range(8) if i not in PRUNED]
    compact = MaskedNet(mid=len(keep)).eval()
    with torch.no_grad():
        compact.conv1.weight.copy_(masked.conv1.weight[keep])
        compact.conv1.bias.copy_(masked.conv1.bias[keep])
        compact.conv2.weight.copy_(masked.conv2.weight[:, keep])
        compact.conv2.bias.copy_(masked.conv2.bias)
        compact.fc.load_state_dict(masked.fc.state_dict())
    return masked, compact


class Offset(nn.Module):
    """Wraps a model and adds a fixed offset to its output: a known, controllable error."""

    def __init__(self, model: nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        self.register_buffer("offset", offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.offset


class Attention(nn.Module):
    """ViT-style attention: a qkv Linear, functional attention, an output projection."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Two transformer blocks on (batch, tokens, 8) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(TransformerBlock(), TransformerBlock())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


def simplify_onnx(src: Path, dst: Path) -> Path:
    """onnxsim, as the ONNX converter runs it: it fuses MatMul + Add of 3-D Linears into
    Reshape/Gemm/Reshape nodes named ``Gemm_3`` (no module scope)."""
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(str(src)))
    assert ok
    onnx.save(model, str(dst))
    return dst


def perturb_initializer_of(src: Path, dst: Path, bias_name: str, delta: float = 0.5) -> None:
    """Add seeded noise of size ``delta`` to the weight of the (possibly renamed) node whose
    bias is ``bias_name`` (noise, not a constant: a constant shift of a weight that reads a
    LayerNorm output changes nothing, the normalized features sum to zero)."""
    import numpy as np

    model = onnx.load(str(src))
    node = next(n for n in model.graph.node if bias_name in n.input)
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    w = numpy_helper.to_array(init).copy()
    w += (delta * np.random.default_rng(0).standard_normal(w.shape)).astype(w.dtype)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(dst))
