#!/usr/bin/env python
"""Benchmark the DisCo distillation step against a faithful re-implementation of the official step.

    python tools/bench_distill.py [--pairs resnet50:resnet18 resnet50:efficientnet_b0] [--image-size 112]
                                  [--batch 32] [--queue 65536] [--steps 6] [--device cpu|cuda] [--variants ...]
    python tools/bench_distill.py --quick    # about a minute on 2 CPU cores: R-50 -> R-18 only, smaller step

Each (variant, teacher, student) runs in its own subprocess, so peak memory (CPU: peak RSS of the process, the
imported libraries included; GPU: peak allocated) is measured cleanly; all variants run in this one invocation on
the same machine and every ratio is to the reference measured in that run. On the CPU the table also shows the peak
of the tensors alive at once ("tensors": what a GPU's peak allocated counts, from torch.profiler's allocation events
during one more, untimed step), and the breakdown of each peak separates the libraries, the model and its state,
the step's transient tensors and what the allocator keeps.

reference      the official DisCo-pytorch step: fp32, teacher BN in train mode, one teacher forward per view, an
               unused second teacher copy held in memory, sum-reduced MSE.
ours-*         pretrain.engine.train_step on pretrain.model.Method (mocov2 + disco): the teacher first (eval mode,
               one forward over both views, no second copy), then one student view at a time. ``fp32``: no
               autocast; ``bf16``: bf16 autocast for student and teacher (the teacher's weights stored in bf16);
               ``-cl``: the channels_last layout; ``-bntrain``: the teacher's BN in train mode (one forward per
               view), as the official code and the configs that name a paper row (MODEL.TEACHER.BN_TRAIN True).
auto           what the config default (TRAIN.AMP.ENABLED / TEACHER and MODEL.CHANNELS_LAST ``auto``) picks on this
               device, by pretrain.precision.resolve_auto: one of the ours-* variants, whose measurement it shows.
auto + compile ``--compile`` only: the auto variant with TRAIN.COMPILE (pretrain.model.Method.compile_encoders:
               torch.compile of the student, the teacher and the key encoder, in place). Its warm-up steps (at least
               one) compile and are not timed; the first one's duration is printed as the compile time.

MFU: the step's FLOPs (fvcore's counts) per second against the matmul peak measured here for the dtype the variant
computes in (fp32, or bf16). A peak that rounds to 0.00 TFLOP/s or a dtype the device only emulates (bf16 on a CPU
without AVX512-BF16 / AMX) is reported as unusable and no MFU is computed against it. Where bf16 is emulated, the
bf16 variants are timed over a single step without warm-up (they are 10-20 times slower than fp32 there, which is
all their figure shows; ``--skip-emulated`` leaves them out). ``--quick`` measures the same comparison at a size
that finishes in about a minute on a 2-core CPU (a smoke test of the ratios, not the benchmark); flags given with it
override its sizes.
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, Optional

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)
if os.path.dirname(_TOOLS) not in [os.path.realpath(p) for p in sys.path if p]:
    sys.path.insert(0, os.path.dirname(_TOOLS))  # imported as a module (tests) from elsewhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pretrain.precision import device_name, native_bf16, resolve_auto  # noqa: E402

GIB = 2 ** 30

# name -> (student bf16, teacher bf16, channels_last, label); "reference" is the official step
VARIANTS = {
    "reference": (False, False, False, "reference (official step, fp32)"),
    "ours-fp32": (False, False, False, "ours fp32"),
    "ours-fp32-cl": (False, False, True, "ours fp32 + channels_last"),
    "ours-bf16": (True, True, False, "ours bf16 (student + teacher)"),
    "ours-bf16-cl": (True, True, True, "ours bf16 + channels_last"),
    # what the paper-row configs run on a CPU (Base-DisCo.yaml: fp32, teacher BN in train mode, channels_last auto)
    "ours-fp32-cl-bntrain": (False, False, True, "ours fp32 + cl, teacher BN train"),
}


def auto_variant(choice: Dict[str, object]) -> str:
    """The ours-* variant that :func:`pretrain.precision.resolve_auto`'s ``choice`` runs."""
    for name, (s_bf16, t_bf16, cl, _) in VARIANTS.items():
        if name != "reference" and (s_bf16, t_bf16, cl) == (bool(choice["amp"]), bool(choice["teacher_amp"]),
                                                               bool(choice["channels_last"])):
            return name
    raise ValueError(f"no variant runs {choice}")


