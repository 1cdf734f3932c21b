"""Ops without a rule: a correct model that keeps their channels, a named blocker, strict mode, user rules."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deployprune as dp
from deployprune.errors import EXIT_UNSUPPORTED, ParityError, UnsupportedError
from deployprune.finalize import register_function_rule, register_module_rule, rule_registry, rules

from .helpers import RTOL, assert_plain_tree, assert_untouched, masked_copy, param_count, relative_error, snapshot

DOCS = Path(__file__).resolve().parents[2] / "docs" / "finalize.md"


@pytest.fixture(autouse=True)
def isolated_rule_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules registered by a test live in a copy of the registry that is dropped afterwards."""
    monkeypatch.setattr(rule_registry, "_FUNCTION_RULES", dict(rule_registry._FUNCTION_RULES))
    monkeypatch.setattr(rule_registry, "_MODULE_RULES", dict(rule_registry._MODULE_RULES))


class Spectral(nn.Module):
    """A user's leaf module: magnitude of the FFT along the last (spatial) dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft(x, dim=-1).abs()


class FFTNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = Spectral()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(torch.relu(self.conv1(x)))
        y = torch.relu(self.conv2(y))
        return self.head(y.mean((2, 3)))


class EinsumNet(nn.Module):
    """``torch.einsum`` in the root forward, mixing the spatial grid with a fixed window."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("window", torch.linspace(0.5, 1.5, 8))
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.einsum("bchw,w->bch", y, self.window)
        y = torch.relu(self.conv2(y.unsqueeze(-1)))
        return self.head(y.mean((2, 3)))


class Gate(nn.Module):
    """Data-dependent Python in forward: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > -1e30:
            return x * 2.0
        return x


class GateNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(torch.relu(self.conv1(x)))
        y = torch.relu(self.conv2(y))
        return self.head(y.mean((2, 3)))


KEEP = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.float32)


def _build(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _masks() -> dict:
    """conv1 and conv2: channels 1, 3, 5, 7 zeroed (weight rows and bias)."""
    return {
        "conv1": {"weight": KEEP.view(-1, 1, 1, 1).expand(8, 3, 3, 3).clone(), "bias": KEEP.clone()},
        "conv2": {"weight": KEEP.view(-1, 1, 1, 1).expand(8, 8, 1, 1).clone(), "bias": KEEP.clone()},
    }


def _x(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _parity(model: nn.Module, compacted: nn.Module, masks: dict) -> float:
    ref = masked_copy(model, masks)
    with torch.no_grad():
        return max(relative_error(ref(_x(b, s)), compacted(_x(b, s))) for b in (1, 2) for s in (1, 2))


# conv1 kept whole (8 channels) but conv2 halved: conv2 (4, 8) + head (4, 4)
PARAMS_CONV1_BLOCKED = (8 * 3 * 9 + 8) + (4 * 8 + 4) + (4 * 4 + 4)
# everything compacted: conv1 (4, 3), conv2 (4, 4), head (4, 4)
PARAMS_ALL_COMPACT = (4 * 3 * 9 + 4) + (4 * 4 + 4) + (4 * 4 + 4)


# ---------------------------------------------------------------------------- no rule


@pytest.mark.parametrize(("cls", "needle", "module"), [
    (FFTNet, "fft", "mix"),
    (EinsumNet, "einsum", ""),
])
def test_op_without_rule_keeps_channels_and_is_reported(cls, needle, module, caplog) -> None:
    model = _build(cls)
    masks = _masks()
    before = snapshot(model)
    with caplog.at_level(logging.WARNING, logger="deployprune"):
        r = dp.compact(model, _x(), masks)
    assert_untouched(model, before)
    assert r.compacted
    assert _parity(model, r.model, masks) <= RTOL
    # conv1's masked channels reach the op: kept; conv2 comes after it and still shrinks
    assert r.model.conv1.out_channels == 8
    assert r.model.conv2.out_channels == 4
    assert param_count(r.model) == PARAMS_CONV1_BLOCKED
    hits = [b for b in r.blocked if needle in b.node or needle in b.op]
    assert len(hits) == 1, [b.describe() for b in r.blocked]
    b = hits[0]
    assert b.module == module
    assert b.kept_zero_channels == 4
    text = b.describe()
    assert needle in text and "kept 4 masked channel(s)" in text
    if module:
        assert f"module {module!r}" in text
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert any(b.node in line for line in logged), logged


@pytest.mark.parametrize(("cls", "needle"), [(FFTNet, "fft"), (EinsumNet, "einsum")])
def test_strict_mode_raises_naming_the_blocker(cls, needle) -> None:
    model = _build(cls)
    before = snapshot(model)
    with pytest.raises(UnsupportedError) as info:
        dp.compact(model, _x(), _masks(), strict=True)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg
    assert info.value.exit_code == EXIT_UNSUPPORTED
    assert_untouched(model, before)


def test_module_torch_fx_cannot_trace_is_recorded_and_compacted() -> None:
    # torch.fx fails on the data-dependent branch in Gate.forward; finalize records an eager run
    # instead, so the gate's channels are removed like any others (strict mode has nothing to say)
    model = _build(GateNet)
    masks = _masks()
    r = dp.compact(model, _x(), masks, strict=True)
    assert r.compacted and not r.blocked
    assert _parity(model, r.model, masks) <= RTOL
    assert r.model.conv1.out_channels == 4 and r.model.conv2.out_channels == 4
    assert param_count(r.model) == PARAMS_ALL_COMPACT
    assert_plain_tree(r.model, model)


def test_op_without_rule_on_unmasked_channels_is_not_reported() -> None:
    """A rule-less op only matters where it keeps masked channels."""
    model = _build(FFTNet)
    masks = {"conv2": _masks()["conv2"]}
    r = dp.compact(model, _x(), masks, strict=True)
    assert not r.blocked
    assert r.model.conv2.out_channels == 4
    assert _parity(model, r.model, masks) <= RTOL


class FixedSplit(nn.Module):
    """Forward code with literal split sizes: channels cannot be removed without changing it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, 1)
        self.conv3 = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.conv1(x), [5, 3], dim=1)
        return self.conv2(a) + self.conv3(b)


