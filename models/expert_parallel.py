"""Expert parallel: each MoE layer's E experts split over the N ranks of a run (rank r holds
experts r·E/N .. (r+1)·E/N - 1, their weights and their AdamW moments), the tokens sent to the
rank that holds their expert and brought back.

Each rank routes its own tokens (the router is replicated, as in data parallel) and applies the
plan with layers.apply_slots exactly as one process does; only the experts run elsewhere. The
experts' padded buffers (E, M, D) (M = G·C + 1 rows per expert, one shape on every rank: the
shares are equal) go through an all-to-all: block s of E/N experts to rank s. Rank r then
runs its experts on every rank's rows (E/N, N·M, D), and a second all-to-all returns each
rank's rows. An all-to-all is its own transpose, so its VJP is the same exchange of the
cotangents: an expert's weight gradient, on its rank, holds every rank's tokens. Since the
objective is the mean of the ranks' losses, that gradient is divided by N, while replicated
weights are averaged with an all_sum (World.reduce); the gradient norm needs one all_sum of the
shards' squares (World.norm).

Exchange (measured on 2 ranks on loopback, README): `all_gather` (every rank gets every rank's
whole buffer and keeps the rows for its experts: (N-1)·|buffer| sent per rank), or `send/recv`
to the other rank ((N-1)/N·|buffer|, 2 ranks only: MLX's ring sends only to neighbours).
sum_scatter, the other half of a gather/scatter design, exists only on NCCL in MLX 0.32.
May import: anything but cli; mlx.core through models.distributed.
"""

from __future__ import annotations

from moe_min.models.distributed import World, mlx_core
from moe_min.routing import group_shape

EXCHANGES = ("all_gather", "send_recv")


def _exchange(mx, v, world: World, method: str):
    """out[s] = (v on rank s)[this rank], for v (N, ...) on every rank."""
    r, n, group = world.rank, world.size, world.group
    if method == "all_gather":
        every = mx.distributed.all_gather(v, group=group)  # (N·N, ...): rank s's v at s·N
        return mx.reshape(every, (n, n, *v.shape[1:]))[:, r]
    peer = 1 - r
    give = v[peer]
    # Both ranks sending first deadlocks once the socket buffers fill, so rank 0 sends, then
    # receives; rank 1 receives, then sends. A recv has no inputs to order it by: on rank 0
    # `depends(recv, send)` puts the send after the recv on MLX's tape, and the tape runs from
    # its end (mlx/transforms.cpp eval_impl), so the send goes first.
    if r == 0:
        sent = mx.distributed.send(give, peer, group=group)
        got = mx.depends(mx.distributed.recv_like(give, peer, group=group), sent)
    else:
        got = mx.distributed.recv_like(give, peer, group=group)
        sent = mx.distributed.send(mx.depends(give, got), peer, group=group)
        got = mx.depends(got, sent)
    pair = [v[r], got] if r == 0 else [got, v[r]]
    return mx.stack(pair)


def default_exchange(ranks: int) -> str:
    """send/recv on 2 ranks: 1.4-3x faster than all_gather there (scripts/bench_distributed.py,
    forward and backward of tiny-moe's and small-moe's buffers on loopback)."""
    return "send_recv" if ranks == 2 else "all_gather"


def all_to_all(v, world: World, method: str = "all_gather"):
    """The all-to-all of v (N, ...) over the world's ranks, differentiable (its VJP is the
    all-to-all of the cotangent)."""
    if method not in EXCHANGES or (method == "send_recv" and world.size != 2):
        raise ValueError(f"exchange {method!r} on {world.size} ranks: expected all_gather, or "
                         "send_recv on 2 ranks")
    mx = mlx_core()

    @mx.custom_function
    def exchange(x):
        return _exchange(mx, x, world, method)

    @exchange.vjp
    def exchange_vjp(primals, cotangent, output):
        # After the forward exchange, whatever else the cotangent needs: every rank must run
        # its exchanges in one order, and a cotangent may not depend on the forward's result
        # (Soft MoE's combine is linear), leaving MLX free to schedule either first.
        return (_exchange(mx, mx.depends(cotangent, output), world, method),)

    return exchange(v)


def _block(mx, w, start: int, count: int):
    """w[start:start + count] along the expert axis, padded with zeros past the end of w."""
    block = w[start:start + count]
    missing = count - block.shape[0]
    if missing == 0:
        return block
    return mx.concatenate([block, mx.zeros((missing, *w.shape[1:]), w.dtype)])


class ExpertParallelOps:
    """The backend `inner` with the optional op expert_mlp run over the ranks; every other op
    is inner's. grouped_mlp is hidden: its sorted rows are not split by expert block, so
    dropless plans run on padded buffers here. `grad` (the conformance runner's hook, every
    rank running the same case) averages each gradient over the ranks, which leaves replicated
    gradients as they are and gives each expert block the gradient its rank computed, /N."""

    def __init__(self, inner, world: World, exchange: str | None = None):
        self.inner, self.world = inner, world
        self.exchange = exchange or default_exchange(world.size)

    def __getattr__(self, name: str):
        if name == "grouped_mlp":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def expert_mlp(self, h, w1, w2, w3, act):
        """h (E, M, D): every expert's buffer of this rank's tokens -> (E, M, D). The weights
        are this rank's E/N experts (training), or all E: then rank r runs block r of
        ceil(E/N) experts, the last block padded with experts that get only zero rows (the
        conformance corpus has E = 3 on 2 ranks)."""
        mx, n, r = mlx_core(), self.world.size, self.world.rank
        E, M, D = h.shape
        local = -(-E // n)
        if w1.shape[0] == E:  # padded alike on every rank: one graph, one collective order
            w1, w2, w3 = (None if w is None else _block(mx, w, 0, local * n)[r * local:
                                                                            (r + 1) * local]
                          for w in (w1, w2, w3))
        elif E % n or w1.shape[0] != E // n:
            raise NotImplementedError(f"expert_mlp: {w1.shape[0]} of {E} experts on each of "
                                      f"{n} ranks: expected E/N or all of them")
        h = _block(mx, h, 0, local * n)  # zero rows for the padding experts
        rows = all_to_all(mx.reshape(h, (n, local, M, D)), self.world, self.exchange)
        rows = mx.reshape(mx.transpose(rows, (1, 0, 2, 3)), (local, n * M, D))  # every rank's
        a = act(rows @ w1)
        out = (a * (rows @ w3) if w3 is not None else a) @ w2
        out = mx.transpose(mx.reshape(out, (local, n, M, D)), (1, 0, 2, 3))  # by rank
        return mx.reshape(all_to_all(out, self.world, self.exchange), (local * n, M, D))[:E]

    def grad(self, fn, params: dict, x) -> dict:
        mx = mlx_core()
        grads = self.inner.grad(fn, params, x)
        return {k: mx.distributed.all_sum(g, group=self.world.group) / self.world.size
                for k, g in grads.items()}


def exchange_bytes(config, local_batch: int, ranks: int, method: str | None = None) -> float:
    """Bytes one rank sends per training step in the experts' all-to-alls: four exchanges of
    the (E, G·C + 1, D) float32 buffers per MoE layer (to the experts and back, forward and
    backward)."""
    spec, total, method = config.moe, 0.0, method or default_exchange(ranks)
    for block in range(config.layers):
        if not config.is_moe(block):
            continue
        G, S = group_shape(spec, local_batch, config.context)
        rows = G * spec.slots(S) + 1
        buffer = 4 * spec.num_experts * rows * config.dim
        total += 4 * (buffer * (ranks - 1) if method == "all_gather" else
                      buffer * (ranks - 1) / ranks)
    return total