def _nbytes(*objs) -> int:
    """Bytes of the parameters and buffers of modules / of tensors (each storage counted once)."""
    seen, total = set(), 0
    for obj in objs:
        tensors = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, torch.nn.Module) else [obj]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _params_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def reference_step_fn(teacher_arch, student_arch, queue_size, device):
    """The official training step, re-implemented (no code copied): (step(view1, view2), {part: bytes})."""
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
    trainable = _params_bytes(enc_q.parameters())
    parts = {"student": _nbytes(enc_q), "gradients": trainable, "SGD momentum": trainable,
             "key encoder": _nbytes(enc_k), "teacher": _nbytes(teacher), "unused teacher copy": _nbytes(teacher_unused),
             "queue": _nbytes(queue)}
    return step, parts


def ours_step_fn(teacher_arch, student_arch, queue_size, device, student_bf16, teacher_bf16, channels_last,
                 compile=False, bn_train=False):
    """(step(view1, view2), {part: bytes}) of pretrain.engine.train_step on the DisCo Method; ``compile``: with
    TRAIN.COMPILE's Method.compile_encoders (the first step compiles); ``bn_train``: MODEL.TEACHER.BN_TRAIN."""
    from pretrain.distillers.disco import DisCo
    from pretrain.encoder import build_encoder
    from pretrain.engine import train_step
    from pretrain.model import Method
    from pretrain.testbeds.mocov2 import MoCoV2

    student = build_encoder(student_arch, 2048, 128)
    testbed = MoCoV2(student, queue_size, 0.999)
    model = Method(student, testbed, {"disco": DisCo(32.0)}, build_encoder(teacher_arch, 2048, 128), bn_train,
                   teacher_amp_dtype=torch.bfloat16 if teacher_bf16 else None).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile_encoders()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)

    def step(im_q, im_k):
        if channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        return train_step(model, [im_q, im_k], opt, None, amp_dtype=torch.bfloat16 if student_bf16 else None
                          )["loss"]

    trainable = _params_bytes(model.trainable_parameters())
    parts = {"student": _nbytes(model.student), "gradients": trainable, "SGD momentum": trainable,
             "key encoder": _nbytes(testbed.encoder_k), "teacher": _nbytes(model.teacher),
             "queue": _nbytes(testbed.queue)}
    return step, parts


