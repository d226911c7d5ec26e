"""A Qwen3 checkpoint with random weights, as save_pretrained writes it (config.json, bf16
safetensors shards + index, the Qwen3 tokenizer from the fixtures), for measuring laco-train and
PyTorch on the flagship's shapes without downloading 16 GB.

  --shape qwen3-8b: hidden 4096, 36 layers, 32 heads, 8 KV heads, head_dim 128, intermediate
                    12288, vocab 151936, rope_theta 1e6, untied (Qwen3-8B-Base's config.json)
  --shape small:    the same 36 layers and vocabulary at hidden 64 (for --dry-run on a CPU)
  --shape mid:      hidden 512, 8 layers (for measuring the training path's memory on a CPU)

Weights are drawn on --device (the GPU when there is one: 8 B normal draws take seconds there)
from N(0, 0.02), norms at 1, as transformers' _init_weights does. Writes the shards directly
with safetensors, one layer at a time, so the host never holds more than one shard."""
import argparse, json, os, shutil, sys

import torch
from safetensors.torch import save_file

SHAPES = {
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288),
    "small": dict(hidden_size=64, num_hidden_layers=36, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=192),
    "mid": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, intermediate_size=1536),
}


def config(shape):
    c = dict(SHAPES[shape])
    c.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
             attention_bias=False, attention_dropout=0.0, hidden_act="silu",
             max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
             rope_scaling=None, tie_word_embeddings=False, torch_dtype="bfloat16",
             use_cache=True, use_sliding_window=False, sliding_window=None,
             bos_token_id=151643, eos_token_id=151643, max_window_layers=36,
             layer_types=["full_attention"] * c["num_hidden_layers"])
    return c


def tensors(c):
    """(name, shape) in transformers' state-dict order."""
    h, d, i, v = c["hidden_size"], c["head_dim"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", (v, h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}"
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.self_attn.q_proj.weight", (q, h)
        yield f"{p}.self_attn.k_proj.weight", (kv, h)
        yield f"{p}.self_attn.v_proj.weight", (kv, h)
        yield f"{p}.self_attn.o_proj.weight", (h, q)
        yield f"{p}.self_attn.q_norm.weight", (d,)
        yield f"{p}.self_attn.k_norm.weight", (d,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        yield f"{p}.mlp.gate_proj.weight", (i, h)
        yield f"{p}.mlp.up_proj.weight", (i, h)
        yield f"{p}.mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    ap.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    c = config(a.shape)
    os.makedirs(a.out, exist_ok=True)
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    names = list(tensors(c))
    # Shards planned from the shapes first, so that each is written as soon as it is drawn.
    limit, plan, size = a.shard_gb * 1e9, [[]], 0
    for name, shape in names:
        nbytes = torch.Size(shape).numel() * 2
        if plan[-1] and size + nbytes > limit:
            plan.append([])
            size = 0
        plan[-1].append((name, shape))
        size += nbytes
    total = len(plan)
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for n, members in enumerate(plan, 1):
        shard = {}
        for name, shape in members:
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
                continue
            t = torch.empty(shape, dtype=torch.bfloat16, device=a.device)
            t.normal_(0.0, 0.02, generator=gen)
            shard[name] = t.cpu()
        file = "model.safetensors" if total == 1 else f"model-{n:05d}-of-{total:05d}.safetensors"
        save_file(shard, os.path.join(a.out, file), metadata={"format": "pt"})
        for name, t in shard.items():
            index["weight_map"][name] = file
            index["metadata"]["total_size"] += t.numel() * 2
    if total > 1:
        with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(a.tokenizer, name)
        if os.path.exists(src):
            shutil.copy(src, a.out)
    params = sum(torch.Size(s).numel() for _, s in names)
    json.dump({"out": a.out, "shape": a.shape, "parameters": params, "shards": total,
               "bytes": index["metadata"]["total_size"]}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