def test_fixed_size_split_keeping_masked_channels_is_reported() -> None:
    model = _build(FixedSplit)
    masks = {"conv1": _masks()["conv1"]}
    r = dp.compact(model, _x(), masks)
    assert _parity(model, r.model, masks) <= RTOL
    if r.model.conv1.out_channels == 4:
        return  # the split sizes were rewritten: nothing kept, nothing to report
    assert r.model.conv1.out_channels == 8
    hits = [b for b in r.blocked if "split" in b.describe()]
    assert hits and hits[0].kept_zero_channels == 4, [b.describe() for b in r.blocked]
    with pytest.raises(UnsupportedError, match="split"):
        dp.compact(model, _x(), masks, strict=True)


# ---------------------------------------------------------------------------- user rules


def _fft_rule(a, node) -> None:
    """torch.fft.fft(x, n=None, dim=-1): channels pass through, the transformed dim is mixed."""
    x = a.var(node.args[0])
    y = rules.out_var(a, node)
    if x is None or y is None or x.shape != y.shape:
        rules.opaque(a, node)
        return
    dim = rules.norm_dim(rules.arg(node, 2, "dim", -1), x.ndim)
    a.same_all(x, y)
    a.pin(x, dim, "mixed by fft")
    for d, c in x.cval.items():
        if d != dim:
            a.set_cv(y, d, np.where(c == 0, 0.0, np.nan))  # only exact zeros stay known


def test_registered_function_rule_compacts() -> None:
    model = _build(FFTNet)
    masks = _masks()
    register_function_rule(torch.fft.fft)(_fft_rule)
    r = dp.compact(model, _x(), masks, strict=True)
    assert not r.blocked
    assert r.model.conv1.out_channels == 4 and r.model.conv2.in_channels == 4
    assert param_count(r.model) == PARAMS_ALL_COMPACT
    assert _parity(model, r.model, masks) <= RTOL


def test_registered_module_rule_compacts_custom_leaf() -> None:
    model = _build(FFTNet)
    masks = _masks()

    @register_module_rule(Spectral)
    def _spectral(a, node, module) -> None:
        # channels pass through unchanged (the FFT mixes only the last dimension); zeros stay zero
        x = a.var(node.args[0])
        y = rules.out_var(a, node)
        a.same_all(x, y)
        a.pin(x, x.ndim - 1, "mixed by Spectral")
        for d, c in x.cval.items():
            if d != x.ndim - 1:
                a.set_cv(y, d, np.where(c == 0, 0.0, np.nan))

    r = dp.compact(model, _x(), masks, strict=True)
    assert not r.blocked
    assert r.model.conv1.out_channels == 4
    assert param_count(r.model) == PARAMS_ALL_COMPACT
    assert _parity(model, r.model, masks) <= RTOL