def measure(args) -> dict:
    """Runs in the subprocess: build, warm up, time ``--steps`` steps, report images/s, peak memory and where the
    bytes go."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    teacher, student = args.pair.split(":")
    import pretrain.model  # noqa: F401  (the libraries every variant loads, before any model exists)
    base_gib = _rss_gib() if device.type == "cpu" else 0.0
    if args.variant == "reference":
        step, parts = reference_step_fn(teacher, student, args.queue, device)
    else:
        s_bf16, t_bf16, cl, _ = VARIANTS[args.variant]
        step, parts = ours_step_fn(teacher, student, args.queue, device, s_bf16, t_bf16, cl, args.compile,
                                   bn_train=args.variant.endswith("-bntrain"))
    views = [torch.randn(args.batch, 3, args.image_size, args.image_size, device=device) for _ in range(2)]
    parts["input views"] = 2 * _nbytes(views[0])
    dt, first_s, loss = time_steps(step, views, args.warmup, args.steps, device)
    if device.type == "cuda":
        peak = tensors_peak = torch.cuda.max_memory_allocated() / GIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
        # one more (untimed) step under the profiler: the peak of the tensors alive, as a GPU's peak allocated
        tensors_peak = (sum(parts.values()) + step_tensor_peak(step, views)) / GIB
    return {"variant": args.variant, "pair": args.pair, "s_per_step": dt, "images_per_s": args.batch / dt,
            "steps": args.steps, "warmup": args.warmup, "peak_gib": peak, "base_gib": base_gib,
            "tensors_peak_gib": tensors_peak, "parts_gib": {k: v / GIB for k, v in parts.items()},
            "loss": float(loss), "threads": torch.get_num_threads(), "compile": bool(args.compile),
            "first_step_s": first_s}


def time_steps(step, views, warmup: int, steps: int, device: torch.device):
    """``warmup`` untimed calls of ``step(*views)``, then ``steps`` timed ones (the device synchronised around them):
    (seconds per timed step, seconds of the first warm-up step or None (with --compile: the compilation), the last
    step's return value)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first_s = None
    for i in range(warmup):
        t0 = time.perf_counter()
        step(*views)
        sync()
        first_s = time.perf_counter() - t0 if i == 0 else first_s
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step(*views)
    sync()
    return (time.perf_counter() - t0) / steps, first_s, out


def step_tensor_peak(step, views) -> int:
    """The most bytes of CPU tensors alive at once during one ``step``, beyond those alive before it (the model,
    optimizer state, queue, views and the previous step's gradients): torch.profiler's allocation and free events,
    summed in time order. It is what ``torch.cuda.max_memory_allocated`` measures on a GPU, free of the allocator's
    caching and of the process's other memory."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(*views)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _rss_gib() -> float:
    """Current resident set size (Linux), GiB; 0 where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kib / 2 ** 20
    except (OSError, StopIteration):
        return 0.0


def matmul_peak(device, dtype, quick: bool = False) -> Dict[str, object]:
    """Measured matmul throughput of ``device`` at ``dtype``: ``{"dtype", "tflops", "native", "usable", "n"}``.
    4096^2 (GPU) / 2048^2 (CPU; ``quick``: 1024^2) operands; a dtype the device only emulates is measured on 512^2
    operands (it would take minutes otherwise) and is never usable, nor is a peak that rounds to 0.00 TFLOP/s."""
    device = torch.device(device)
    native = dtype == torch.float32 or native_bf16(device)
    n = 4096 if device.type == "cuda" else 512 if not native else 1024 if quick else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3 if native else 1):
        a @ b
    sync()
    reps = 50 if device.type == "cuda" else 5 if native else 2
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    tflops = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    name = "fp32" if dtype == torch.float32 else "bf16"
    return {"dtype": name, "tflops": tflops, "native": native, "usable": peak_usable(tflops, native), "n": n}


def peak_usable(tflops: float, native: bool) -> bool:
    """A peak one may divide by: a dtype the device runs natively, at a rate that does not print as 0.00."""
    return bool(native) and round(float(tflops), 2) > 0


def format_peak(peak: Dict[str, object]) -> str:
    """``fp32 0.52 TFLOP/s`` or ``bf16 unusable (emulated on this device: 0.004 TFLOP/s)``."""
    if peak["usable"]:
        return f"{peak['dtype']} {peak['tflops']:.2f} TFLOP/s"
    why = "emulated on this device" if not peak["native"] else "rounds to 0.00 TFLOP/s"
    return f"{peak['dtype']} unusable ({why}: {peak['tflops']:.3g} TFLOP/s)"


def mfu(achieved_tflops: float, peak: Optional[Dict[str, object]]) -> Optional[float]:
    """``achieved / peak`` (a fraction), or None when the peak is missing or unusable: never a division by 0."""
    if not peak or not peak["usable"] or not peak["tflops"] > 0:
        return None
    return achieved_tflops / peak["tflops"]


def format_mfu(fraction: Optional[float]) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def step_flops(pair: str, batch: int, size: int) -> float:
    """FLOPs of one step (both the official step and ours), from fvcore's counts: the student's forward + backward
    (x3) on 2 views, the key encoder's forward, the teacher's forward on 2 views."""
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


