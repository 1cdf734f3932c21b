"""The measured cost model (issue 14): layer shapes from forward hooks, onnxruntime timings of
one-layer graphs on a width grid, the JSON cache, the preferred channel multiple.

Layers are small (spatial 8x8 to 32x32) and the timing budgets are cut down so the file runs in a
few seconds; nothing asserts a time, only orderings with a wide margin.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from deployprune import costmodel
from deployprune.costmodel import CostTable, CostTableWarning, LayerShape, RuntimeSetting, predict_ms, record_layers
from deployprune.errors import ConfigError, InputError, UsageError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Nothing is written to the home directory, and timing is kept cheap."""
    monkeypatch.setenv("DEPLOYPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(costmodel, "GRID_BUDGET_MS", 20.0)
    monkeypatch.setattr(costmodel, "MIN_REPEATS", 3)
    monkeypatch.setattr(costmodel, "MAX_REPEATS", 5)
    return tmp_path / "cache"


class Net(nn.Module):
    """Dense, depthwise and grouped convs, a Conv1d, and Linears on (B, C) and (B, T, C) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 32, 1, groups=4)
        self.dilated = nn.Conv2d(32, 8, 3, padding="same", dilation=2)
        self.seq = nn.Conv1d(8, 12, 5, stride=2, padding=2)
        self.proj = nn.Linear(12, 20)
        self.head = nn.Linear(20, 5)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dilated(self.grouped(self.dw(self.stem(x))))  # (B, 8, 8, 8)
        t = self.seq(x.flatten(2))  # (B, 12, 32)
        t = self.proj(t.transpose(1, 2))  # (B, 32, 20)
        return self.head(t.mean(1))  # (B, 5)


def conv(cin: int, cout: int, hw: int = 32, *, k: int = 3, groups: int = 1, n: int = 1) -> LayerShape:
    return LayerShape("conv2d", cin, cout, (k, k), (1, 1), (k // 2, k // 2), (1, 1), groups, (n, cin, hw, hw), True)


def test_record_layers_finds_every_conv_and_linear_with_its_shape():
    model = Net().eval()
    layers = record_layers(model, (torch.randn(2, 3, 16, 16),))
    assert list(layers) == ["stem", "dw", "grouped", "dilated", "seq", "proj", "head"]  # module order; unused absent
    stem, dw, grouped, dilated = layers["stem"], layers["dw"], layers["grouped"], layers["dilated"]
    assert stem == LayerShape("conv2d", 3, 16, (3, 3), (2, 2), (1, 1), (1, 1), 1, (2, 3, 16, 16), False)
    assert dw.groups == dw.in_channels == dw.out_channels == 16 and dw.depthwise and dw.input_shape == (2, 16, 8, 8)
    assert grouped.groups == 4 and not grouped.depthwise and grouped.out_channels == 32
    assert dilated.padding == (2, 2) and dilated.dilation == (2, 2)  # padding="same" made explicit
    assert layers["seq"].kind == "conv1d" and layers["seq"].input_shape == (2, 8, 64)
    assert layers["seq"].stride == (2,) and layers["seq"].kernel == (5,)
    assert layers["proj"] == LayerShape("linear", 12, 20, (), (), (), (), 1, (2, 32, 12), True)
    assert layers["head"].input_shape == (2, 20)
    # no hooks left behind, the model is unchanged
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_record_layers_rescales_the_batch():
    layers = record_layers(Net().eval(), torch.randn(2, 3, 16, 16), batch=6)
    assert layers["stem"].input_shape[0] == 6 and layers["proj"].input_shape == (6, 32, 12)
    with pytest.raises(UsageError, match="batch"):
        record_layers(Net(), (torch.randn(1, 3, 16, 16),), batch=0)


def test_layer_ms_is_positive_and_grows_with_the_layer(cache_dir):
    table = CostTable(autosave=False)
    small = table.layer_ms(conv(8, 8), 8, 8)
    big = table.layer_ms(conv(64, 256), 64, 256)
    assert small > 0 and big > 0
    assert big > 5 * small  # 256x more MACs
    wide = conv(64, 256)
    # narrower widths of the same layer interpolate between measured points and cost less
    assert table.layer_ms(wide, 16, 64) < table.layer_ms(wide, 64, 256)
    assert table.layer_ms(wide, 40, 100) > 0
    dw = conv(64, 64, groups=64)
    assert table.layer_ms(dw, 16, 16) > 0 and table.layer_ms(dw, 64, 64) > 0
    lin = LayerShape("linear", 32, 48, (), (), (), (), 1, (2, 10, 32), True)
    assert table.layer_ms(lin, 32, 48) > 0
    with pytest.raises(UsageError, match="in_channels"):
        table.layer_ms(wide, 0, 10)


def test_the_grid_measures_widths_in_groups():
    table = CostTable(autosave=False)
    ins, outs = table.grid(conv(64, 256))
    assert ins == [16, 32, 64] and outs == [64, 128, 256]
    assert table.grid(conv(3, 32))[0] == [3]  # an image's channels: full width only
    dw_widths, none = table.grid(conv(96, 96, groups=96))
    assert none == [] and len(dw_widths) >= 4 and dw_widths[-1] == 96
    grouped, _ = table.grid(conv(48, 48, groups=12))
    assert all(w % 12 == 0 for w in grouped)


def test_predict_ms_sums_the_layers_at_their_widths():
    model = Net().eval()
    layers = record_layers(model, (torch.randn(1, 3, 16, 16),))
    table = CostTable(autosave=False)
    full = predict_ms(table, layers, {})
    assert full == pytest.approx(sum(table.layer_ms(s, s.in_channels, s.out_channels) for s in layers.values()))
    assert predict_ms(table, layers, {"proj": (12, 20)}) == pytest.approx(full)
    with pytest.raises(UsageError, match="unknown layer"):
        predict_ms(table, layers, {"nope": (1, 1)})


def test_the_cache_round_trips_without_measuring_again(cache_dir):
    shape = conv(32, 64, 16)
    table = CostTable()
    first = table.layer_ms(shape, 12, 20)
    assert table.measurements == 9  # 3 x 3 grid
    path = table.path
    assert path.parent == cache_dir and path.name.startswith("cost-") and path.suffix == ".json"
    assert table.save() == path

    again = CostTable()  # same setting and machine: same file name
    assert again.path == path
    assert again.layer_ms(shape, 12, 20) == pytest.approx(first)
    assert again.measurements == 0
    loaded = CostTable.load(path)
    assert loaded.layer_ms(shape, 12, 20) == pytest.approx(first) and loaded.measurements == 0
    assert loaded.entries == table.entries

    # another setting is another file
    assert CostTable(RuntimeSetting(threads=2)).path != path


def test_the_cache_is_plain_json_with_the_setting_and_machine(cache_dir):
    table = CostTable(RuntimeSetting(threads=1, batch=4))
    table.layer_ms(conv(8, 8, 8, n=4), 8, 8)
    doc = json.loads(table.path.read_text())
    assert doc["format"] == "deployprune.cost_table" and doc["version"] == 1
    assert doc["setting"] == {"provider": "CPUExecutionProvider", "threads": 1, "batch": 4,
                              "graph_optimization": "all"}
    assert {"cpu", "cores", "onnxruntime"} <= set(doc["machine"])
    assert doc["machine"]["cores"] >= 1
    assert doc["points"] and all(isinstance(v, float) and v > 0 for v in doc["points"].values())
    assert any(k.startswith("conv2d in=8 out=8") for k in doc["points"])
    assert doc == table.to_dict()


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]",
                                     b'{"format": "deployprune.cost_table", "version": 1, "machine": {}, '
                                     b'"setting": {}, "points": {"x": -1}}'])
def test_a_garbled_cache_warns_once_and_is_measured_again(cache_dir, content):
    path = cache_dir / "table.json"
    cache_dir.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.warns(CostTableWarning) as caught:
        table = CostTable(path=path)
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and str(path) in str(caught[0].message)
    assert table.layer_ms(conv(8, 8, 8), 8, 8) > 0 and table.measurements > 0
    assert json.loads(path.read_text())["points"]  # rebuilt and rewritten
    with pytest.raises(InputError, match="not a readable cost table"):
        path.write_bytes(content)
        CostTable.load(path)


def test_a_cache_of_another_setting_is_not_reused(cache_dir):
    path = cache_dir / "t.json"
    CostTable(RuntimeSetting(threads=2), path=path).layer_ms(conv(8, 8, 8), 8, 8)
    with pytest.warns(CostTableWarning, match="another runtime setting"):
        table = CostTable(RuntimeSetting(threads=1), path=path)
    assert table.entries == {}
    assert CostTable.load(path).setting.threads == 2


def test_load_of_a_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="no such cost table"):
        CostTable.load(tmp_path / "missing.json")


def test_preferred_multiple_is_measured_and_cached(cache_dir):
    table = CostTable()
    m = table.preferred_multiple(conv(32, 32, 8, k=1))
    assert m in (1, 2, 4, 8, 16)
    count = table.measurements
    assert count == 17
    assert table.preferred_multiple(conv(32, 32, 8, k=1)) == m and table.measurements == count
    [entry] = table.multiples.values()
    assert entry["multiple"] == m and entry["widths"] == list(range(16, 33)) and len(entry["ms"]) == 17
    assert CostTable().preferred_multiple(conv(32, 32, 8, k=1)) == m  # from the file


def test_the_preferred_multiple_rule():
    widths = list(range(64, 81))
    flat = [1.0 + 0.01 * (w - 64) for w in widths]  # no width special
    assert costmodel._preferred(widths, flat)[0] == 1
    fours = [0.5 if w % 4 == 0 else 1.0 for w in widths]
    assert costmodel._preferred(widths, fours)[0] == 4
    sixteens = [0.5 if w % 16 == 0 else 1.0 for w in widths]
    assert costmodel._preferred(widths, sixteens)[0] == 16
    # measured here on a 1x1 conv: 64 and 80 fast, other multiples of 4 slower than their neighbours
    measured = [166, 173, 177, 189, 249, 196, 199, 201, 257, 215, 228, 226, 256, 239, 245, 246, 248]
    m, dominated = costmodel._preferred(widths, measured)
    assert m == 16 and dominated[4] == [68, 72] and dominated[16] == []


def test_model_ms_times_a_whole_onnx_model(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
    table = CostTable(autosave=False)
    assert table.model_ms(path, (x,), warmup=1, repeats=3) > 0
    assert table.model_ms(path.read_bytes(), x, warmup=1, repeats=3) > 0


def test_settings_and_shapes_are_validated():
    with pytest.raises(ConfigError, match="threads"):
        RuntimeSetting(threads=0)
    with pytest.raises(ConfigError, match="graph_optimization"):
        RuntimeSetting(graph_optimization="max")
    with pytest.raises(ConfigError, match="unknown key 'thread'"):
        RuntimeSetting.from_dict({"thread": 1})
    with pytest.raises(ConfigError, match="groups"):
        conv(10, 10, groups=4)
    shape = conv(16, 32)
    assert LayerShape.from_dict(shape.to_dict()) == shape
    with pytest.raises(UsageError):
        CostTable("CPUExecutionProvider")  # type: ignore[arg-type]


def test_an_unwritable_cache_warns_and_keeps_measuring(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    table = CostTable(path=blocker / "sub" / "t.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert table.layer_ms(conv(8, 8, 8), 8, 8) > 0
    assert any(issubclass(w.category, CostTableWarning) for w in caught)
    assert not table.autosave


@pytest.mark.real
def test_record_layers_records_transformers_conv1d_as_the_linear_it_is():
    """GPT-2's Conv1D stores its weight (in, out) and runs addmm: it is priced as a linear layer."""
    from deployprune._compat import tolerate_missing_torchvision_ops

    tolerate_missing_torchvision_ops()
    import transformers

    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                                           vocab_size=50, use_cache=False)).eval()
    layers = record_layers(model, (torch.randint(0, 50, (1, 8)),))
    assert layers["h.0.attn.c_attn"] == LayerShape("linear", 32, 96, (), (), (), (), 1, (1, 8, 32), True)
    assert layers["h.0.mlp.c_fc"].out_channels == 128 and layers["h.0.mlp.c_proj"].in_channels == 128
    # a pruner's masks parametrize the weight (the class becomes ParametrizedConv1D): still the same layer
    from torch.nn.utils import parametrize

    from deployprune.costmodel import is_conv1d_linear

    class Same(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w

    c_fc = model.h[0].mlp.c_fc
    parametrize.register_parametrization(c_fc, "weight", Same())
    assert type(c_fc).__name__ != "Conv1D" and is_conv1d_linear(c_fc)
    assert record_layers(model, (torch.randint(0, 50, (1, 8)),))["h.0.mlp.c_fc"].out_channels == 128
    assert not is_conv1d_linear(torch.nn.Linear(4, 4))


def test_record_layers_records_multihead_attention_as_its_two_projections():
    """nn.MultiheadAttention runs in_proj_weight and out_proj functionally (no Linear is called): it is
    priced as in_proj (E -> 3E, under its own name) and out_proj (E -> E), with the query's shape."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(query=x, key=x, value=x, need_weights=False)[0])

    layers = record_layers(Block().eval(), (torch.randn(2, 5, 32),), batch=4)
    assert layers["attn"] == LayerShape("linear", 32, 96, (), (), (), (), 1, (4, 5, 32), True)
    assert layers["attn.out_proj"] == LayerShape("linear", 32, 32, (), (), (), (), 1, (4, 5, 32), True)
    assert list(layers) == ["attn", "attn.out_proj", "fc"]
