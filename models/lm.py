"""A byte-level decoder LM whose blocks are dense, token-choice MoE, expert-choice MoE or
Mixture-of-Depths, written once over the op contract (moe_min.ops), so it runs on every backend.

References: nanoGPT `model.py` (pre-norm blocks, tied head, scaled init of residual
projections); mlx-lm `models/mixtral.py`, `models/cache.py` and `generate.py` (KV cache, prefill
then one token per call); Mixture-of-Depths arXiv:2404.02258 §3.4-3.5 (x + r·f at the routed
tokens, a stop-gradient predictor for sampling); Expert Choice arXiv:2202.09368 §3.2;
shared/reference/mod_and_predictor.md §7 (the causal design with a sparse KV cache).

Modes. "train": training routing (top-k/top-C, capacity drops), noise drawn from `ops.normal`.
"eval": the same routing without noise. "causal": every routing decision depends on the token
alone, exactly as at sampling time, so no position reads a later one:
- expert choice and MoD: a token enters expert e / the routed block iff its predictor logit
  > threshold (or, causal="router", its router logit > 0); the combine weight stays the training
  one (gate, r or sigmoid(r));
- token choice: dropless. A capacity drop depends on how many *other* tokens of the group chose
  the expert (earlier and later ones), so it is not causal; without capacity each token's top-K
  is its own. Routing groups play no part in causal mode (each token is alone).
How many tokens a causal decision routes is not known in advance, so the causal full forward
pads: each expert gets T slots, a MoD block T masked rows. It is for validation and prefill;
the compute saving of MoD shows in `decode`, where a skipped block does no work at all.
`decode` runs the causal path with a KV cache. A token that skips a MoD-routed block writes
nothing into that block's cache; attention there sees only the tokens that entered it, keys
rotated at their true positions. MoD decodes batch 1 (rows route different tokens: ragged).

Shapes: B batch, T tokens, D model width, V vocab, E experts, N cached tokens, Hd heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from moe_min.layers import apply_mod, apply_slots, block_branch, experts, rms_norm
from moe_min.models.configs import LMConfig
from moe_min.ops import Array, Ops
from moe_min.routing import causal_decisions, route
from moe_min.spec import ExpertChoice, ExpertMLP, TokenChoice

MODES = ("train", "eval", "causal")


# ---- parameters --------------------------------------------------------------------------

def init_normal(rng, shape, std: float) -> np.ndarray:
    """N(0, std²) float32 draws."""
    return (rng.standard_normal(shape) * std).astype(np.float32)


def attention_params(rng, dim: int, out_std: float) -> dict[str, np.ndarray]:
    """The attention half of a block, and both norm gains."""
    ones = np.ones(dim, np.float32)
    out = {"norm1": ones, "norm2": ones.copy(), "attn.wo": init_normal(rng, (dim, dim), out_std)}
    return {**out, **{f"attn.w{n}": init_normal(rng, (dim, dim), 0.02) for n in "qkv"}}


def mlp_params(rng, prefix: str, spec: ExpertMLP, dim: int, out_std: float, lead=()) -> dict:
    """w1 (.., D, H), w2 (.., H, D), w3 with glu; `lead` = (E,) stacks experts."""
    out = {f"{prefix}w1": init_normal(rng, (*lead, dim, spec.hidden), 0.02),
           f"{prefix}w2": init_normal(rng, (*lead, spec.hidden, dim), out_std)}
    if spec.glu:
        out[f"{prefix}w3"] = init_normal(rng, (*lead, dim, spec.hidden), 0.02)
    return out


def _predictor_params(rng, predictor, dim: int, outputs: int, base_rate: float) -> dict:
    """D -> hidden -> outputs; the output bias starts at the logit of the routed base rate."""
    hidden = predictor.width(dim)
    rate = min(max(base_rate, 1e-3), 1 - 1e-3)
    return {"predictor_w1": init_normal(rng, (dim, hidden), math.sqrt(2.0 / dim)),
            "predictor_b1": np.zeros(hidden, np.float32),
            "predictor_w2": init_normal(rng, (hidden, outputs), 0.02),
            "predictor_b2": np.full(outputs, math.log(rate / (1 - rate)), np.float32)}


def init_params(config: LMConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 parameters by stable name: `embed` (V, D), `blocks.{i}.norm1|norm2`,
    `blocks.{i}.attn.wq|wk|wv|wo`, `blocks.{i}.mlp.w1|w2[|w3]` (dense and MoD blocks),
    `blocks.{i}.moe.router_w` (D, E) and `blocks.{i}.moe.expert_w1|w2[|w3]` (E, ..),
    `blocks.{i}.mod.router_w` (D,), `blocks.{i}.predictor_w1|b1|w2|b2` (each routed block its
    own, P15/P18), `norm_f`, and `head` (D, V) unless embeddings are tied."""
    rng = np.random.default_rng(seed)
    D, out_std = config.dim, 0.02 / math.sqrt(2 * config.layers)  # nanoGPT c_proj init
    params = {"embed": init_normal(rng, (config.vocab, D), 0.02), "norm_f": np.ones(D, np.float32)}
    if not config.tie_embeddings:
        params["head"] = init_normal(rng, (D, config.vocab), 0.02)
    for i in range(config.layers):
        kind, block = config.block_kind(i), attention_params(rng, D, out_std)
        if kind == "moe":
            E = config.moe.num_experts
            block["moe.router_w"] = init_normal(rng, (D, E), 0.02)  # small: near-uniform gates
            block.update(mlp_params(rng, "moe.expert_", config.expert, D, out_std, (E,)))
            if isinstance(config.moe, ExpertChoice) and config.moe.predictor is not None:
                rate = config.moe.capacity_factor / E
                block.update(_predictor_params(rng, config.moe.predictor, D, E, rate))
        else:
            block.update(mlp_params(rng, "mlp.", config.mlp, D, out_std))
        if kind == "mod":
            block["mod.router_w"] = init_normal(rng, (D,), 0.02)  # small: r·f starts near 0
            if config.mod.predictor is not None:
                block.update(_predictor_params(rng, config.mod.predictor, D, 1,
                                               config.mod.capacity))
        params.update({f"blocks.{i}.{name}": value for name, value in block.items()})
    return params


