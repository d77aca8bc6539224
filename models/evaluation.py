"""Evaluation during and after training: mean cross-entropy over fixed windows of a split, and
per routed block the expert load, dropped and unrouted fractions, the realised routed fraction
and the predictor's scores, in training-mode routing ("eval") and causal mode.

The decoder's forward runs compiled (ops.compile) on chunks of one fixed shape, `batch`
windows: a last, shorter chunk is padded with zero windows, which are left out of every sum
(each statistic comes back per row). Padding is exact only where a row's routing ignores the
other rows: causal mode, dense blocks, MoD and sequence-grouped token choice. Where routing
groups span rows (expert choice groups by batch, fixed-size groups), a padding row would take
real rows' expert slots, so that last chunk runs at its own shape instead (one more trace).
Compiled functions are kept per (backend, config, mode, shape) for the whole process, so the
periodic evaluations of a run trace once. May import: anything but cli.
"""

from __future__ import annotations

import numpy as np

from moe_min.models import configs, data, encoder, lm

_COMPILED: dict = {}


def _forward_stats(ops, config, mode: str):
    """(params, x, y) -> {"ce": (B, T), "{i}.{stat}": ...}: what `evaluate` reads, and only
    arrays (a jit returns arrays)."""

    def fn(params, x, y):
        logits, info = lm.forward(ops, config, params, x, mode=mode, noise=False)
        B, T, V = logits.shape
        picked = ops.take_along_axis(logits, ops.reshape(y, (B, T, 1)), axis=-1)
        out = {"ce": ops.logsumexp(logits, axis=-1) - ops.reshape(picked, (B, T))}
        for i, stats in info["blocks"].items():  # per row: padding rows are dropped on the host
            out[f"{i}.load"] = ops.astype(stats["load"], "float")  # (G, E)
            out[f"{i}.routed"] = ops.astype(stats["experts_per_token"], "float")  # (B, T)
            if "predictor_logits" in stats and mode != "causal":
                out[f"{i}.pred"] = stats["predictor_logits"]
                out[f"{i}.true"] = stats["predictor_targets"]
        return out

    return fn


def padding_is_exact(config, mode: str) -> bool:
    """Does each row's routing ignore the other rows of its chunk (module docstring)? MoD
    ranks within a sequence; causal mode decides each token alone."""
    return mode == "causal" or config.moe is None or config.moe.group == "sequence"


def compiled_forward(ops, config, mode: str, shape: tuple[int, int]):
    key = (id(ops), config, mode, shape)
    if key not in _COMPILED:
        _COMPILED[key] = ops.compile(_forward_stats(ops, config, mode))
    return _COMPILED[key]


def _predictor_scores(pred: np.ndarray, true: np.ndarray) -> dict:
    """Accuracy, balanced accuracy and recall/precision of "routed": at a routed fraction of
    12.5 %, always predicting "skip" scores 87.5 % raw accuracy (mod_and_predictor.md P16)."""
    tp, tn = float((pred & true).sum()), float((~pred & ~true).sum())
    pos, neg = float(true.sum()), float((~true).sum())
    recall, specificity = tp / max(pos, 1), tn / max(neg, 1)
    return {"accuracy": (tp + tn) / max(pos + neg, 1), "balanced_accuracy": 0.5 * (
        recall + specificity), "recall": recall, "precision": tp / max(float(pred.sum()), 1)}


