from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deployprune.errors import InputError
from deployprune.stats import (
    count_macs,
    count_nonzero_params,
    count_params,
    file_size,
    layer_table,
    macs_by_module,
    module_name_from_scope,
    onnx_layers,
    onnx_macs,
    onnx_params,
)

from .helpers import TinyViT, export_onnx, masked_and_compact, simplify_onnx, tiny_net


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def test_count_params_counts_shared_and_parametrized_weights_once() -> None:
    lin = nn.Linear(4, 3)
    assert count_params(lin) == 15
    shared = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_params(shared) == 15
    masked = nn.Linear(4, 3)
    mask = torch.ones(3, 4)
    mask[0] = 0
    parametrize.register_parametrization(masked, "weight", _Mask(mask))
    assert count_params(masked) == 15  # the original, not the parametrization's buffers
    with torch.no_grad():
        masked.bias.zero_()
    assert count_nonzero_params(masked) == 8  # two unmasked rows of 4; bias zeroed


def test_count_macs_of_conv_and_linear() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    x = torch.randn(2, 3, 10, 10)
    conv = 2 * 8 * 8 * 8 * (3 * 3 * 3)  # batch * out elements * (C_in * k * k)
    linear = 2 * 512 * 10
    assert count_macs(model, (x,)) == conv + linear
    per = macs_by_module(model, x)
    assert per["0"] == conv and per["2"] == linear and per[""] == conv + linear
    model.train()
    count_macs(model, (x,))
    assert model.training  # mode restored


def test_count_macs_counts_attention_on_cpu() -> None:
    """scaled_dot_product_attention's CPU kernel and nn.MultiheadAttention's eval fast path have no formula
    in torch's flop counter: without one they counted as free (a torchvision ViT's attention was 0 MACs)."""
    import torch.nn.functional as F

    class Sdpa(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, q, q)

    b, h, n, d = 2, 4, 17, 16
    assert count_macs(Sdpa(), (torch.randn(b, h, n, d),)) == 2 * b * h * n * n * d  # Q K^T, then the sum over V

    class SelfAttention(nn.Module):  # as torchvision's ViT calls it: batch first, need_weights=False
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    model = SelfAttention().eval()
    x = torch.randn(1, n, 64)
    assert torch.backends.mha.get_fastpath_enabled()
    in_proj, attention, out_proj = n * 64 * 192, 2 * 4 * n * n * 16, n * 64 * 64
    assert count_macs(model, (x,)) == in_proj + attention + out_proj
    assert macs_by_module(model, (x,))["attn"] == in_proj + attention + out_proj
    assert torch.backends.mha.get_fastpath_enabled()  # switched on again after counting
    # nn.TransformerEncoderLayer's fused eval fast path too: attention plus its two feed-forward Linears
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    assert count_macs(layer, (x,)) == in_proj + attention + out_proj + 2 * n * 64 * 128


def test_onnx_macs_agree_with_the_flop_counter(tmp_path: Path) -> None:
    model = tiny_net()
    x = torch.randn(1, 3, 12, 12)
    path = export_onnx(model, (x,), tmp_path / "tiny.onnx")
    assert onnx_macs(path) == count_macs(model, (x,))  # symbolic batch -> 1
    assert onnx_macs(path, [[4, 3, 12, 12]]) == count_macs(model, (torch.randn(4, 3, 12, 12),))


def test_onnx_macs_observes_attention_shapes_in_onnxruntime(tmp_path: Path) -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    model = Attn().eval()
    x = torch.randn(1, 5, 8)
    path = export_onnx(model, (x,), tmp_path / "attn.onnx")
    length, e = 5, 8
    expected = length * e * 3 * e + 2 * length * length * e + length * e * e
    assert onnx_macs(path) == expected


def test_onnx_params_and_nonzero(tmp_path: Path) -> None:
    masked, compact = masked_and_compact()
    x = torch.randn(1, 3, 8, 8)
    path = export_onnx(masked, (x,), tmp_path / "masked.onnx")
    assert onnx_params(path) == count_params(masked)
    assert onnx_params(path, nonzero=True) == count_nonzero_params(masked)


