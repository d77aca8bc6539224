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
the compute saving of MoD shows in decoding (models/decode.py), where a skipped block can do
no work at all. A token that skips a MoD-routed block writes nothing into that block's cache;
attention there sees only the tokens that entered it, keys rotated at their true positions.
MoD decodes batch 1 (rows route different tokens: ragged).

Shapes: B batch, T tokens, D model width, V vocab, E experts, N cached tokens, Hd heads.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from moe_min.layers import apply_experts, apply_mod, block_branch, rms_norm
from moe_min.models.configs import LMConfig
from moe_min.ops import Array, Ops
from moe_min.routing import route
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
    y = apply_experts(ops, config.expert, params, ops.reshape(u, (G, S, D)), plan)
    return ops.reshape(y, (B, T, D)), _stats(ops, plan, B * T)


def block(ops: Ops, config: LMConfig, params: dict, i: int, x: Array, positions: Array, *,
          mode: str = "eval", noise: bool = True, kv=None):
    """Block i on x (B, T, D) at true `positions` (B, T) -> (y, stats); stats {} if dense.
    params: backend arrays by model name. dense/MoE: y = h + ffn(norm2 h), h = x + attn(norm1 x);
    MoD: y = x + weight(r)·f(x) at the routed tokens, x elsewhere (layers.apply_mod).
    kv: the attention's cache hook (layers.block_branch; models/decode.py writes one)."""
    kind, p = config.block_kind(i), layer_params(params, i)
    shape = {"heads": config.heads, "rope_base": config.rope_base, "norm_eps": config.norm_eps,
             "mlp": config.mlp}
    if kind == "mod":
        plan = route(config.mod, x, p, ops, mode=mode, validate=False)
        stats = _stats(ops, plan, x.shape[0] * x.shape[1])
        return apply_mod(ops, shape, p, x, plan, positions=positions, kv=kv), stats
    stats = {}

    def ffn(u):
        y, found = _moe(ops, config, p, u, mode, noise)
        stats.update(found)
        return y

    valid = positions >= 0
    f = block_branch(ops, shape, p, x, positions, valid, ffn=ffn if kind == "moe" else None, kv=kv)
    return x + f, stats


def embed(ops: Ops, params: dict, tokens: Array) -> Array:
    """Token embeddings (B, T, D) of int `tokens` (B, T)."""
    return ops.take(params["embed"], tokens, axis=0)


def head(ops: Ops, config: LMConfig, params: dict, x: Array) -> Array:
    """Logits (B, T, V) of the last block's output x (B, T, D)."""
    x = rms_norm(ops, x, params["norm_f"], config.norm_eps)
    w = ops.transpose(params["embed"], (1, 0)) if config.tie_embeddings else params["head"]
    return x @ w


def check_tokens(tokens, context: int, vocab: int, what: str = "tokens"):
    """Before the embedding gather (MLX reads out of bounds, silently): (B, T) with
    1 <= T <= context and, for ids on the host (a list, a NumPy array), integers in
    0..vocab-1. A backend array (inside a jitted step) has only its shape checked."""
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens)
    shape = tuple(getattr(tokens, "shape", ()))
    if len(shape) != 2 or not (shape[0] >= 1 and 1 <= shape[1] <= context):
        raise ValueError(f"{what} have shape {shape}: expected (B, T) with B >= 1 and "
                         f"1 <= T <= {context} (the context)")
    if isinstance(tokens, np.ndarray):
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"{what} are {tokens.dtype}: expected integer ids")
        if not (tokens.min() >= 0 and tokens.max() < vocab):
            raise ValueError(f"{what}: ids {tokens.min()}..{tokens.max()}: expected 0.."
                             f"{vocab - 1} (the vocabulary)")
    return tokens


def _run(ops: Ops, config: LMConfig, params: dict, tokens, mode: str, noise: bool):
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    p = {name: ops.asarray(value) for name, value in params.items()}
    tokens = ops.asarray(check_tokens(tokens, config.context, config.vocab), "int")
    B, T = tokens.shape
    x = embed(ops, p, tokens)
    positions = ops.broadcast_to(ops.reshape(ops.arange(T), (1, T)), (B, T))
    aux, blocks = ops.zeros(()), {}
    for i in range(config.layers):
        x, stats = block(ops, config, p, i, x, positions, mode=mode, noise=noise)
        if stats:
            aux, blocks[i] = aux + stats["aux"], stats
    return head(ops, config, p, x), {"aux": aux, "blocks": blocks}  # logits (B, T, V)


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
    targets = check_tokens(targets, config.context, config.vocab, "targets")
    targets = ops.reshape(ops.asarray(targets, "int"), (B, T, 1))
    picked = ops.reshape(ops.take_along_axis(logits, targets, axis=-1), (B, T))
    ce = ops.mean(ops.logsumexp(logits, axis=-1) - picked)
    return ce + info["aux"], {"ce": ce, "aux": info["aux"], "blocks": info["blocks"]}
