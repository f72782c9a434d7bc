"""`llmaas info`: the model's id, architecture, parameter counts, weight formats and memory, KV bytes per token.

The id is the one the service's API uses (`GET /v1/models`), so what `info` prints is what clients send; the GGUF's
own `general.name` is shown beside it.
"""

from __future__ import annotations

import argparse
import json

from llmaas.cli.common import add_model_options, load_from_args
from llmaas.kernels import cpu_features
from llmaas.kv.spec import BITS_PER_VALUE, KVSpec
from llmaas.model.loader import LoadedModel
from llmaas.service.server import model_id


def describe(loaded: LoadedModel) -> dict:
    c = loaded.config
    per_layer = (c.q_dim + 2 * c.kv_dim) * c.d_model + c.q_dim * c.d_model + 3 * c.ffn_dim * c.d_model + 2 * c.d_model
    embedding = c.vocab_size * c.d_model
    head = 0 if c.tied_embeddings else embedding
    spec = KVSpec.from_config(c)
    w = loaded.model.weights
    return {
        "model": {"id": model_id(loaded), "name": c.name, "path": str(loaded.path), "architecture": "llama"},
        "config": {k: getattr(c, k) for k in c.__dataclass_fields__},
        "params": {"per_layer": per_layer, "layers": per_layer * c.n_layers, "embedding": embedding,
                   "lm_head_untied": head, "final_norm": c.d_model,
                   "total": per_layer * c.n_layers + embedding + head + c.d_model},
        "weights": {"gguf_tensor_types": loaded.tensor_types, "resident_bytes": w.nbytes,
                    "native_kernels": loaded.model.kernels is not None},
        "paths": {"prefill_gemm": loaded.gemm,
                  "decode": ("one native call a token over the block kernels (AVX2)" if loaded.model.native_decode
                             else "block kernels (AVX2)" if loaded.model.kernels is not None
                             else "dense fp32 (PyTorch)"),
                  "kv_decode": loaded.model.kernels.kv_decode_isa() if loaded.model.kernels is not None
                  else "PyTorch",
                  "cpu_features": cpu_features()},
        "kv_bytes_per_token": {p: spec.bytes_per_token(p) for p in BITS_PER_VALUE},
        "kv_bytes_full_context_fp16": spec.bytes_per_token("fp16") * c.context_length,
        "special_tokens": {"bos": loaded.tokenizer.special.bos_id, "eos": loaded.tokenizer.special.eos_id,
                           "add_bos": loaded.tokenizer.special.add_bos,
                           "stop_ids": sorted(loaded.tokenizer.special.stop_ids)},
        "chat_template": loaded.chat_template is not None,
        "load_s": round(loaded.load_s, 3),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmaas info", description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_model_options(p)
    args = p.parse_args(argv)
    info = describe(load_from_args(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    m = info["model"]
    print(f"{m['id']}  (the API's model id; GGUF name: {m['name']})\n  file: {m['path']}")
    print(f"  llama: {c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} query / {c['n_kv_heads']} KV "
          f"heads x {c['head_dim']}, FFN {c['ffn_dim']}, vocab {c['vocab_size']}, context {c['context_length']}, "
          f"RoPE theta {c['rope_theta']:g}, norm eps {c['norm_eps']:g}, tied embeddings {c['tied_embeddings']}")
    params = info["params"]
    print(f"  parameters: {params['total'] / 1e6:.1f} M ({params['layers'] / 1e6:.1f} M in layers, "
          f"{params['embedding'] / 1e6:.1f} M embedding)")
    w = info["weights"]
    print(f"  GGUF tensor types: {w['gguf_tensor_types']}; resident weights {w['resident_bytes'] / 2**20:.0f} MiB "
          f"(one copy: 4/8-bit blocks where the type allows, else fp32); native kernels: "
          f"{'yes' if w['native_kernels'] else 'no'}")
    paths = info["paths"]
    have = ", ".join(f for f, on in paths["cpu_features"].items() if on) or "none of the named ones"
    print(f"  paths: prefill GEMM {paths['prefill_gemm']} (--gemm), decode {paths['decode']}, KV chunk decode "
          f"{paths['kv_decode']}; CPU has {have}")
    kv = ", ".join(f"{p} {b:,} B" for p, b in info["kv_bytes_per_token"].items())
    print(f"  KV bytes per token (payload): {kv}")
    print(f"  KV for a full {c['context_length']}-token context at fp16: "
          f"{info['kv_bytes_full_context_fp16'] / 2**20:.0f} MiB")
    s = info["special_tokens"]
    print(f"  special tokens: bos {s['bos']}, eos {s['eos']}, add_bos {s['add_bos']}, stop ids {s['stop_ids']}; "
          f"chat template: {'yes' if info['chat_template'] else 'no'}; loaded in {info['load_s']} s")
    return 0