def test_file_size_sums_directories_and_onnx_external_data(tmp_path: Path) -> None:
    d = tmp_path / "m.mlpackage"
    (d / "a").mkdir(parents=True)
    (d / "a" / "w.bin").write_bytes(b"1" * 300)
    (d / "Manifest.json").write_bytes(b"2" * 20)
    assert file_size(d) == 320
    model = nn.Linear(64, 64)
    path = export_onnx(model, (torch.zeros(1, 64),), tmp_path / "lin.onnx")
    proto = onnx.load(str(path))
    ext = tmp_path / "ext.onnx"
    onnx.save(proto, str(ext), save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    side = tmp_path / "ext.onnx.data"
    assert side.stat().st_size >= 64 * 65 * 4
    assert file_size(ext) == ext.stat().st_size + side.stat().st_size
    with pytest.raises(InputError, match="nope.onnx: not found"):
        file_size(tmp_path / "nope.onnx")


def test_layer_table_between_modules() -> None:
    masked, compact = masked_and_compact()
    rows = {r.name: r for r in layer_table(masked, compact)}
    assert list(rows) == ["conv1", "conv2", "fc"]
    c1 = rows["conv1"]
    assert (c1.type, c1.in_before, c1.in_after, c1.out_before, c1.out_after) == (
        "Conv2d", 3, 3, 8, 5)
    assert (c1.params_before, c1.params_after) == (8 * 27 + 8, 5 * 27 + 5)
    assert c1.sparsity_before == pytest.approx(3 / 8) and c1.sparsity_after == 0.0
    assert c1.channels_removed == pytest.approx(3 / 8)
    assert rows["fc"].channels_removed == 0.0


def test_layer_table_against_an_onnx_file(tmp_path: Path) -> None:
    model = tiny_net()
    path = export_onnx(model, (torch.randn(1, 3, 12, 12),), tmp_path / "tiny.onnx")
    rows = {r.name: r for r in layer_table(model, path)}
    assert (rows["layer2.conv1"].in_after, rows["layer2.conv1"].out_after) == (8, 16)
    assert rows["layer2.conv1"].params_after == 16 * 8 * 9 + 16
    assert rows["fc"].out_after == 10 and rows["fc"].type == "Linear"
    # BatchNorm folded into the convolution by the exporter: no layer of its own afterwards
    assert rows["layer1.bn1"].out_before == 8 and rows["layer1.bn1"].out_after is None
    layers = onnx_layers(path)
    assert layers["layer1.conv1"]["onnx_node"] == "/layer1/conv1/Conv"


def test_layer_table_sees_through_parametrized_masks() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    mask = torch.ones(6, 4)
    mask[:3] = 0
    parametrize.register_parametrization(model[0], "weight", _Mask(mask))
    rows = {r.name: r for r in layer_table(model, model)}
    assert list(rows) == ["0", "2"]  # no rows for the parametrization containers
    assert rows["0"].sparsity_before == pytest.approx(0.5)
    assert rows["0"].params_before == 30


@pytest.mark.parametrize("name, expected", [
    ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
    ("/features/features.3/block/block.0/block.0.0/Conv", "features.3.block.0.0"),
    ("/fc/Gemm", "fc"),
    ("/Add", None),
    ("Gemm_2", None),
])
def test_module_name_from_scope(name: str, expected: str | None) -> None:
    assert module_name_from_scope(name) == expected


def test_module_name_from_scope_with_known_modules() -> None:
    modules = ["", "enc", "enc.linear1", "heads", "heads.a", "layers", "layers.0",
               "layers.0.linear1"]
    # a module's second call gets a _1 suffix
    assert module_name_from_scope("/enc/linear1_1/MatMul", modules) == "enc.linear1"
    # a ModuleDict entry called from the root is shown by its key alone
    assert module_name_from_scope("/a/Gemm", modules) == "heads.a"
    assert module_name_from_scope("/layers.0/linear1/Gemm", modules) == "layers.0.linear1"
    assert module_name_from_scope("/enc/linear3/MatMul", modules) is None


def test_scopes_of_a_real_export_resolve_to_module_names(tmp_path: Path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.features = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
            self.heads = nn.ModuleDict({"a": nn.Linear(4, 4)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.features(self.lin(self.lin(x)))
            return self.heads["a"](x)

    model = Net().eval()
    path = export_onnx(model, (torch.randn(1, 4),), tmp_path / "n.onnx")
    names = dict(model.named_modules())
    got = [module_name_from_scope(n.name, names) for n in onnx.load(str(path)).graph.node
           if n.op_type == "Gemm"]
    assert got == ["lin", "lin", "features.0", "features.1.0", "heads.a"]


def test_export_helper_keeps_scoped_names(tmp_path: Path) -> None:
    # guards the assumption every localization test relies on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(tiny_net(), (torch.randn(1, 3, 8, 8),), tmp_path / "t.onnx")
    names = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    assert names == ["/stem/Conv", "/layer1/conv1/Conv", "/layer1/conv2/Conv",
                     "/layer2/conv1/Conv", "/layer2/conv2/Conv"]


def test_layer_table_finds_layers_a_simplifier_renamed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    raw = export_onnx(model, (torch.randn(1, 5, 8),), tmp_path / "raw.onnx")
    simple = simplify_onnx(raw, tmp_path / "simple.onnx")
    renamed = [n for n in onnx.load(str(simple)).graph.node
               if n.op_type == "Gemm" and not n.name.startswith("/")]
    assert len(renamed) >= 6  # qkv, proj, fc1, fc2 of each block
    rows = {r.name: r for r in layer_table(model, simple)}
    for block in ("blocks.0", "blocks.1"):
        for name, (i, o) in {"attn.qkv": (8, 24), "attn.proj": (8, 8), "mlp.fc1": (8, 16),
                             "mlp.fc2": (16, 8)}.items():
            row = rows[f"{block}.{name}"]
            assert (row.in_after, row.out_after) == (i, o), row
            assert row.params_after == row.params_before == i * o + o