def layer_params(params: dict, i: int) -> dict:
    """Block i's parameters under the names moe_min.layers and routing read
    (docs/conventions.md): attn.wq -> block_wq, mlp.w1 -> block_w1, moe.router_w -> router_w."""
    prefix, out = f"blocks.{i}.", {}
    for name, value in params.items():
        if name.startswith(prefix):
            group, _, leaf = name[len(prefix):].rpartition(".")
            in_block = group in ("attn", "mlp") or leaf.startswith("norm")
            out[f"block_{leaf}" if in_block else leaf] = value
    return out


# ---- KV cache ----------------------------------------------------------------------------

@dataclass
class BlockCache:
    """One block's cache: keys (rotated at their true positions) and values of exactly the
    tokens that entered the block. `positions` (B, N) are those true positions, increasing."""

    k: Array | None = None  # (B, Hd, N, D/Hd)
    v: Array | None = None
    positions: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.int64))

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def hook(self, ops: Ops):
        """The `kv` callable of layers.block_branch: attend over cached + new keys, then store
        the new ones (every row is a real token: `block` passes no padding with a cache)."""

        def kv(k, v, positions, valid):
            self.k = k if self.k is None else ops.concatenate([self.k, k], axis=2)
            self.v = v if self.v is None else ops.concatenate([self.v, v], axis=2)
            self.positions = np.concatenate([self.positions, ops.to_numpy(positions)], axis=1)
            every = ops.asarray(self.positions, "int")
            return self.k, self.v, every, every >= 0

        return kv