def memory_breakdown(r: dict) -> str:
    """``1.44 GiB = libraries 0.69 + student 0.05 + ... + the step's transient tensors 0.23 + allocator caches and
    workspaces 0.19`` for one measurement (GPU: the peak allocated, the parts and the step's transient tensors)."""
    parts = ([("libraries (torch, torchvision, timm; before any model)", r["base_gib"])] if r["base_gib"] else [])
    parts += list(r["parts_gib"].items())
    tensors = r.get("tensors_peak_gib", r["peak_gib"])
    parts.append(("the step's transient tensors at their peak (activations kept for backward, new gradients, "
                  "teacher / key outputs)", tensors - sum(r["parts_gib"].values())))
    if r["peak_gib"] != tensors:
        parts.append(("allocator caches, library workspaces (the rest of the peak RSS)",
                      r["peak_gib"] - sum(v for _, v in parts)))
    return f"{r['peak_gib']:.2f} GiB = " + " + ".join(f"{name} {v:.3f}" for name, v in parts)


# The full benchmark (make bench) and --quick (about a minute on a 2-core CPU); flags given explicitly win.
FULL = {"pairs": ["resnet50:resnet18", "resnet50:efficientnet_b0"], "image_size": 112, "batch": 32, "queue": 65536,
        "steps": 6, "warmup": 2}
