#!/usr/bin/env python
"""Benchmark the DisCo distillation step against a faithful re-implementation of the official step.

    python tools/bench_distill.py [--pairs resnet50:resnet18 resnet50:efficientnet_b0] [--image-size 112]
                                  [--batch 32] [--queue 65536] [--steps 6] [--device cpu|cuda] [--amp auto|on|off]
    python tools/bench_distill.py --quick    # about a minute on 2 CPU cores: R-50 -> R-18 only, smaller step

Each (variant, teacher, student) runs in its own subprocess, so peak memory (CPU: peak RSS; GPU: peak allocated)
is measured cleanly; all variants run in this one invocation on the same machine and the ratios are printed.

reference  the official DisCo-pytorch step: fp32, teacher BN in train mode, one teacher forward per view, an unused
           second teacher copy held in memory, sum-reduced MSE.
ours       pretrain.engine.train_step on pretrain.model.Method (mocov2 + disco): the teacher first (eval mode, one
           forward over both views, no second copy, bf16 autocast), then one student view at a time; channels_last. The
           student runs both in bf16 autocast and in fp32 ("ours-bf16" / "ours-fp32": on CPUs, depthwise-conv students
           such as EfficientNet are faster in fp32); the faster is compared. ``--no-amp`` / ``--no-channels-last``.

bf16 (``--amp auto``, the default) is used on GPUs that support it and on CPUs with native bf16 instructions
(oneDNN's check: AVX512-BF16 / AMX); on other CPUs (e.g. AVX2 only) bf16 is emulated and slower than fp32, so both
variants run in fp32 there and only the step's structure differs. ``--quick`` measures the same comparison at a size
that finishes in about a minute on a 2-core CPU (its numbers are a smoke test of the ratios, not the benchmark);
flags given with it override its sizes.
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def reference_step_fn(teacher_arch, student_arch, queue_size, device):
    """The official training step, re-implemented (no code copied): returns step(view1, view2)."""
    from pretrain.encoder import build_encoder

    enc_q = build_encoder(student_arch, 2048, 128).to(device)
    enc_k = copy.deepcopy(enc_q).requires_grad_(False)
    teacher = build_encoder(teacher_arch, 2048, 128).to(device).requires_grad_(False)
    teacher_unused = copy.deepcopy(teacher)  # the official builder's second teacher encoder, never used
    for m in (enc_q, enc_k, teacher, teacher_unused):
        m.train()  # model.train() on the whole wrapper: teacher BN in train mode
    queue = F.normalize(torch.randn(128, queue_size, device=device), dim=0)
    ptr = [0]
    opt = torch.optim.SGD(enc_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    mse = torch.nn.MSELoss(reduction="sum")

    def step(im_q, im_k):
        q = enc_q(im_q)
        qk = enc_q(im_k)
        with torch.no_grad():
            for p_q, p_k in zip(enc_q.parameters(), enc_k.parameters()):
                p_k.mul_(0.999).add_(p_q.detach(), alpha=0.001)
            k = enc_k(im_k)
            tq = teacher(im_q)
            tqk = teacher(im_k)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], 1) / 0.2
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
        loss = F.cross_entropy(logits, labels) + mse(q, tq) + mse(qk, tqk)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            b = k.shape[0]
            queue[:, ptr[0]:ptr[0] + b] = k.t()
            ptr[0] = (ptr[0] + b) % queue_size
        return loss

    step.keep = teacher_unused
    return step


def ours_step_fn(teacher_arch, student_arch, queue_size, device, amp, student_amp, channels_last):
    from pretrain.distillers.disco import DisCo
    from pretrain.encoder import build_encoder
    from pretrain.engine import train_step
    from pretrain.model import Method
    from pretrain.testbeds.mocov2 import MoCoV2

    student = build_encoder(student_arch, 2048, 128)
    model = Method(student, MoCoV2(student, queue_size, 0.999), {"disco": DisCo(32.0)},
                   build_encoder(teacher_arch, 2048, 128), teacher_amp_dtype=torch.bfloat16 if amp else None).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)

    def step(im_q, im_k):
        if channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        return train_step(model, [im_q, im_k], opt, None, amp_dtype=torch.bfloat16 if amp and student_amp else None
                          )["loss"]

    return step


def measure(args) -> dict:
    """Runs in the subprocess: build, warm up, time ``--steps`` steps, report images/s and peak memory."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    teacher, student = args.pair.split(":")
    import pretrain.model  # noqa: F401  (the libraries both variants load, before any model exists)
    base_gib = _rss_gib()
    if args.variant == "reference":
        step = reference_step_fn(teacher, student, args.queue, device)
    else:
        step = ours_step_fn(teacher, student, args.queue, device, args.amp, args.variant == "ours-bf16",
                            args.channels_last)
    views = [torch.randn(args.batch, 3, args.image_size, args.image_size, device=device) for _ in range(2)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step(*views)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step(*views)
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return {"variant": args.variant, "pair": args.pair, "s_per_step": dt, "images_per_s": args.batch / dt,
            "peak_gib": peak, "base_gib": base_gib if device.type == "cpu" else 0.0, "loss": float(loss),
            "threads": torch.get_num_threads()}


def _rss_gib() -> float:
    """Current resident set size (Linux), GiB; 0 where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kib / 2 ** 20
    except (OSError, StopIteration):
        return 0.0


def matmul_peak(device, dtype, quick: bool = False) -> float:
    """Measured matmul throughput (TFLOP/s) of this device at ``dtype`` with 4096^2 (GPU) / 2048^2 (CPU) operands
    (``quick``: half the side on the CPU)."""
    n = 4096 if device.type == "cuda" else 1024 if quick else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps = 50 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def step_flops(pair: str, batch: int, size: int) -> float:
    """FLOPs of one step of ours, from fvcore's counts: student fwd+bwd (x3) on 2 views, key fwd, teacher fwd x2."""
    from fvcore.nn import FlopCountAnalysis

    from pretrain.encoder import build_encoder

    teacher, student = pair.split(":")
    x = torch.randn(1, 3, size, size)
    f = {}
    for name, arch in (("t", teacher), ("s", student)):
        enc = build_encoder(arch, 2048, 128).eval()
        fca = FlopCountAnalysis(enc, x)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        f[name] = 2 * fca.total()  # fvcore counts one fused multiply-add as one flop
    return batch * (2 * 3 * f["s"] + f["s"] + 2 * f["t"])


# The full benchmark (make bench) and --quick (about a minute on a 2-core CPU); flags given explicitly win.
FULL = {"pairs": ["resnet50:resnet18", "resnet50:efficientnet_b0"], "image_size": 112, "batch": 32, "queue": 65536,
        "steps": 6, "warmup": 2}
QUICK = {"pairs": ["resnet50:resnet18"], "image_size": 64, "batch": 16, "queue": 4096, "steps": 3, "warmup": 1}


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively (not emulated) on ``device``: CUDA's check, or oneDNN's on the CPU (AVX512-BF16 /
    AMX; an AVX2-only CPU emulates bf16, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"about a minute on a 2-core CPU: {' '.join(QUICK['pairs'])}, batch {QUICK['batch']}, "
                        f"{QUICK['image_size']} px, queue {QUICK['queue']}, {QUICK['steps']} steps after "
                        f"{QUICK['warmup']} warm-up")
    p.add_argument("--pairs", nargs="+", default=None,
                   help=f"teacher:student pairs (default {' '.join(FULL['pairs'])})")
    p.add_argument("--image-size", type=int, default=None, help=f"default {FULL['image_size']}")
    p.add_argument("--batch", type=int, default=None,
                   help=f"per-process batch (the paper's per-GPU batch; default {FULL['batch']})")
    p.add_argument("--queue", type=int, default=None, help=f"default {FULL['queue']}")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps (default {FULL['steps']})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default {FULL['warmup']})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="bf16 for ours: auto = where the device runs bf16 natively")
    p.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="same as --amp off")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--json", default="", help="also write the results to this file")
    # internal: one measurement in a subprocess
    p.add_argument("--variant", choices=["reference", "ours-bf16", "ours-fp32"], help=argparse.SUPPRESS)
    p.add_argument("--pair", help=argparse.SUPPRESS)
    args = p.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    native = native_bf16(device)
    if args.variant:
        args.amp = args.amp == "on"
        print(json.dumps(measure(args)))
        return
    amp_reason = {"on": "--amp on", "off": "--amp off"}.get(args.amp, "native bf16" if native else
                                                          "no native bf16 on this device: it would be emulated")
    args.amp = args.amp == "on" or (args.amp == "auto" and native)
    where = cpu_name() + f", CPU capability {torch.backends.cpu.get_cpu_capability()}" if device.type == "cpu" \
        else torch.cuda.get_device_name(device)
    print(f"{'quick' if args.quick else 'full'} benchmark on {where}; bf16 {'on' if args.amp else 'off'} "
          f"({amp_reason})", flush=True)
    t_start = time.perf_counter()

    results = []
    for pair in args.pairs:
        for variant in ("reference", "ours-bf16", "ours-fp32") if args.amp else ("reference", "ours-fp32"):
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--pair", pair,
                   "--image-size", str(args.image_size), "--batch", str(args.batch), "--queue", str(args.queue),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
                   "--amp", "on" if args.amp else "off"]
            cmd += [] if args.channels_last else ["--no-channels-last"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{variant} {pair} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  {pair:28s} {variant:10s} {r['images_per_s']:8.1f} img/s  peak {r['peak_gib']:.2f} GiB",
                  flush=True)

    print(f"\n{device.type}, {torch.get_num_threads()} threads, batch {args.batch}, {args.image_size} px, "
          f"queue {args.queue}; ours: AMP {'bf16' if args.amp else 'off'}, channels_last {args.channels_last}")
    print(f"{'teacher:student':28s} {'ours':>9s} {'ref img/s':>10s} {'ours img/s':>11s} {'speed x':>8s} "
          f"{'ref GiB':>8s} {'ours GiB':>9s} {'memory x':>9s}")
    summary = []
    peak_tflops = matmul_peak(device, torch.bfloat16 if args.amp else torch.float32, args.quick)
    for pair in args.pairs:
        ref = next(r for r in results if r["pair"] == pair and r["variant"] == "reference")
        ours = max((r for r in results if r["pair"] == pair and r["variant"].startswith("ours")),
                   key=lambda r: r["images_per_s"])
        row = {"pair": pair, "reference": ref, "ours": ours, "speedup": ours["images_per_s"] / ref["images_per_s"],
               "memory_ratio": ours["peak_gib"] / ref["peak_gib"]}
        if ref["base_gib"] and ours["base_gib"]:  # what the step itself holds, above the imported libraries
            row["memory_ratio_above_imports"] = ((ours["peak_gib"] - ours["base_gib"]) /
                                                 (ref["peak_gib"] - ref["base_gib"]))
        row["ours_tflops"] = step_flops(pair, args.batch, args.image_size) / ours["s_per_step"] / 1e12
        row["fraction_of_matmul_peak"] = row["ours_tflops"] / peak_tflops
        summary.append(row)
        print(f"{pair:28s} {ours['variant']:>9s} {ref['images_per_s']:10.1f} {ours['images_per_s']:11.1f} {row['speedup']:8.2f} "
              f"{ref['peak_gib']:8.2f} {ours['peak_gib']:9.2f} {row['memory_ratio']:9.2f}")
    print(f"\nmeasured {'bf16' if args.amp else 'fp32'} matmul peak: {peak_tflops:.2f} TFLOP/s; ours reaches "
          + ", ".join(f"{r['pair']} {r['ours_tflops']:.3f} TFLOP/s ({100 * r['fraction_of_matmul_peak']:.0f}%)"
                      for r in summary))
    for r in summary:
        if "memory_ratio_above_imports" in r:
            print(f"{r['pair']}: {r['reference']['base_gib']:.2f} GiB of both peaks is the imported libraries (torch, "
                  f"timm); above that, ours holds {r['memory_ratio_above_imports']:.2f}x the reference's memory")
    print("targets: speed x >= 1.5, memory x <= 0.7")
    print(f"{'quick' if args.quick else 'full'} benchmark: {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "matmul_peak_tflops": peak_tflops, "results": summary}, f, indent=1)


if __name__ == "__main__":
    main()