def _encoder_loss(ops, config, params, windows, batch: int, mask_rate: float) -> dict:
    """The masked-byte loss, masks drawn from a fixed seed per chunk (not compiled: the masks
    come from the host)."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        value, _ = encoder.loss(ops, config, params, ops.asarray(chunk[:, :-1], "int"),
                                mask_rate, start)
        total, count = total + float(ops.to_numpy(value)) * len(chunk), count + len(chunk)
    return {"loss": total / count, "blocks": {}}


def evaluate(ops, config, params, windows: np.ndarray, mode: str, batch: int,
             mask_rate: float = 0.15) -> dict:
    """Mean cross-entropy (nats/byte) over `windows` (N, T+1), and per routed block the
    expert load, dropped and unrouted fractions, realised routed fraction and predictor
    scores, in `mode` ("eval": training-mode routing without noise; "causal": per token)."""
    if isinstance(config, configs.EncoderConfig):
        return _encoder_loss(ops, config, params, windows, batch, mask_rate)
    scheme = getattr(config, "mod", None) or config.moe  # router logits (causal="router"): 0
    threshold = getattr(getattr(scheme, "predictor", None), "threshold", 0.0)
    pad = padding_is_exact(config, mode)
    total, count, blocks = 0.0, 0, {}
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        real = len(chunk)
        if pad and real < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - real, chunk.shape[1]),
                                                    chunk.dtype)])
        fn = compiled_forward(ops, config, mode, chunk[:, :-1].shape)
        out = fn(params, ops.asarray(chunk[:, :-1], "int"), ops.asarray(chunk[:, 1:], "int"))
        host = {name: np.asarray(ops.to_numpy(value))[:real] for name, value in out.items()}
        ce = host.pop("ce")
        total, count = total + float(ce.sum()), count + ce.size
        for name, value in host.items():
            i, stat = name.split(".")
            acc = blocks.setdefault(int(i), {"tokens": 0, "unrouted": 0, "pred": [], "true": []})
            if stat == "load":  # (G, E): G = B here unless routing groups span rows (no pad)
                acc["load"] = acc.get("load", 0) + value.reshape(-1, value.shape[-1]).sum(0)
            elif stat == "routed":
                acc["tokens"] += value.size
                acc["unrouted"] += int((value == 0).sum())
            else:
                acc[stat].append(value > (threshold if stat == "pred" else 0.5))
    out = {"loss": total / count, "blocks": {}}
    for i, acc in sorted(blocks.items()):
        n, load = acc["tokens"], acc["load"]
        k = getattr(config.moe, "top_k", 1) if config.block_kind(i) == "moe" else 1
        # only token choice drops: its choices past capacity (MoD and expert choice: none)
        acc["dropped"] = n * k - float(load.sum()) if hasattr(config.moe, "top_k") and \
            config.block_kind(i) == "moe" else 0.0
        report = {"load": (load / max(load.sum(), 1)).round(4).tolist(),  # share per expert
                  "routed_fraction": 1.0 - acc["unrouted"] / n,  # tokens with >= 1 expert
                  "experts_per_token": float(load.sum()) / n,
                  "dropped_fraction": acc["dropped"] / (n * k)}  # token choice's lost choices
        if acc["pred"]:
            pred, true = (np.concatenate([a.ravel() for a in acc[key]]) for key in ("pred",
                                                                                     "true"))
            report["predictor"] = _predictor_scores(pred, true)
        out["blocks"][str(i)] = report
    return out


def validate(ops, config, params, splits: dict, tc, final: bool) -> list[dict]:
    """Validation in training-mode routing ("eval") and, for a decoder, in causal mode; and
    the training split's loss in "eval" mode (the per-step objective also holds aux terms).
    A model without routed blocks has one mode: its causal report is the "eval" one."""
    reports = []
    encoder_model = isinstance(config, configs.EncoderConfig)
    for split, mode in (("train", "eval"), ("val", "eval"), ("val", "causal")):
        limit = (tc.final_windows or None) if final and split == "val" else tc.eval_windows
        windows = data.eval_windows(splits[split], config.context, limit)
        if mode == "causal" and (encoder_model or not reports[-1]["blocks"]):
            if not encoder_model:
                reports.append({**reports[-1], "mode": "causal"})
            continue
        reports.append({"split": split, "mode": mode, **evaluate(
            ops, config, params, windows, mode, tc.eval_batch, tc.mask_rate)})
    return reports