QUICK = {"pairs": ["resnet50:resnet18"], "image_size": 64, "batch": 16, "queue": 4096, "steps": 3, "warmup": 1}


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
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="which variants to measure (default all; the reference and the auto pick always run)")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="off: leave out the bf16 variants (auto, on: measure them)")
    p.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="same as --amp off")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="leave out the channels_last variants")
    p.add_argument("--skip-emulated", action="store_true",
                   help="leave out the bf16 variants where the device only emulates bf16")
    p.add_argument("--compile", action="store_true",
                   help="also measure the auto variant with TRAIN.COMPILE (torch.compile), as 'auto + compile'; its "
                        "warm-up steps (at least one) compile, untimed")
    p.add_argument("--json", default="", help="also write the results to this file")
    # internal: one measurement in a subprocess
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--pair", help=argparse.SUPPRESS)
    args = p.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    if args.variant:
        print(json.dumps(measure(args)))
        return

    native = native_bf16(device)
    choice = resolve_auto(device)
    auto = auto_variant(choice)
    def wanted(v):
        s_bf16, t_bf16, cl, _ = VARIANTS[v]
        if (s_bf16 or t_bf16) and (args.amp == "off" or (args.skip_emulated and not native)):
            return False
        return args.channels_last or not cl

    variants = [v for v in VARIANTS if v in ("reference", auto) or (v in args.variants and wanted(v))]
    emulated = not native and any(VARIANTS[v][0] or VARIANTS[v][1] for v in variants)
    print(f"{'quick' if args.quick else 'full'} benchmark on {device_name(device)}, {torch.get_num_threads()} "
          f"threads; batch {args.batch}, {args.image_size} px, queue {args.queue}, {args.steps} timed steps after "
          f"{args.warmup} warm-up" + ("; the bf16 variants 1 step, no warm-up (bf16 is emulated here)" if emulated
                                      else ""), flush=True)
    print(f"auto (the config default, pretrain.precision.resolve_auto): {auto} -- {choice['reason']}", flush=True)
    t_start = time.perf_counter()

    results = []
    for pair in args.pairs:
        for variant, compiled in [(v, False) for v in variants] + ([(auto, True)] if args.compile else []):
            slow = (VARIANTS[variant][0] or VARIANTS[variant][1]) and not native
            steps, warmup = (1, 0) if slow and not compiled else (args.steps, args.warmup)
            warmup = max(1, warmup) if compiled else warmup  # the compilation is never timed
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--pair", pair,
                   "--image-size", str(args.image_size), "--batch", str(args.batch), "--queue", str(args.queue),
                   "--steps", str(max(1, steps)), "--warmup", str(warmup), "--device", args.device]
            proc = subprocess.run(cmd + (["--compile"] if compiled else []), capture_output=True, text=True)
            name = variant + ("+compile" if compiled else "")
            if proc.returncode != 0:
                sys.exit(f"{name} {pair} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  {pair:28s} {name:13s} {r['images_per_s']:8.1f} img/s  peak {r['peak_gib']:.2f} GiB"
                  + (f"  (first step, compiling: {r['first_step_s']:.1f} s)" if compiled else ""), flush=True)

    peaks = {"fp32": matmul_peak(device, torch.float32, args.quick)}
    if any(VARIANTS[v][0] or VARIANTS[v][1] for v in variants):
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, args.quick)
    print(f"\nmatmul peak measured here: {'; '.join(format_peak(pk) for pk in peaks.values())}")
    memory_what = ("peak GiB: peak RSS of the process, the imported libraries included; tensors: the most bytes of "
                   "tensors alive at once (the model, its state and the step's tensors, by torch.profiler; a GPU's "
                   "peak allocated)" if device.type == "cpu" else "peak allocated by torch (peak GiB = tensors)")
    print(f"memory: {memory_what}; x ref: ratios to the reference of this run; MFU against the peak of the variant's "
          f"dtype")
    summary = []
    for pair in args.pairs:
        flops = step_flops(pair, args.batch, args.image_size)
        ref = next(r for r in results if r["pair"] == pair and r["variant"] == "reference")
        print(f"\n{pair.replace(':', ' -> ')}")
        print(f"{'variant':38s} {'img/s':>7s} {'x ref':>6s} {'peak GiB':>9s} {'x ref':>6s} {'tensors':>8s} "
              f"{'x ref':>6s} {'TFLOP/s':>8s} {'MFU':>5s}  steps")
        rows = [(v, next(r for r in results if r["pair"] == pair and r["variant"] == v and not r["compile"]))
                for v in variants]
        rows.append(("auto", rows[[v for v, _ in rows].index(auto)][1]))
        compiled = [("auto+compile", r) for r in results if r["pair"] == pair and r["compile"]]
        for v, r in rows + compiled:
            tflops = flops / r["s_per_step"] / 1e12
            dtype = "bf16" if VARIANTS[r["variant"]][0] else "fp32"
            fraction = mfu(tflops, peaks.get(dtype))
            row = {"pair": pair, "variant": v, "measured": r["variant"], "images_per_s": r["images_per_s"],
                   "speedup": r["images_per_s"] / ref["images_per_s"], "peak_gib": r["peak_gib"],
                   "memory_ratio": r["peak_gib"] / ref["peak_gib"], "tensors_peak_gib": r["tensors_peak_gib"],
                   "tensors_ratio": r["tensors_peak_gib"] / ref["tensors_peak_gib"], "tflops": tflops, "mfu": fraction,
                   "steps": r["steps"], "measurement": r}
            summary.append(row)
            label = (VARIANTS[v][3] if v in VARIANTS else f"{v.replace('+', ' + ')} = "
                     f"{VARIANTS[r['variant']][3][len('ours '):]}")
            print(f"{label:38s} {r['images_per_s']:7.1f} {row['speedup']:6.2f} {r['peak_gib']:9.2f} "
                  f"{row['memory_ratio']:6.2f} {r['tensors_peak_gib']:8.2f} {row['tensors_ratio']:6.2f} "
                  f"{tflops:8.3f} {format_mfu(fraction):>5s}  "
                  + (f"(the {r['variant']} measurement)" if v == "auto" else f"{r['steps']} after {r['warmup']}")
                  + (f" (compile: first step {r['first_step_s']:.1f} s)" if r["compile"] else ""))
        auto_r = rows[-1][1]
        print(f"where the bytes go, reference: {memory_breakdown(ref)}")
        print(f"where the bytes go, ours auto ({auto_r['variant']}): {memory_breakdown(auto_r)}")
    auto_rows = [r for r in summary if r["variant"] == "auto"]
    target = 2.5 if native else 1.0
    print(f"\ntargets (issue 16): auto speed x >= {target} ({'native bf16' if native else 'no native bf16'}): "
          + ", ".join(f"{r['pair']} {r['speedup']:.2f}" for r in auto_rows)
          + "; total peak memory x <= 0.7: " + ", ".join(f"{r['pair']} {r['memory_ratio']:.2f}" for r in auto_rows)
          + (" (peak tensors: " + ", ".join(f"{r['pair']} {r['tensors_ratio']:.2f}" for r in auto_rows) + ")"
             if device.type == "cpu" else ""))
    print(f"{'quick' if args.quick else 'full'} benchmark: {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name(device), "auto": {**choice, "variant": auto},
                       "matmul_peaks": peaks, "results": summary}, f, indent=1)


if __name__ == "__main__":
    main()
