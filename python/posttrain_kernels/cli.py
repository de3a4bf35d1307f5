"""Command line: ``python -m posttrain_kernels {pipeline,bench,info}`` (also the ``posttrain-kernels``
script)."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _info() -> int:
    import torch

    from . import __version__
    from ._extension import extension_error, load_extension
    from .dispatch import live_backends, resolve_backend, triton_interpreting

    ext = load_extension()
    rows = [
        ("posttrain_kernels", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
    ]
    try:
        import triton
        rows.append(("triton", triton.__version__ + (" (interpreter)" if triton_interpreting() else "")))
    except ImportError:
        rows.append(("triton", "not installed"))
    rows.append(("cuda device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"))
    if ext is None:
        rows.append(("_C", f"not built ({extension_error()})"))
    else:
        rows.append(("_C", f"built: cpu kernels={'yes' if ext.has_cpu else 'no'}, "
                           f"cuda kernels={'yes' if ext.has_cuda else 'no'}, "
                           f"openmp={'yes' if ext.has_openmp else 'no'}"))
    rows.append(("cpu threads", str(torch.get_num_threads())))
    live = live_backends()
    rows.append(("backends live", ", ".join(k for k, ok in live.items() if ok)))
    rows.append(("backends not live", ", ".join(k for k, ok in live.items() if not ok) or "-"))
    rows.append(("auto on cpu", resolve_backend("auto", torch.device("cpu"))))
    if torch.cuda.is_available():
        rows.append(("auto on cuda", resolve_backend("auto", torch.device("cuda"))))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, live backends, what _C was built with")
    pipe = sub.add_parser("pipeline", help="the main job: SFT -> DPO -> GRPO -> distillation on the fused losses, "
                                           "compared with the reference losses")
    from .pipeline.run import add_arguments as add_pipeline_arguments
    add_pipeline_arguments(pipe)
    bench = sub.add_parser("bench", help="run the benchmark suite (speed + peak memory, side by side)")
    from .benchmarks.cli import add_arguments  # the suite lives in benchmarks/ (installed with the package)
    add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "pipeline":
        from .pipeline.run import run_cli
        return run_cli(args)
    from .benchmarks.cli import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
