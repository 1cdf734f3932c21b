"""Finalize time and peak memory on library-sized transformers (issue 11), beside a dense forward.

Models are built from configs with random init (nothing downloaded):

* ``bert-base``: BertModel with BERT-base dimensions (110M parameters), seq 128;
* ``tinyllama``: LlamaForCausalLM with TinyLlama-1.1B dimensions (hidden 2048, MLP 5632, 22 layers,
  32 query heads, 4 key/value heads, vocab 32000), seq 128.

Masks: half of every layer's MLP units (the whole coupled group) and one attention-head group per
layer (BERT: one head; Llama: one key/value head with its 8 query heads). Each model runs in its own
process so its peak RSS is its own. ``python -m benchmarks.finalize_llm [--models bert-base tinyllama]``
prints a table and writes ``benchmarks/finalize_llm.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(name: str):
    import torch

    from deployprune._compat import tolerate_missing_torchvision_ops

    tolerate_missing_torchvision_ops()  # transformers imports torchvision when it is installed
    import transformers as T
    torch.manual_seed(0)
    if name == "bert-base":
        cfg = T.BertConfig()  # the defaults are BERT-base
        model = T.BertModel(cfg).eval()
        inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (1, 128)),
                  "attention_mask": torch.ones(1, 128, dtype=torch.long)}
        masks = {}
        hd = cfg.hidden_size // cfg.num_attention_heads
        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}"
            unit = torch.ones(cfg.intermediate_size)
            unit[1::2] = 0
            masks[f"{p}.intermediate.dense"] = {"weight": unit[:, None].expand(-1, cfg.hidden_size).clone(),
                                                "bias": unit.clone()}
            masks[f"{p}.output.dense"] = {"weight": unit[None, :].expand(cfg.hidden_size, -1).clone()}
            head = torch.ones(cfg.hidden_size)
            head[:hd] = 0
            for q in ("query", "key", "value"):
                masks[f"{p}.attention.self.{q}"] = {"weight": head[:, None].expand(-1, cfg.hidden_size).clone(),
                                                    "bias": head.clone()}
            masks[f"{p}.attention.output.dense"] = {"weight": head[None, :].expand(cfg.hidden_size, -1).clone()}
        return model, inputs, masks
    if name == "tinyllama":
        cfg = T.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
        model = T.LlamaForCausalLM(cfg).eval()
        inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (1, 128))}
        masks = {}
        hd = cfg.hidden_size // cfg.num_attention_heads
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            unit = torch.ones(cfg.intermediate_size)
            unit[1::2] = 0
            for proj in ("gate_proj", "up_proj"):
                masks[f"{p}.mlp.{proj}"] = {"weight": unit[:, None].expand(-1, cfg.hidden_size).clone()}
            masks[f"{p}.mlp.down_proj"] = {"weight": unit[None, :].expand(cfg.hidden_size, -1).clone()}
            q = torch.ones(cfg.hidden_size)
            q[: rep * hd] = 0  # query heads 0..7 read key/value head 0
            kv = torch.ones(cfg.num_key_value_heads * hd)
            kv[:hd] = 0
            masks[f"{p}.self_attn.q_proj"] = {"weight": q[:, None].expand(-1, cfg.hidden_size).clone()}
            for proj in ("k_proj", "v_proj"):
                masks[f"{p}.self_attn.{proj}"] = {"weight": kv[:, None].expand(-1, cfg.hidden_size).clone()}
            masks[f"{p}.self_attn.o_proj"] = {"weight": q[None, :].expand(cfg.hidden_size, -1).clone()}
        return model, inputs, masks
    raise SystemExit(f"unknown model {name!r}; choose bert-base or tinyllama")


def _one(name: str) -> dict:
    import torch

    import deployprune as dp

    torch.set_num_threads(2)
    model, inputs, masks = _build(name)
    params = sum(p.numel() for p in model.parameters())
    rss_model = _rss_mib()
    with torch.no_grad():
        model(**inputs)  # warm-up
        t = time.perf_counter()
        for _ in range(3):
            model(**inputs)
        forward = (time.perf_counter() - t) / 3
    t = time.perf_counter()
    res = dp.compact(model, inputs, masks, inplace=True)
    seconds = time.perf_counter() - t
    return {"model": name, "params_dense": params, "params_compacted": res.params_after,
            "compacted": res.compacted, "dense_forward_s": round(forward, 3), "finalize_s": round(seconds, 2),
            "finalize_over_forward": round(seconds / forward, 1), "rss_after_build_mib": round(rss_model),
            "peak_rss_mib": round(_rss_mib()), "stages_s": {k: round(v, 2) for k, v in res.timings.items()},
            "max_abs_error": res.max_abs_error}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["bert-base", "tinyllama"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one)))
        return 0
    rows = []
    for name in args.models:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.finalize_llm", "--one", name],
                              capture_output=True, text=True, cwd=HERE.parent)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'model':<10} {'params':>15} {'compacted':>15} {'forward s':>10} {'finalize s':>11} {'ratio':>6} "
          f"{'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['model']:<10} {r['params_dense']:>15,} {r['params_compacted']:>15,} {r['dense_forward_s']:>10} "
              f"{r['finalize_s']:>11} {r['finalize_over_forward']:>6} {r['peak_rss_mib']:>13,}")
    (HERE / "finalize_llm.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
