"""Runs one command and prints one JSON line about it: exit code, wall seconds, peak resident
memory of the command's processes (getrusage of the children), the peak GPU memory in use on the
machine while it ran (nvidia-smi polled every 0.2 s; null without nvidia-smi), and the command's
own last stdout line when it is JSON (`--json` output). The command's stdout and stderr go to
--log.

  measure.py --log FILE -- CMD ARGS..."""
import argparse, json, resource, shutil, subprocess, sys, threading, time


def gpu_used_mb():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return sum(float(x) for x in out.split())
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    polling = shutil.which("nvidia-smi") is not None
    peak = {"gpu_mb": gpu_used_mb() if polling else None}
    base = peak["gpu_mb"]
    done = threading.Event()

    def poll():
        while not done.wait(0.2):
            used = gpu_used_mb()
            if used is not None:
                peak["gpu_mb"] = max(peak["gpu_mb"] or 0.0, used)

    if polling:
        threading.Thread(target=poll, daemon=True).start()
    started = time.time()
    with open(a.log, "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    wall = time.time() - started
    done.set()
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    result = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except ValueError:
            result = None
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({
        "cmd": cmd, "rc": proc.returncode, "wall_s": round(wall, 3),
        "peak_rss_gb": rss_kb / 1e6,
        "gpu_used_peak_gb": None if peak["gpu_mb"] is None else peak["gpu_mb"] / 1e3,
        "gpu_used_before_gb": None if base is None else base / 1e3,
        "result": result, "log": a.log,
    }))
    sys.exit(0)


if __name__ == "__main__":
    main()
