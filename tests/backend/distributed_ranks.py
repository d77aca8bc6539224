"""Run as 2 ranks by tests/backend/test_distributed.py (models.distributed.run_local):
`conform EXCHANGE` runs the conformance corpus's routed-expert cases with the experts split
over the ranks; `diverge` gives the ranks different weights and checks World.full stops them.
Rank 0 prints the result."""

from __future__ import annotations

import sys

from moe_min.models import distributed


def conform(world, exchange: str) -> None:
    from moe_min.conformance.runner import Runner, failures, summary
    from moe_min.models.expert_parallel import ExpertParallelOps
    from moe_min.ops import get_backend

    ops = ExpertParallelOps(get_backend("mlx"), world, exchange)
    # the hooks are one process's (a sharded value_and_grad holds only this rank's experts'
    # gradients); the corpus rows are the layer's contract across the ranks
    rows = Runner(ops).include(r"^(token_choice|expert_choice|soft_moe)__").exclude(
        "^hook$").run()
    if world.rank == 0:
        print(failures(rows))
        print(summary(rows))


def diverge(world) -> None:
    mx = distributed.mlx_core()
    weights = {"w": mx.array([1.0, 2.0 + world.rank])}
    try:
        world.full(weights)
        caught = 0
    except ValueError as e:
        caught = 1
        print(e, file=sys.stderr)
    both = int(mx.distributed.all_sum(mx.array(caught), group=world.group).item())
    if world.rank == 0 and both == world.size:
        print("caught on both ranks")


if __name__ == "__main__":
    if sys.argv[1] == "--ranks":
        command = [sys.executable, __file__, *sys.argv[3:]]
        sys.exit(distributed.run_local(int(sys.argv[2]), command))
    world = distributed.join()
    conform(world, sys.argv[2]) if sys.argv[1] == "conform" else diverge(world)
