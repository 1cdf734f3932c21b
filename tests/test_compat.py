"""The torchvision shim: the real libraries import and build models; other errors still raise."""

from __future__ import annotations

import pytest
import torch

from deployprune._compat import tolerate_missing_torchvision_ops


def test_real_model_libraries_import_and_build() -> None:
    import timm
    import torchvision
    import transformers

    x = torch.randn(1, 3, 32, 32)
    assert torchvision.models.resnet18(num_classes=4).eval()(x).shape == (1, 4)
    assert timm.create_model("resnet18", num_classes=4).eval()(x).shape == (1, 4)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50)
    out = transformers.BertModel(config).eval()(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.last_hidden_state.shape == (1, 3, 32)


def test_shim_is_idempotent_and_only_skips_missing_torchvision_ops() -> None:
    tolerate_missing_torchvision_ops()  # conftest already applied it
    assert tolerate_missing_torchvision_ops() is False
    # A registration for an operator that does not exist outside torchvision's namespace still raises.
    with pytest.raises(RuntimeError, match="does not exist"):
        torch.library.register_fake("deployprune_test_ns::missing_op")(lambda x: x)
    # A missing torchvision operator is skipped and the function is handed back unchanged.
    def fake(x: torch.Tensor) -> torch.Tensor:
        return x

    assert torch.library.register_fake("torchvision::deployprune_missing_op")(fake) is fake
    assert torch.library.register_fake("torchvision::deployprune_missing_op", fake) is fake
