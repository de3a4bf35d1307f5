"""``python -m posttrain_kernels bench``: run the suite, print a table, write CSV / PNG / Markdown."""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from typing import List

import torch

from .suite import OPS, Row, run_suite

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--rows", type=int, default=None, help="rows (tokens); default 4096 on CPU, 16384 on CUDA")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary; default 32000 on CPU, 128256 on CUDA")
    p.add_argument("--linear-dtypes", default=None,
                   help="dtypes of the fused-linear ops; default float32 on CPU (bf16 matmuls are "
                        "~8x slower than fp32 on CPUs without AVX512-BF16), bfloat16 on CUDA")
    p.add_argument("--linear-rows", type=int, default=None,
                   help="tokens of the fused-linear ops; default 2048 on CPU, 16384 on CUDA")
    p.add_argument("--hidden", type=int, default=None, help="hidden size of the fused-linear ops; default 1024 on CPU, 4096 on CUDA")
    p.add_argument("--pref-shape", default="4,256,512",
                   help="preference ops: pairs,tokens,hidden (the head's vocabulary is --vocab)")
    p.add_argument("--policy-shape", default="8,256,512",
                   help="policy ops: completions,tokens,hidden (the head's vocabulary is --vocab)")
    p.add_argument("--distill-hidden", default="512,1024",
                   help="linear distillation: student,teacher hidden sizes (tokens: --linear-rows)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--impls", default=None,
                   help="comma-separated name fragments: run only the implementations whose name "
                        "contains one (eager always runs), e.g. 'ptk cpu,floor'")
    p.add_argument("--slow-s", type=float, default=60.0,
                   help="fused-linear ops: an implementation whose first call takes longer than this "
                        "many seconds is timed by that call alone (marked '1 run')")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    p.add_argument("--out", default=None,
                   help="directory for results.csv, results.md and results.png "
                        "(e.g. benchmarks/results/<device>)")
    p.add_argument("--csv", default=None, help="write the CSV here")
    p.add_argument("--png", default=None, help="write the plot here (needs matplotlib)")


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"cpu-{name}-{os.cpu_count()}c"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def format_table(rows: List[Row]) -> str:
    head = ["op", "dtype", "impl", "time ms", "vs eager", "vs compile", "peak extra MiB", "peak/grad",
            "peak vs eager", "working MiB", "working vs eager", "time / floor"]
    with_bw = any(r.pct_copy_bandwidth is not None for r in rows)
    with_tflops = any(r.tflops is not None for r in rows)
    if with_bw:
        head.append("% copy BW")
    if with_tflops:
        head.append("TFLOP/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    eager_peak = {(r.op, r.dtype): r.peak_extra_mib for r in rows if r.impl == "eager"}
    eager_work = {(r.op, r.dtype): r.working_mib for r in rows if r.impl == "eager"}
    floor_time = {(r.op, r.dtype): r.time_ms for r in rows if r.impl.endswith("(floor)")}
    for r in rows:
        ep = eager_peak.get((r.op, r.dtype))
        peak_vs_eager = None if (ep in (None, 0) or r.peak_extra_mib is None) else r.peak_extra_mib / ep
        ew = eager_work.get((r.op, r.dtype))
        work_vs_eager = None if (ew in (None, 0) or r.working_mib is None) else r.working_mib / ew
        floor = r.impl.endswith("(floor)")  # its memory is not comparable
        cells = [r.op, r.dtype, r.impl + (" (1 run)" if r.timed_by_first_call else ""),
                 fmt(r.time_ms, ".1f"), fmt(r.speedup_vs_eager, ".2f") + "x",
                 fmt(r.speedup_vs_compile, ".2f") + ("x" if r.speedup_vs_compile else ""),
                 *(["-"] * 5 if floor else
                   [fmt(r.peak_extra_mib, ".0f"), fmt(r.peak_over_grad, ".2f"), fmt(peak_vs_eager, ".2f"),
                    fmt(r.working_mib, ".0f"), fmt(work_vs_eager, ".2f")])]
        ft = floor_time.get((r.op, r.dtype))
        cells.append("-" if ft is None else f"{r.time_ms / ft:.2f}")
        if with_bw:
            cells.append(fmt(r.pct_copy_bandwidth, ".0f"))
        if with_tflops:
            cells.append(fmt(r.tflops, ".1f" if (r.tflops or 0) < 10 else ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: List[Row], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].as_dict().keys()))
        w.writeheader()
        for r in rows:
            w.writerow(r.as_dict())


