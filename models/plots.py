"""A run's records and plots: `Metrics` keeps OUT/metrics.jsonl (one JSON record a line),
`write_all` draws `loss.png` (train loss, validation loss in training mode and in causal
mode) and `load.png` (per routed block, each expert's share of the routed tokens, training
mode beside causal mode). matplotlib (Agg) is optional: without it the plots are skipped.
May import: stdlib, numpy, matplotlib, moe_min.helpers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from moe_min.helpers import write_atomic


class Metrics:
    """OUT/metrics.jsonl, one JSON record a line. Opening it for a run that starts at `step`
    drops what an interrupted run logged after its last checkpoint, so the file (rewritten
    atomically) tells one run."""

    def __init__(self, path: Path, step: int):
        self.path, self.records = path, []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                record = json.loads(line)
            except ValueError:  # the last line, cut by a kill in the middle of an append
                continue
            if record["step"] <= step:
                self.records.append(record)
        write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                   for r in self.records).encode())

    def add(self, record: dict):
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path):
    """Atomic, like every file a run writes: a temp file beside the target, then rename."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())


def plot_loss(records: list[dict], path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [r for r in records if "objective" in r]
    if steps:
        ax.plot([r["step"] for r in steps], [r["objective"] for r in steps], lw=0.6, alpha=0.4,
                color="tab:blue", label="train objective (CE + aux), per step")
    for split, mode, color, label in (
            ("train", "eval", "tab:blue", "train"),
            ("val", "eval", "tab:orange", "val (training-mode routing)"),
            ("val", "causal", "tab:green", "val (causal routing, as sampled)")):
        found = [r for r in records if r.get("mode") == mode and r["split"] == split]
        if found:
            ax.plot([r["step"] for r in found], [r["loss"] for r in found], "o-", ms=3,
                    color=color, label=label)
    evals = [r["loss"] for r in records if "mode" in r]
    if evals:  # the first steps' objective (~ln 256 + aux) would squash the curves
        ax.set_ylim(0.9 * min(evals), 1.6 * max(evals))
    ax.set(xlabel="step", ylabel="cross-entropy, nats / byte", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_load(records: list[dict], path: Path, plt) -> bool:
    """One panel per routed block at the last evaluation, training-mode routing beside causal:
    an MoE block's share of routed tokens per expert (uniform dashed), a MoD block's routed
    fraction. Nothing to draw for a dense model."""
    last = {r["mode"]: r for r in records if "mode" in r and r["split"] == "val"}
    blocks = sorted(last.get("eval", {}).get("blocks", {}), key=int)
    if not blocks:
        return False
    fig, axes = plt.subplots(1, len(blocks), figsize=(3.2 * len(blocks), 3.2), squeeze=False)
    modes = [(m, c, label) for m, c, label in (("eval", "tab:orange", "training-mode"),
                                               ("causal", "tab:green", "causal")) if m in last]
    for ax, b in zip(axes[0], blocks, strict=True):
        experts = len(last["eval"]["blocks"][b]["load"])
        for j, (mode, color, label) in enumerate(modes):
            stats = last[mode]["blocks"][b]
            if experts > 1:
                ax.bar(np.arange(experts) + 0.4 * j - 0.2, stats["load"], width=0.4,
                       color=color, label=label)
            else:
                ax.bar([j], [stats["routed_fraction"]], width=0.6, color=color, label=label)
        if experts > 1:
            ax.axhline(1 / experts, color="gray", ls="--", lw=0.8)
            ax.set(xlabel="expert", xticks=range(experts), ylabel="share of routed tokens")
        else:
            ax.set(xticks=range(len(modes)), xticklabels=[m[2] for m in modes],
                   ylabel="routed fraction")
        ax.set_title(f"block {b}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"routed load at step {last['eval']['step']} (validation split)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def write_all(records: list[dict], out: Path) -> list[Path]:
    """Write loss.png and load.png under `out`; returns the paths written."""
    plt = _pyplot()
    if plt is None:
        return []
    out = Path(out)
    plot_loss(records, out / "loss.png", plt)
    return [out / "loss.png"] + ([out / "load.png"] if plot_load(records, out / "load.png", plt)
                                 else [])


def plot_compare(runs: dict[str, list[dict]], path: Path) -> bool:
    """Validation loss against step for several runs (`name -> records`): training-mode
    routing solid, causal routing (as sampled) dashed. False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, records), color in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()[
            "color"], strict=False):
        for mode, style in (("eval", "-"), ("causal", "--")):
            found = [r for r in records if r.get("mode") == mode and r["split"] == "val"]
            ax.plot([r["step"] for r in found], [r["loss"] for r in found], style, marker="o",
                    ms=3, color=color, label=f"{name} ({'causal' if mode == 'causal' else 'train'}"
                    " routing)")
    ax.set(xlabel="step", ylabel="validation cross-entropy, nats / byte",
           title="routed LMs, same data, steps and seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
    return True
