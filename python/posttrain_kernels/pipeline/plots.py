"""The pipeline's plots: each stage's loss curve (``losses.png``) and the RL stage's reward curve
with every stage's evaluation before and after (``rewards.png``). Needs matplotlib; without it the
plots are skipped with a message."""
from __future__ import annotations

import os
import sys
from typing import Sequence


def write_plots(results: Sequence, out_dir: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return False
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        steps = [h for h in r.history if "loss" in h]
        ax.plot([h["step"] for h in steps], [h["loss"] for h in steps], lw=1.2)
        ax.set_title(f"{r.stage}: loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "losses.png"), dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    rl = [r for r in results if r.stage == "rl"]
    if rl:
        steps = [h for h in rl[0].history if "reward" in h]
        a1.plot([h["step"] for h in steps], [h["reward"] for h in steps], lw=1.2, label="rollout reward")
        a1.set_title("rl: mean reward of the rollouts")
        a1.set_xlabel("step")
        a1.grid(alpha=0.3)
    else:
        a1.set_axis_off()
    names = [r.stage for r in results]
    x = range(len(results))
    a2.bar([i - 0.2 for i in x], [r.before for r in results], width=0.4, label="before")
    a2.bar([i + 0.2 for i in x], [r.after for r in results], width=0.4, label="after")
    a2.set_xticks(list(x))
    a2.set_xticklabels([f"{n}\n({r.metric})" for n, r in zip(names, results)])
    a2.set_title("evaluation before / after each stage")
    a2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "rewards.png"), dpi=110)
    plt.close(fig)
    return True
