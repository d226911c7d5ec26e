"""Collects the figures of tools/gpu-check.sh (one JSON file per step in --out) into one JSON:
the parity checks against the goldens with their tolerances, LaCo's time and memory, the
distillation step of laco-train and of PyTorch + PEFT with their ratios, and the machine."""
import argparse, json, os, subprocess


def load(out, name):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        return {"rc": None, "missing": True}
    with open(path) as f:
        return json.load(f)


def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return None


def samples(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--golden", required=True)
    ap.add_argument("--dry-run", type=int, default=0)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--device", required=True)
    a = ap.parse_args()
    golden_ppl = json.load(open(os.path.join(a.golden, "ppl.json")))
    golden_mmlu = json.load(open(os.path.join(a.golden, "mmlu.json")))["items"]
    checks, figures = {}, {}

    tolerance = {"f32": {"ppl": 1e-4, "mmlu": 1e-4}, "bf16": {"ppl": 1e-2, "mmlu": 0.1}}
    for dtype, tol in tolerance.items():
        r = load(a.out, f"ppl-{dtype}")
        ppl = (r.get("result") or {}).get("ppl")
        rel = None if ppl is None else abs(ppl - golden_ppl["ppl"]) / golden_ppl["ppl"]
        checks[f"ppl_{dtype}"] = {"ppl": ppl, "golden": golden_ppl["ppl"], "relative_diff": rel,
                                  "tolerance": tol["ppl"], "pass": rel is not None and rel <= tol["ppl"],
                                  "wall_s": r.get("wall_s")}
        got = samples(os.path.join(a.out, f"mmlu-{dtype}.samples.jsonl"))
        diffs = [abs(x - y) for s, g in zip(got, golden_mmlu) for x, y in zip(s["loglik"], g["loglik"])]
        worst = max(diffs) if len(got) == len(golden_mmlu) and diffs else None
        checks[f"mmlu_loglik_{dtype}"] = {"questions": len(got), "max_abs_diff": worst,
                                          "tolerance": tol["mmlu"],
                                          "pass": worst is not None and worst <= tol["mmlu"]}

    make = load(a.out, "make-model")
    figures["model"] = {**(make.get("result") or {}), "wall_s": make.get("wall_s")}

    prune = load(a.out, "prune")
    layers = None
    cfg = os.path.join(a.out, "work", "student", "config.json")
    if os.path.exists(cfg):
        layers = json.load(open(cfg))["num_hidden_layers"]
    figures["prune"] = {"rc": prune.get("rc"), "wall_s": prune.get("wall_s"),
                        "peak_rss_gb": prune.get("peak_rss_gb"),
                        "gpu_used_peak_gb": prune.get("gpu_used_peak_gb"),
                        "student_layers": layers, "report": prune.get("result")}
    checks["prune"] = {"pass": prune.get("rc") == 0 and layers == 26, "student_layers": layers}

    bench, torch = load(a.out, "bench"), load(a.out, "torch")
    b, t = bench.get("result") or {}, torch.get("result") or {}
    figures["laco_train"] = {"rc": bench.get("rc"), "wall_s": bench.get("wall_s"), **b,
                             "gpu_used_peak_gb_nvidia_smi": bench.get("gpu_used_peak_gb"),
                             "peak_rss_gb_measured": bench.get("peak_rss_gb")}
    figures["pytorch_peft"] = {"rc": torch.get("rc"), "wall_s": torch.get("wall_s"), **t,
                               "gpu_used_peak_gb_nvidia_smi": torch.get("gpu_used_peak_gb")}
    for name, key in [("bench-kept", "laco_train_layers_kept"), ("bench-generic", "laco_train_generic_ops")]:
        other = load(a.out, name)
        if not other.get("missing"):
            figures[key] = {"rc": other.get("rc"), "wall_s": other.get("wall_s"),
                            **(other.get("result") or {}),
                            "gpu_used_peak_gb_nvidia_smi": other.get("gpu_used_peak_gb")}
    # The flash attention kernels against burn's decomposed attention (--generic-ops), same
    # steps, same data: the same final loss within the dtype's precision (bf16 on the GPU).
    g = figures.get("laco_train_generic_ops", {})
    tol = 1e-4 if a.dry_run else 2e-2
    diff = None
    if g.get("final_loss") is not None and b.get("final_loss") is not None:
        diff = abs(g["final_loss"] - b["final_loss"]) / max(1.0, abs(g["final_loss"]))
    checks["flash_attention_vs_generic_ops"] = {"pass": g.get("rc") == 0 and diff is not None and diff <= tol,
                                                "final_loss": b.get("final_loss"),
                                                "final_loss_generic_ops": g.get("final_loss"),
                                                "relative_diff": diff, "tolerance": tol}
    mpi = load(a.out, "bench-mpi")
    if not mpi.get("missing"):
        m = mpi.get("result") or {}
        figures["laco_train_mpi_1_rank"] = {"rc": mpi.get("rc"), "wall_s": mpi.get("wall_s"), **m}
        # The same steps through the NCCL all-reduce of one rank: the same final loss.
        same = m.get("final_loss") is not None and b.get("final_loss") is not None and \
            abs(m["final_loss"] - b["final_loss"]) <= 1e-3 * max(1.0, abs(b["final_loss"]))
        checks["bench_mpi_nccl"] = {"pass": mpi.get("rc") == 0 and same,
                                    "final_loss": m.get("final_loss"),
                                    "final_loss_single_process": b.get("final_loss")}
    ratio = None
    if b.get("tokens_per_sec") and t.get("tokens_per_sec"):
        ratio = b["tokens_per_sec"] / t["tokens_per_sec"]
    mem_ratio = None
    if b.get("gpu_mem_peak_gb") and t.get("peak_allocated_gb"):
        mem_ratio = b["gpu_mem_peak_gb"] / t["peak_allocated_gb"]
    smi_ratio = None
    if bench.get("gpu_used_peak_gb") and torch.get("gpu_used_peak_gb"):
        smi_ratio = bench["gpu_used_peak_gb"] / torch["gpu_used_peak_gb"]
    figures["ratios"] = {"tokens_per_sec_laco_over_torch": ratio,
                         "peak_in_use_laco_over_torch_allocated": mem_ratio,
                         "device_peak_laco_over_torch_nvidia_smi": smi_ratio}
    checks["bench"] = {"pass": bench.get("rc") == 0 and bool(b.get("tokens_per_sec"))}
    checks["torch"] = {"pass": torch.get("rc") == 0 and bool(t.get("tokens_per_sec"))}
    targets = {"speed_at_least_1x_torch": None if ratio is None else ratio >= 1.0,
               "speed_stretch_1_5x": None if ratio is None else ratio >= 1.5,
               "peak_memory_not_above_torch": None if smi_ratio is None else smi_ratio <= 1.0}

    machine = {
        "dry_run": bool(a.dry_run), "device": a.device,
        "gpu": run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]),
        "laco_train": run([a.binary, "--version"]), "cpu": run(["uname", "-m"]),
        "cuda_path": os.environ.get("CUDA_PATH"),
    }
    passed = all(c["pass"] for c in checks.values())
    print(json.dumps({"passed": passed, "checks": checks, "targets": targets, "figures": figures,
                      "machine": machine}, indent=1))


if __name__ == "__main__":
    main()