def write_png(rows: List[Row], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return False
    groups = sorted({(r.op, r.dtype) for r in rows}, key=lambda g: (OPS.index(g[0]), g[1]))
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 2.6 * len(groups)), squeeze=False)
    for i, (op, dt) in enumerate(groups):
        sel = [r for r in rows if r.op == op and r.dtype == dt]
        names = [r.impl for r in sel]
        colors = ["tab:green" if n.startswith("ptk") else "tab:gray" for n in names]
        axes[i][0].barh(names, [r.time_ms for r in sel], color=colors)
        axes[i][0].set_xlabel("forward + backward, ms (lower is better)")
        axes[i][0].set_title(f"{op}, {dt}", fontsize=9)
        # the floor's memory is not comparable (whole GEMM outputs): no bar
        axes[i][1].barh(names, [0 if r.impl.endswith("(floor)") else (r.peak_extra_mib or 0) for r in sel],
                        color=colors)
        axes[i][1].axvline(sel[0].grad_mib, color="k", ls="--", lw=1)
        axes[i][1].set_xlabel("peak extra memory, MiB (dashed: the input gradients)")
        for ax in axes[i]:
            ax.invert_yaxis()
            ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _parse_dtypes(flag: str, text: str) -> list:
    out = []
    for d in text.split(","):
        if d.strip() not in DTYPES:
            raise SystemExit(f"{flag}: expected names from {tuple(DTYPES)}, got {d!r}")
        out.append(DTYPES[d.strip()])
    return out


def _parse_shape(flag: str, text: str) -> tuple:
    try:
        rows, tokens, hidden = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag}: expected three integers (sequences,tokens,hidden), got {text!r}")
    return rows, tokens, hidden


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = args.rows or (16384 if device.type == "cuda" else 4096)
    vocab = args.vocab or (128256 if device.type == "cuda" else 32000)
    linear_rows = args.linear_rows or (16384 if device.type == "cuda" else 2048)
    hidden_size = args.hidden or (4096 if device.type == "cuda" else 1024)
    repeats, warmup = args.repeats, args.warmup
    if args.quick:
        rows, vocab, repeats, warmup = min(rows, 256), min(vocab, 4099), 1, 1
        linear_rows, hidden_size = min(linear_rows, 256), min(hidden_size, 128)
    pref_shape = _parse_shape("--pref-shape", args.pref_shape)
    policy_shape = _parse_shape("--policy-shape", args.policy_shape)
    try:
        distill_hidden = tuple(int(v) for v in args.distill_hidden.split(","))
        assert len(distill_hidden) == 2
    except (ValueError, AssertionError):
        raise SystemExit(f"--distill-hidden: expected two integers (student,teacher), got {args.distill_hidden!r}")
    if args.quick:
        distill_hidden = (min(distill_hidden[0], 64), min(distill_hidden[1], 96))
    if args.quick:
        pref_shape = tuple(min(a, b) for a, b in zip(pref_shape, (2, 32, 64)))
        policy_shape = tuple(min(a, b) for a, b in zip(policy_shape, (4, 32, 64)))
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"--ops: expected names from {OPS}, got {o!r}")
    dtypes = _parse_dtypes("--dtypes", args.dtypes)
    linear_dtypes = _parse_dtypes("--linear-dtypes", args.linear_dtypes or
                                  ("bfloat16" if device.type == "cuda" else "float32"))
    t0 = time.time()
    print(f"posttrain_kernels bench: {rows} x {vocab} on {device} ({device_tag(device)}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = run_suite(ops, dtypes, rows, vocab, device, repeats, warmup, not args.no_compile,
                        progress=lambda s: print(f"  {s} ({time.time() - t0:.0f}s)", flush=True),
                        linear_rows=linear_rows, hidden_size=hidden_size, linear_dtypes=linear_dtypes,
                        slow_s=args.slow_s, preference_shape=pref_shape, policy_shape=policy_shape,
                        distill_hidden=distill_hidden,
                        only=None if not args.impls else [x.strip() for x in args.impls.split(",")])
    table = format_table(results)
    print(table)
    title = (f"{rows} x {vocab} (fused linear: {linear_rows} tokens, H={hidden_size}), "
             f"{device_tag(device)}, torch {torch.__version__}")
    csv_path, png_path = args.csv, args.png
    if args.out:
        csv_path = csv_path or os.path.join(args.out, "results.csv")
        png_path = png_path or os.path.join(args.out, "results.png")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(f"Forward + backward, {title}; command: `python -m posttrain_kernels bench "
                    f"{' '.join(sys.argv[2:]) if len(sys.argv) > 2 else ''}`\n\n{table}\n")
    if csv_path:
        write_csv(results, csv_path)
        print(f"wrote {csv_path}")
    if png_path and write_png(results, png_path, title):
        print(f"wrote {png_path}")
    return 0