def new_cache(config: LMConfig, batch: int = 1) -> list[BlockCache]:
    """An empty cache, one `BlockCache` per block. MoD configs decode batch 1 only."""
    if config.mod is not None and batch != 1:
        raise ValueError(f"new_cache: batch {batch} with MoD blocks: each sequence routes "
                         f"different tokens into a routed block, so decode batch 1")
    return [BlockCache(positions=np.zeros((batch, 0), np.int64)) for _ in range(config.layers)]


# ---- model -------------------------------------------------------------------------------

def _stats(ops: Ops, plan, tokens: int) -> dict:
    """A routed block's report: stats, aux terms and total, routed fraction, predictor."""
    out = {**plan.stats, "aux": plan.aux["total"],
           "aux_terms": {k: v for k, v in plan.aux.items() if k != "total"},
           "routed_fraction": 1.0 - ops.astype(plan.stats["unrouted"], "float") / tokens}
    if plan.predictor:
        out["predictor_logits"] = plan.predictor["logits"]  # (B, T, O)
        out["predictor_targets"] = plan.predictor["targets"]  # training-mode choices
    return out


def _noise(ops: Ops, spec, shape, mode: str, noise: bool):
    """The spec's standard-normal draw in mode="train" (zeros when noise=False)."""
    kind = getattr(spec, "noise", "none")
    if mode != "train" or kind == "none":
        return None
    B, T, D = shape
    draw = (B, T, D) if kind == "jitter" else (B, T, spec.num_experts)
    return ops.normal(draw) if noise else ops.zeros(draw)


def _moe(ops: Ops, config: LMConfig, params: dict, u: Array, mode: str, noise: bool):
    """The MoE FFN on the normed stream u (B, T, D) -> (y, stats)."""
    spec, route_mode = config.moe, mode
    if mode == "causal":  # per-token decisions: groups play no part (module docstring)
        spec = replace(spec, group="sequence", group_size=0)
        if isinstance(spec, TokenChoice):  # dropless is causal; route() has no causal TC
            spec, route_mode = replace(spec, capacity="dropless", expert_capacity=0), "eval"
    B, T, D = u.shape
    plan = route(spec, u, params, ops, mode=route_mode, noise=_noise(ops, spec, u.shape, mode,
                                                                     noise), validate=False)
    G, S = plan.groups
    y = apply_slots(ops, lambda h: experts(ops, config.expert, params, h),
                    ops.reshape(u, (G, S, D)), plan)
    return ops.reshape(y, (B, T, D)), _stats(ops, plan, B * T)


def _enters(ops: Ops, spec, params: dict, x: Array) -> bool:
    """Does any token of x enter this MoD block at sampling time? One small host read."""
    decided = causal_decisions(ops, spec, params, x)
    return bool(ops.to_numpy(ops.sum(ops.astype(decided, "int"))) > 0)


def block(ops: Ops, config: LMConfig, params: dict, i: int, x: Array, positions: Array, *,
          mode: str = "eval", noise: bool = True, cache: BlockCache | None = None):
    """Block i on x (B, T, D) at true `positions` (B, T) -> (y, stats); stats {} if dense.
    params: backend arrays by model name. dense/MoE: y = h + ffn(norm2 h), h = x + attn(norm1 x);
    MoD: y = x + weight(r)·f(x) at the routed tokens, x elsewhere (layers.apply_mod)."""
    kind, p = config.block_kind(i), layer_params(params, i)
    shape = {"heads": config.heads, "rope_base": config.rope_base, "norm_eps": config.norm_eps,
             "mlp": config.mlp}
    kv = None if cache is None else cache.hook(ops)
    if kind == "mod":
        if cache is not None and not _enters(ops, config.mod, p, x):
            return x, {}  # decode: skipped before any routing work, nothing cached (P1)
        plan = route(config.mod, x, p, ops, mode=mode, validate=False)
        stats = _stats(ops, plan, x.shape[0] * x.shape[1])
        if cache is not None:  # decode, batch 1: run the routed tokens only (they come first)
            routed = int(ops.to_numpy(plan.stats["load"]).sum())  # > 0: _enters said so
            plan.slot_token, plan.slot_weight = (plan.slot_token[..., :routed],
                                                 plan.slot_weight[..., :routed])
        return apply_mod(ops, shape, p, x, plan, positions=positions, kv=kv), stats
    stats = {}

    def ffn(u):
        y, found = _moe(ops, config, p, u, mode, noise)
        stats.update(found)
        return y

    valid = positions >= 0
    f = block_branch(ops, shape, p, x, positions, valid, ffn=ffn if kind == "moe" else None, kv=kv)
    return x + f, stats


