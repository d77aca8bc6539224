#!/usr/bin/env python3
"""Data parallel on tinygrad with Tensor.shard (issue 13, item 4): one training loss and its
gradients with the batch split over two devices of one machine (weights replicated, the batch
sharded on its first axis, tinygrad all-reducing the gradients), against one device.

Usage: python scripts/tinygrad_shard.py [--config tiny-dense] [--devices CPU,CPU:1]
Prints the loss on one device and sharded, the largest relative gradient difference, and the
seconds of each (tinygrad compiles every kernel on first use: the first call is mostly that).
What it found here (README, "Data and expert parallel"): dense and MoD models run sharded;
token-choice MoE does not (its expert-major buffers mix the sharded groups).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

SMALL = ["layers=2", "dim=32", "heads=2", "context=32", "expert.hidden=64", "mlp.hidden=64"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny-dense")
    parser.add_argument("--devices", default="CPU,CPU:1")
    args = parser.parse_args()
    from tinygrad import Tensor

    from moe_min.backends.ops_tinygrad import TinygradOps
    from moe_min.models import configs, data, lm

    devices = tuple(args.devices.split(","))

    class Sharded(TinygradOps):
        """Every array the lowering makes is replicated over `devices`; sharded ones pass."""

        def asarray(self, x, dtype=None):
            if isinstance(x, Tensor) and isinstance(x.device, tuple):
                return x if dtype is None else x.cast(super().asarray(np.zeros(1), dtype).dtype)
            return super().asarray(x, dtype).shard(devices)

        def zeros(self, shape, dtype="float"):
            return super().zeros(shape, dtype).shard(devices)

        def arange(self, n):
            return super().arange(n).shard(devices)

    config = configs.apply_overrides(configs.PRESETS[args.config], SMALL)
    params = lm.init_params(config, 0)
    batch = data.batch_at(data.load_corpus(), 0, 8, config.context, 0)
    results = []
    for ops, place in ((TinygradOps(devices[0]), lambda a, axis=None: Tensor(a, device=devices[0])),
                       (Sharded(devices[0]),
                        lambda a, axis=None: Tensor(a, device=devices[0]).shard(devices, axis))):
        ops._in_grad += 1  # gradients of the tensors given, as ops.value_and_grad takes them
        weights = {k: place(v).realize() for k, v in params.items()}
        start = time.perf_counter()
        try:
            loss = lm.loss(ops, config, weights, place(batch[:, :-1], 0), place(batch[:, 1:], 0),
                           mode="train")[0]
            grads = loss.gradient(*weights.values())
            Tensor.realize(loss, *grads)
        except Exception as e:  # the finding is the failure itself
            print(f"{type(ops).__name__} on {devices}: {type(e).__name__}: {e}")
            return 1
        results.append((loss.item(), [g.numpy() for g in grads], time.perf_counter() - start))
    (one, g1, t1), (two, g2, t2) = results
    worst = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-30))
                for a, b in zip(g1, g2, strict=True))
    print(f"{args.config}: loss {one:.7f} on {devices[0]} ({t1:.1f} s), {two:.7f} sharded over "
          f"{', '.join(devices)} ({t2:.1f} s); largest relative gradient difference {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
