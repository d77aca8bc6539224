"""Train several LM configs with the same data, steps, batch, learning rate and seed, then
sample from each; print (and write OUT/table.md, OUT/table.json, OUT/compare.png) one row per
config: validation loss with training-mode and with causal routing, the predictor's balanced
accuracy, the realised routed fraction when sampling, training and generation tokens/s and
a sample. For each MoD config it also times an equally wide and deep dense model's
generation (untrained: its speed does not depend on its weights), the paper's comparison.

    .venv/bin/python scripts/lm_table.py --steps 650 --out runs/table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moe_min.cli import main as cli
from moe_min.models import generate as gen
from moe_min.models import lm, plots
from moe_min.models import train as tr
from moe_min.models.configs import PRESETS
from moe_min.ops import get_backend

PROMPT = "The with statement"


def generation_speed(ops, config, params: dict, tokens: int, seed: int = 0):
    """(text, tokens/s, routed fraction per MoD block) of one seeded sample; tokens/s leaves
    out the calls that traced and compiled a step (first-call costs)."""
    stats = {}
    text, _, _ = gen.generate(ops, config, params, PROMPT, max_tokens=tokens,
                              sampler=gen.make_sampler(0.8, seed=seed), stats=stats)
    return text, stats["steady_tokens_per_s"], stats.get("routed_fraction", {})


def final(records: list[dict], mode: str) -> dict:
    return [r for r in records if r.get("mode") == mode and r["split"] == "val"][-1]


def row(name: str, out: Path, ops, tokens: int) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checkpoint = tr.load_checkpoint(out / "checkpoint", optimizer=False)
    params = {k: ops.asarray(v) for k, v in checkpoint.params.items()}
    text, speed, routed = generation_speed(ops, checkpoint.config, params, tokens)
    scores = [b["predictor"]["balanced_accuracy"] for b in final(records, "eval")["blocks"]
              .values() if "predictor" in b]
    result = {"config": name, "backend": ops.name, "steps": checkpoint.step,
              "params": sum(int(np.prod(v.shape)) for v in checkpoint.params.values()),
              "val_train_routing": final(records, "eval")["loss"],
              "val_causal": final(records, "causal")["loss"],
              "predictor_balanced_accuracy": float(np.mean(scores)) if scores else None,
              "sampled_routed_fraction": float(np.mean(list(routed.values()))) if routed
              else None,
              "train_tokens_per_s": [r for r in records if "objective" in r][-1]["tokens_per_s"],
              "gen_tokens_per_s": speed, "sample": text}
    config = checkpoint.config
    if getattr(config, "mod", None) is not None:  # the same width and depth, every block dense
        dense = type(config).from_dict({**config.to_dict(), "mod": None})
        dense_params = {k: ops.asarray(v) for k, v in lm.init_params(dense, 0).items()}
        result["dense_same_shape_gen_tokens_per_s"] = generation_speed(
            ops, dense, dense_params, tokens)[1]
    return result, records


def markdown(rows: list[dict]) -> str:
    def f(v, spec):
        return "–" if v is None else format(v, spec)

    lines = ["| config | backend | params | val loss (train routing) | val loss (causal) | "
             "predictor bal. acc | routed when sampling | train tok/s | gen tok/s | sample |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sample = r["sample"][:70].replace("|", "\\|").replace("\n", "⏎")
        gen_speed = f(r["gen_tokens_per_s"], ".0f")
        if "dense_same_shape_gen_tokens_per_s" in r:
            gen_speed += f" (dense same shape {r['dense_same_shape_gen_tokens_per_s']:.0f})"
        lines.append(f"| {r['config']} | {r['backend']} | {r['params'] / 1e6:.2f} M | "
                     f"{r['val_train_routing']:.4f} | {r['val_causal']:.4f} | "
                     f"{f(r['predictor_balanced_accuracy'], '.3f')} | "
                     f"{f(r['sampled_routed_fraction'], '.3f')} | "
                     f"{r['train_tokens_per_s']:,.0f} | {gen_speed} | `{sample}` |")
    return "\n".join(lines)


def run(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny-dense,tiny-moe,tiny-ec,tiny-mod")
    parser.add_argument("--backend", default="mlx")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=650)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gen-tokens", type=int, default=200)
    parser.add_argument("--out", default="runs/table")
    parser.add_argument("--skip-training", action="store_true",
                        help="reuse OUT/<config>/ from an earlier run")
    args = parser.parse_args(argv)
    ops, rows, curves = get_backend(args.backend, args.device), [], {}
    for name in args.configs.split(","):
        if name not in PRESETS:
            parser.error(f"unknown config {name!r}: expected some of {', '.join(PRESETS)}")
        out = Path(args.out) / name
        if not args.skip_training:
            cli(["train", "--config", name, "--steps", str(args.steps), "--batch-size",
                 str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
                 "--backend", args.backend, "--eval-every", str(max(args.steps // 5, 1)),
                 "--out", str(out), *(["--device", args.device] if args.device else [])],
                standalone_mode=False)
        result, curves[name] = row(name, out, ops, args.gen_tokens)
        rows.append(result)
    table = markdown(rows)
    print(table)
    Path(args.out, "table.md").write_text(table + "\n")
    Path(args.out, "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    if plots.plot_compare(curves, Path(args.out) / "compare.png"):
        print(f"plot: {Path(args.out) / 'compare.png'}")


if __name__ == "__main__":
    run()