def test_registered_module_rule_for_untraceable_module() -> None:
    model = _build(GateNet)
    masks = _masks()

    @register_module_rule(Gate)
    def _gate(a, node, module) -> None:
        rules.elementwise(a, node, fn=lambda t: t * 2.0)

    r = dp.compact(model, _x(), masks, strict=True)
    assert not r.blocked
    assert param_count(r.model) == PARAMS_ALL_COMPACT
    assert _parity(model, r.model, masks) <= RTOL


def _doc_blocks() -> list[str]:
    text = DOCS.read_text()
    blocks = re.findall(r"<!-- tested -->\s*```python\n(.*?)```", text, flags=re.S)
    return blocks


def test_documented_custom_rule_example_runs() -> None:
    """The example in docs/finalize.md is run as written (its own asserts included)."""
    blocks = _doc_blocks()
    assert blocks, f"no '<!-- tested -->' python block in {DOCS}"
    namespace: dict = {"__name__": "docs_example"}
    for code in blocks:
        exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace.get("result") is not None
    assert not namespace["result"].blocked


# ---------------------------------------------------------------------------- masked channel accounting


def _rows(layer: nn.Module, idx: list[int], bias: bool = True) -> dict:
    """Masks zeroing output channels ``idx`` of a Linear/conv (weight rows, and the bias unless told)."""
    w = torch.ones_like(layer.weight)
    w[idx] = 0
    out = {"weight": w}
    if bias and layer.bias is not None:
        b = torch.ones_like(layer.bias)
        b[idx] = 0
        out["bias"] = b
    return out


def _cols(layer: nn.Linear, idx: list[int]) -> dict:
    w = torch.ones_like(layer.weight)
    w[:, idx] = 0
    return {"weight": w}


def test_accounting_names_module_count_and_reason() -> None:
    model = _build(FFTNet)
    r = dp.compact(model, _x(), _masks())
    # conv1 and conv2 each lose 4 filters to the masks; conv1's reach the FFT, conv2's go
    assert (r.masked_channels, r.removed_channels, r.kept_channels) == (8, 4, 4)
    assert len(r.kept) == 1
    k = r.kept[0]
    assert (k.module, k.count) == ("conv1", 4)
    assert "no propagation rule" in k.reason and "fft" in k.op and "fft" in k.node
    assert r.summary().splitlines()[0] == f"removed 4 of 8 masked channels; kept 4 in 'conv1' ({k.reason})"
    assert [b.kept_zero_channels for b in r.blocked] == [4]


class RotaryAttention(nn.Module):
    """Multi-head attention whose queries and keys go through a rotary-style half split of each head
    (``x[..., :hd // 2]``): the slice pins the head dimension, and only it."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.hd = dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.cat((-x[..., self.hd // 2:], x[..., : self.hd // 2]), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, -1, self.hd).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def test_a_slice_pinning_the_head_dim_is_not_blamed_for_masked_heads() -> None:
    torch.manual_seed(0)
    model = RotaryAttention().eval()
    x = torch.randn(1, 5, 32)
    head1 = list(range(8, 16))
    pos3 = [h * 8 + 3 for h in range(4)]  # position 3 of every head: the slice keeps positions whole
    masks = {"q": _rows(model.q, head1 + pos3), "k": _rows(model.k, head1 + pos3), "v": _rows(model.v, head1),
             "o": _cols(model.o, head1)}
    r = dp.compact(model, x, masks)
    assert r.compacted
    ref = masked_copy(model, masks)
    with torch.no_grad():
        assert relative_error(ref(x), r.model(x)) <= RTOL
    assert r.model.q.out_features == r.model.o.in_features == 24  # head 1 went everywhere
    # q and k: 8 rows of head 1 + 3 more rows of position 3; v: 8 rows; o: 8 columns
    assert r.masked_channels == 38 and r.removed_channels == 32
    kept = {k.module: k for k in r.kept}
    assert sorted(kept) == ["k", "q"] and kept["q"].count == kept["k"].count == 3
    for k in kept.values():
        assert "sliced at fixed positions" in k.reason and k.op == "operator.getitem", k.reason
    # the slices' blockers count the 6 position channels, not the 32 head channels that went
    assert sum(b.kept_zero_channels for b in r.blocked) == 6
    assert all("sliced" in b.reason for b in r.blocked)


class Branches(nn.Module):
    """A residual sum of two convs (a + b) and a conv whose output reaches a padded conv (d -> e)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.d = (nn.Conv2d(3, 8, 1) for _ in range(3))
        self.c, self.e = (nn.Conv2d(8, 4, 3, padding=1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) + self.b(x)) + self.e(self.d(x))


