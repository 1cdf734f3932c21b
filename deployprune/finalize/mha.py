"""Head removal for ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` ties its projection width to ``embed_dim``, so it cannot hold fewer
heads. With heads removed, finalize replaces it with a GraphModule traced from the small
reference implementation below. The GraphModule's class is named ``MultiheadAttention``, it
keeps ``in_proj_weight``/``in_proj_bias``/``out_proj`` and takes the same call signature and
returns ``(output, None)``. The generated code uses torch functions only, so the compacted
model loads without deployprune.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


class _HeadPrunedAttention(nn.Module):
    """Eval-equivalent of nn.MultiheadAttention (no masks, no bias_k/v) with ``heads`` heads."""

    def __init__(self, embed_dim: int, heads: int, head_dim: int, batch_first: bool, dropout: float,
                 in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None, out_proj: nn.Linear):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = heads
        self.head_dim = head_dim
        self.batch_first = batch_first
        self.dropout = dropout
        self.scale = 1.0 / math.sqrt(head_dim)
        self.in_proj_weight = nn.Parameter(in_proj_weight.detach().clone())
        self.in_proj_bias = None if in_proj_bias is None else nn.Parameter(in_proj_bias.detach().clone())
        self.out_proj = out_proj

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt_len, bsz, _ = query.shape
        src_len = key.shape[0]
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        else:
            b_q = b_k = b_v = None
        q = F.linear(query, w_q, b_q).reshape(tgt_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        k = F.linear(key, w_k, b_k).reshape(src_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        v = F.linear(value, w_v, b_v).reshape(src_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        attn = torch.softmax(torch.bmm(q * self.scale, k.transpose(1, 2)), dim=-1)
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        out = torch.bmm(attn, v).transpose(0, 1).reshape(tgt_len, bsz, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def pruned_mha(module: nn.MultiheadAttention, keep_heads: torch.Tensor) -> fx.GraphModule:
    """A GraphModule equal to ``module`` restricted to the heads in ``keep_heads`` (bool, num_heads)."""
    E, h = module.embed_dim, module.num_heads
    hd = E // h
    rows = torch.arange(3 * E).reshape(3, h, hd)[:, keep_heads].reshape(-1)
    cols = torch.arange(E).reshape(h, hd)[keep_heads].reshape(-1)
    w = module.in_proj_weight.detach().index_select(0, rows)
    b = module.in_proj_bias.detach().index_select(0, rows) if module.in_proj_bias is not None else None
    op = module.out_proj
    out_proj = nn.Linear(len(cols), E, bias=op.bias is not None, device=op.weight.device, dtype=op.weight.dtype)
    with torch.no_grad():
        out_proj.weight.copy_(op.weight.detach().index_select(1, cols))
        if op.bias is not None:
            out_proj.bias.copy_(op.bias.detach())
    ref = _HeadPrunedAttention(E, int(keep_heads.sum()), hd, module.batch_first, module.dropout, w, b, out_proj)
    ref.train(module.training)
    # the optional arguments are accepted and ignored: the rule only applies when they are unset
    gm = fx.GraphModule(ref, fx.Tracer().trace(ref), class_name="MultiheadAttention")
    for k in ("embed_dim", "num_heads", "head_dim", "batch_first", "dropout"):
        setattr(gm, k, getattr(ref, k))
    gm.train(module.training)
    return gm
