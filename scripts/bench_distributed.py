#!/usr/bin/env python3
"""Times the collectives of `moe-min train --ranks N [--expert-parallel]` on this machine (MLX's
ring backend on loopback), at the sizes of a preset's training step:

- data parallel: the gradients' all_sum as one flattened array (what models/distributed.py
  does) against one all_sum per tensor;
- expert parallel: the experts' all-to-all (models/expert_parallel.py) by all_gather against
  send/recv, forward and backward (the VJP is a second exchange).

Usage: python scripts/bench_distributed.py [--config tiny-moe] [--batch-size 8] [--ranks 2]
Each row is the median of --repeats timed calls after one untimed call, on rank 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _time(mx, fn, repeats: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_main(args) -> None:
    import numpy as np

    from moe_min.models import distributed, expert_parallel, lm
    from moe_min.models.train import model_config
    from moe_min.routing import group_shape

    world = distributed.join()
    mx = distributed.mlx_core()
    config = model_config(args.config)
    params = lm.init_params(config, 0)
    grads = [mx.array(v) for _, v in sorted(params.items())]
    group, n = world.group, world.size
    rows = []

    def flat():
        joined = mx.concatenate([mx.reshape(g, (-1,)) for g in grads])
        return mx.distributed.all_sum(joined, group=group) / n

    def per_tensor():
        return [mx.distributed.all_sum(g, group=group) / n for g in grads]

    def buckets(limit):
        def run():
            out, bucket, held = [], [], 0
            for g in grads + [None]:
                if g is None or (bucket and held + g.size * 4 > limit):
                    joined = mx.concatenate([mx.reshape(b, (-1,)) for b in bucket])
                    out.append(mx.distributed.all_sum(joined, group=group) / n)
                    bucket, held = [], 0
                if g is not None:
                    bucket.append(g)
                    held += g.size * 4
            return out
        return run

    def mixed():  # tensors under 1 MiB flattened together, larger ones each alone
        small = [g for g in grads if g.size * 4 < 2 ** 20]
        joined = mx.concatenate([mx.reshape(g, (-1,)) for g in small])
        return [mx.distributed.all_sum(joined, group=group) / n] + [
            mx.distributed.all_sum(g, group=group) / n for g in grads if g.size * 4 >= 2 ** 20]

    size = sum(g.size for g in grads) * 4
    variants = [("all_sum, one flattened array", flat), ("all_sum, one per tensor", per_tensor)]
    variants += [(f"all_sum, flattened in {mb} MB buckets", buckets(mb * 2 ** 20))
                 for mb in (4, 16)] + [("all_sum, tensors < 1 MiB flattened, larger alone",
                                        mixed)]
    for name, fn in variants:
        rows.append((f"DP gradients ({len(grads)} tensors, {size / 1e6:.1f} MB)", name,
                     _time(mx, fn, args.repeats)))
    spec, local = config.moe, args.batch_size // n
    G, S = group_shape(spec, local, config.context)
    M = G * spec.slots(S) + 1
    E, D = spec.num_experts, config.dim
    buffer = mx.array(np.random.default_rng(world.rank).standard_normal((n, E // n, M, D)),
                      mx.float32)
    for method in expert_parallel.EXCHANGES:
        if method == "send_recv" and n != 2:
            continue

        def both_ways(method=method):  # forward and backward of one exchange
            loss = lambda v: mx.sum(expert_parallel.all_to_all(v, world, method) ** 2)  # noqa: E731
            return mx.grad(loss)(buffer)

        rows.append((f"EP buffers (E={E}, M={M}, D={D}, {buffer.size * 4 / 1e6:.2f} MB)",
                     f"all-to-all by {method}, forward + backward", _time(mx, both_ways,
                                                                           args.repeats)))
    if world.rank == 0:
        print(f"{args.config}, global batch {args.batch_size}, {n} ranks on loopback")
        for what, how, seconds in rows:
            print(f"{what:<44} {how:<44} {seconds * 1e3:8.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny-moe")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args)
        return 0
    from moe_min.models import distributed

    return distributed.run_local(args.ranks, [sys.executable, __file__, *sys.argv[1:], "--rank"])


if __name__ == "__main__":
    sys.exit(main())
