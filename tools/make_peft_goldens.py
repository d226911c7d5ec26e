#!/usr/bin/env python3
"""Builds the PEFT goldens of tests/it/lora.rs: small LoRA adapters on the bundled tiny Qwen3
that use the LoraConfig fields beyond r and lora_alpha (rank_pattern, alpha_pattern, use_rslora,
a regular-expression target_modules, layers_to_transform, exclude_modules, "all-linear"), saved
by PEFT itself, and the logits PEFT computes with each.

Writes tests/fixtures/peft-patterns/<name>/ (adapter_config.json, adapter_model.safetensors) and
tests/fixtures/golden/peft_patterns.safetensors (input_ids [1, 24] I64 and logits_<name>
[1, 24, vocab] F32). tests/fixtures/peft-patterns/written/ is an adapter laco-train wrote
(`laco-train distill --student tests/fixtures/tiny-qwen3 --max-steps 2`, RUN_DIR/adapter
copied there): PEFT's logits with it are stored as logits_written, so that the tests check that
PEFT reads what laco-train writes as the model laco-train computes.

Needs torch, transformers, peft and safetensors (CPU wheels are enough), e.g.
  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers peft safetensors
  /tmp/venv/bin/python tools/make_peft_goldens.py
Made with peft 0.21.2, transformers 5.24.0, torch 2.15.0.
"""

import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests/fixtures/tiny-qwen3")
OUT = os.path.join(ROOT, "tests/fixtures/peft-patterns")
GOLDEN = os.path.join(ROOT, "tests/fixtures/golden/peft_patterns.safetensors")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTERS = {
    # Ranks and alphas per module by pattern: a short name, a name with its layer, a regex.
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=ALL,
        rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2, r"layers\.[67]\.self_attn\.k_proj": 6},
        alpha_pattern={"v_proj": 32, "layers.0.mlp.up_proj": 3},
    ),
    # rsLoRA (alpha / sqrt(r)) with a regular expression for target_modules and a rank pattern.
    "rslora": dict(
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules=r"model\.layers\.[0-4]\.(self_attn\.(q|o)_proj|mlp\.up_proj)",
        rank_pattern={"up_proj": 16},
    ),
    # Some layers only, one module excluded, "all-linear".
    "layers": dict(
        r=2,
        lora_alpha=5,
        target_modules="all-linear",
        exclude_modules=["model.layers.2.self_attn.o_proj", "gate_proj"],
    ),
    "layers_subset": dict(
        r=3,
        lora_alpha=6,
        target_modules=["k_proj", "o_proj", "down_proj"],
        layers_to_transform=[0, 2, 5],
        layers_pattern="layers",
    ),
}


def input_ids():
    g = load_file(os.path.join(ROOT, "tests/fixtures/golden/lora.safetensors"))
    return g["input_ids"][:1].clone()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float().contiguous()


def main():
    torch.manual_seed(0)
    ids = input_ids()
    goldens = {"input_ids": ids}
    for name, fields in ADAPTERS.items():
        base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        # init_lora_weights=False: B random too, so that every adapter changes the logits.
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **fields))
        out = os.path.join(OUT, name)
        model.save_pretrained(out)
        # PEFT's model card template: nothing the tests read.
        os.remove(os.path.join(out, "README.md"))
        # Read back as a user would, from the files.
        base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, out)
        goldens[f"logits_{name}"] = logits(loaded, ids)
        adapted = sum(1 for n, _ in loaded.named_modules() if n.endswith("lora_A.default"))
        print(f"{name}: {adapted} modules adapted")
    written = os.path.join(OUT, "written")
    if os.path.isdir(written):
        base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        goldens["logits_written"] = logits(PeftModel.from_pretrained(base, written), ids)
    save_file(goldens, GOLDEN)


if __name__ == "__main__":
    main()