def test_coupled_and_constant_channels_are_kept_with_their_reason() -> None:
    model = _build(Branches)
    odd = [1, 3, 5, 7]
    masks = {"a": _rows(model.a, odd), "d": _rows(model.d, odd, bias=False)}
    r = dp.compact(model, _x(), masks)
    assert r.compacted and (r.masked_channels, r.removed_channels) == (8, 0)
    reasons = {k.module: k.reason for k in r.kept}
    assert reasons["a"] == "coupled with 'b', whose channel is not masked"
    assert reasons["d"].startswith("its constant (an unmasked bias) reaches Conv2d 'e'")
    assert not r.blocked  # no op without a rule is involved
    with pytest.raises(UnsupportedError) as info:
        dp.compact(model, _x(), masks, strict=True)
    msg = str(info.value)
    assert "\n" not in msg and info.value.exit_code == EXIT_UNSUPPORTED
    assert "kept 4 in 'a' (coupled with 'b'" in msg and "kept 4 in 'd' (its constant" in msg
    # masking d's bias too makes those channels exactly zero: they go, and strict has nothing to say
    masks["d"] = _rows(model.d, odd)
    r = dp.compact(model, _x(), {"d": masks["d"]}, strict=True)
    assert (r.masked_channels, r.removed_channels, r.kept) == (4, 4, [])
    assert r.model.d.out_channels == 4


def test_counts_use_thousands_separators_and_outputs_keep_their_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3000), nn.ReLU(), nn.Linear(3000, 2)).eval()
    masks = {"0": _rows(model[0], list(range(1536))), "2": _rows(model[2], [1])}
    r = dp.compact(model, torch.randn(2, 4), masks)
    assert r.model[0].out_features == 3000 - 1536
    assert r.summary().splitlines()[0] == "removed 1,536 of 1,537 masked channels; kept 1 in '2' (model output)"


def test_masked_channel_definition() -> None:
    """A slice counts when it is all zero and the mask zeroed some of it: element masks that empty a row
    count, partly masked rows and zero-initialised rows do not; a layer masked whole counts its rows
    (not its columns too), and keeps one of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        model[2].weight[0] = 0.0  # zero before any mask: not a masked channel
    w = torch.ones_like(model[2].weight)
    w[1] = 0  # an element mask that empties row 1
    w[2, :4] = 0  # and half of row 2
    masks = {"0": _rows(model[0], list(range(8))), "2": {"weight": w}}
    r = dp.compact(model, torch.randn(2, 4), masks)
    ref = masked_copy(model, masks)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert relative_error(ref(x), r.model(x)) <= RTOL
    # layer 0: its 8 rows (masked whole, so its columns are not counted again); layer 2: row 1 only
    assert r.masked_channels == 8 + 1
    assert [(k.module, k.count, k.reason) for k in r.kept] == [
        ("0", 1, "a dimension keeps at least one channel; none of its 8 is needed")]
    assert r.removed_channels == 7 + 1


def _swap_first_two_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real fault: the Conv2d rebuilder swaps the first two filters of every layer it rebuilds."""
    original = rule_registry._MODULE_RULES[nn.Conv2d]

    def faulty(a, node, module) -> None:
        original(a, node, module)
        rebuild = a.rebuilders[str(node.target)]

        def swapped():
            new = rebuild()
            if new is not None and new.out_channels > 1:
                with torch.no_grad():
                    new.weight[[0, 1]] = new.weight[[1, 0]].clone()
                    if new.bias is not None:
                        new.bias[[0, 1]] = new.bias[[1, 0]].clone()
            return new

        a.rebuilders[str(node.target)] = swapped

    monkeypatch.setitem(rule_registry._MODULE_RULES, nn.Conv2d, faulty)


def test_abandoned_compaction_returns_the_masked_model_and_keeps_every_channel(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    model = _build(GateNet)
    masks = _masks()
    _swap_first_two_outputs(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="deployprune"):
        r = dp.compact(model, _x(), masks)
    assert not r.compacted and r.abandoned.startswith("self-check failed: max abs error")
    assert r.model.conv1.out_channels == 8 and param_count(r.model) == param_count(model)
    assert _parity(model, r.model, masks) == 0.0  # the masked model itself
    assert (r.masked_channels, r.removed_channels, r.kept_channels) == (8, 0, 8)
    assert {k.module for k in r.kept} == {"conv1", "conv2"}
    assert all(k.reason.startswith("compaction abandoned: self-check failed") for k in r.kept)
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert any("compaction abandoned" in e and "please report this model" in e for e in errors), errors
    with pytest.raises(ParityError, match="please report this model"):
        dp.compact(model, _x(), masks, strict=True)