def _run(ops: Ops, config: LMConfig, params: dict, tokens, mode: str, noise: bool,
         cache: list[BlockCache] | None = None, start: int = 0):
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    p = {name: ops.asarray(value) for name, value in params.items()}
    tokens = ops.asarray(tokens, "int")
    B, T = tokens.shape
    x = ops.take(p["embed"], tokens, axis=0)  # (B, T, D)
    positions = ops.broadcast_to(ops.reshape(ops.arange(T) + start, (1, T)), (B, T))
    aux, blocks = ops.zeros(()), {}
    for i in range(config.layers):
        x, stats = block(ops, config, p, i, x, positions, mode=mode, noise=noise,
                         cache=None if cache is None else cache[i])
        if stats:
            aux, blocks[i] = aux + stats["aux"], stats
    x = rms_norm(ops, x, p["norm_f"], config.norm_eps)
    head = ops.transpose(p["embed"], (1, 0)) if config.tie_embeddings else p["head"]
    return x @ head, {"aux": aux, "blocks": blocks}  # logits (B, T, V)


def forward(ops: Ops, config: LMConfig, params: dict, tokens, *, mode: str = "train",
            noise: bool = True):
    """Logits (B, T, V) for byte `tokens` (B, T), and info: `aux` (Σ aux/total over routed
    blocks, a backend scalar) and `blocks` {i: stats} for each routed block: `load`,
    `dropped`, `unrouted`, `experts_per_token` (B, T), `routed_fraction`, `aux`, `aux_terms`,
    and with a predictor `predictor_logits` / `predictor_targets` (B, T, O).

    Args:
        mode: "train" | "eval" | "causal" (module docstring). noise: draw training noise in
            mode="train" (False: zeros).
    """
    return _run(ops, config, params, tokens, mode, noise)


def loss(ops: Ops, config: LMConfig, params: dict, tokens, targets, *, mode: str = "train",
         noise: bool = True):
    """(mean cross-entropy in nats/byte + aux, metrics {"ce", "aux", "blocks"})."""
    logits, info = forward(ops, config, params, tokens, mode=mode, noise=noise)
    B, T, V = logits.shape
    targets = ops.reshape(ops.asarray(targets, "int"), (B, T, 1))
    picked = ops.reshape(ops.take_along_axis(logits, targets, axis=-1), (B, T))
    ce = ops.mean(ops.logsumexp(logits, axis=-1) - picked)
    return ce + info["aux"], {"ce": ce, "aux": info["aux"], "blocks": info["blocks"]}


def decode(ops: Ops, config: LMConfig, params: dict, tokens, cache: list[BlockCache],
           start: int):
    """Logits (B, n, V) for `tokens` (B, n) at positions start.. start+n-1, through the causal
    path, reading and extending `cache` (updated in place and returned). Prefill is one call
    with the whole prompt; then one token per call."""
    batch = cache[0].positions.shape[0]
    if len(np.shape(tokens)) != 2 or np.shape(tokens)[0] != batch:
        raise ValueError(f"decode: tokens of shape {tuple(np.shape(tokens))}: expected "
                         f"(batch={batch}, n), the cache's batch")
    last = max((int(c.positions.max()) for c in cache if c.length), default=-1)
    if start <= last:
        raise ValueError(f"decode: start {start} but the cache already holds position {last}")
    logits, _ = _run(ops, config, params, tokens, "causal", False, cache, start)
    return logits, cache
