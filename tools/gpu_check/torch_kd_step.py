"""The distillation step of `laco-train bench` in PyTorch + PEFT, for the speed and memory ratio
on the same machine: the same models (teacher, pruned student), LoRA settings, loss and shapes.

Per step: the teacher's forward pass without a graph; the LoRA student's forward and backward;
loss = alpha x forward KL(teacher || student) at temperature T (times T^2) + (1 - alpha) x CE,
means over the predicting positions, computed in f32 over 8 chunks of rows (torchtune's
chunked-output KD loss); global-norm clip 1.0; AdamW on the adapters. transformers with sdpa
attention, weights in bf16 (PEFT keeps the adapters in f32, its default autocast_adapter_dtype).
Batches are `--batch` rows of `--seq` random token ids (every position predicts: the same work
as laco-train's bench on long plain-text rows). tokens/s counts batch x seq tokens per step over
the steps after `--warmup`; memory is torch's peak allocated and reserved.

Prints one JSON line."""
import argparse, json, math, time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def kd_loss(s_logits, t_logits, labels, temperature, alpha, chunks=8):
    """(loss, kd, ce): means over rows, f32 per chunk."""
    s_rows = s_logits.reshape(-1, s_logits.shape[-1])
    t_rows = t_logits.reshape(-1, t_logits.shape[-1])
    y = labels.reshape(-1)
    n = y.shape[0]
    kd = ce = 0.0
    for s, t, l in zip(s_rows.chunk(chunks), t_rows.chunk(chunks), y.chunk(chunks)):
        s32, t32 = s.float(), t.float()
        ls = F.log_softmax(s32 / temperature, dim=-1)
        lt = F.log_softmax(t32 / temperature, dim=-1)
        kd = kd + (lt.exp() * (lt - ls)).sum() * temperature**2
        ce = ce + F.cross_entropy(s32, l, reduction="sum")
    kd, ce = kd / n, ce / n
    return alpha * kd + (1 - alpha) * ce, kd, ce


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--alpha-lora", type=float, default=64.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    load = dict(dtype=dtype, attn_implementation="sdpa")
    started = time.time()
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, **load).to(dev).eval()
    student = AutoModelForCausalLM.from_pretrained(a.student, **load).to(dev)
    cfg = LoraConfig(r=a.r, lora_alpha=a.alpha_lora, lora_dropout=a.dropout,
                     target_modules=TARGETS, task_type="CAUSAL_LM")
    student = get_peft_model(student, cfg)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    load_s = time.time() - started
    vocab = teacher.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses = [], []
    for step in range(a.steps):
        ids = torch.randint(0, min(vocab, 151643), (a.batch, a.seq), generator=gen).to(dev)
        labels = ids[:, 1:]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.time()
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits[:, :-1]
        s_logits = student(input_ids=ids).logits[:, :-1]
        loss, kd, ce = kd_loss(s_logits, t_logits, labels, a.temperature, a.alpha)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del t_logits, s_logits
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.time() - t0)
        losses.append(loss.item())
    timed = times[a.warmup:]
    tokens = a.batch * a.seq
    out = {
        "framework": "pytorch+peft", "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "steps": a.steps, "warmup": a.warmup,
        "lora_r": a.r, "trainable_params": sum(p.numel() for p in params),
        "tokens_per_sec": tokens * len(timed) / sum(timed) if timed else math.nan,
        "step_s": sorted(timed)[len(timed) // 2] if timed else math.nan,
        "load_s": load_s, "losses": losses,
    }
    if dev.type == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(dev) / 1e9
    print(json.dumps(out))


if __name__ == "__main__":
    main()
