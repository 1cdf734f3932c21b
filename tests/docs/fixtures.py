"""Files a documented command assumes the reader has, for ``<!-- tested setup="..." -->``.

A page may say "your own save_pretrained directory" where a test needs a real one. Each
fixture here writes such a file into the working directory, small and from random weights
(nothing downloaded). Run as ``python -m tests.docs.fixtures NAME [ARGS ...]`` from a shell
block's setup, or call the functions from a Python block's setup.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def hf_bert(directory: str = "my-bert", masks_path: str = "masks.pt") -> None:
    """A 2-layer BERT written with ``save_pretrained`` and masks removing half of each MLP."""
    from deployprune._compat import tolerate_missing_torchvision_ops

    tolerate_missing_torchvision_ops()
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(directory)
    keep = torch.ones(128)
    keep[::2] = 0
    masks = {f"encoder.layer.{i}.intermediate.dense": {"weight": keep[:, None].expand(128, 64).clone(),
                                                       "bias": keep.clone()} for i in range(2)}
    torch.save(masks, masks_path)


def tiny_llama() -> tuple[torch.nn.Module, torch.Tensor]:
    """A 2-layer Llama (grouped-query attention) from a config, random weights, and a prompt."""
    from deployprune._compat import tolerate_missing_torchvision_ops

    tolerate_missing_torchvision_ops()
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 100, (1, 6))


FIXTURES = {"hf-bert": hf_bert}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in FIXTURES:
        print(f"usage: python -m tests.docs.fixtures {{{','.join(FIXTURES)}}} [ARGS ...]", file=sys.stderr)
        return 2
    FIXTURES[argv[0]](*argv[1:])
    for arg in argv[1:]:
        assert Path(arg).exists(), arg
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
