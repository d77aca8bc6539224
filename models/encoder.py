"""A non-causal byte encoder for masked-byte prediction whose MoE blocks are Soft MoE (arXiv:
2308.00951; vmoe `projects/soft_moe`), over the op contract. Soft MoE mixes every token of a
group into every slot, so it cannot serve a decoder (models/lm.py refuses it); an encoder that
sees the whole sequence is where it belongs. BERT-style objective (arXiv:1810.04805 §3.1),
simplified: ~15 % of the bytes are replaced by the mask id `vocab` and predicted.
"""

from __future__ import annotations

import math

import numpy as np

from moe_min.layers import block_branch, rms_norm
from moe_min.layers import forward as layer_forward
from moe_min.models.configs import EncoderConfig
from moe_min.models.lm import (attention_params, check_tokens, init_normal, layer_params,
                                mlp_params)
from moe_min.ops import Ops
from moe_min.routing import group_shape

__all__ = ["EncoderConfig", "init_params", "forward", "mask_positions", "loss"]


def init_params(config: EncoderConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32: `embed` (V + 1, D) with the mask id's row last, `blocks.{i}.norm1|norm2|attn.*`,
    `blocks.{i}.mlp.*` or (Soft MoE) `blocks.{i}.moe.slot_mu` (D, E, P), `.moe.slot_scale` (),
    `.moe.expert_w1|w2` (E, ..), `norm_f`. The output head is tied to the first V rows."""
    rng = np.random.default_rng(seed)
    D, out_std = config.dim, 0.02 / math.sqrt(2 * config.layers)
    params = {"embed": init_normal(rng, (config.vocab + 1, D), 0.02),
              "norm_f": np.ones(D, np.float32)}
    for i in range(config.layers):
        block = attention_params(rng, D, out_std)
        if config.is_moe(i):
            E, P = config.moe.num_experts, config.moe.slots_for(config.context)
            block["moe.slot_mu"] = init_normal(rng, (D, E, P), 1 / math.sqrt(D))  # LeCun (vmoe)
            block["moe.slot_scale"] = np.ones((), np.float32)
            block.update(mlp_params(rng, "moe.expert_", config.expert, D, out_std, (E,)))
        else:
            block.update(mlp_params(rng, "mlp.", config.mlp, D, out_std))
        params.update({f"blocks.{i}.{name}": value for name, value in block.items()})
    return params


def _every_key(k, v, positions, valid):
    """Non-causal attention through layers.block_branch's `kv` hook: keys are already rotated
    at their true positions, and attention masks key position > query position, so reporting
    every key at position 0 lets each query see every key."""
    return k, v, positions * 0, valid


def forward(ops: Ops, config: EncoderConfig, params: dict, tokens, *, mode: str = "train",
            noise: bool = True):
    """Logits (B, T, V) for `tokens` (B, T) (the mask id allowed), and info {"aux": scalar}.
    mode: "train" (Soft MoE noise, if its noise_std > 0) or "eval"."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode {mode!r}: expected 'train' or 'eval' (an encoder is not causal)")
    p = {name: ops.asarray(value) for name, value in params.items()}
    tokens = ops.asarray(check_tokens(tokens, config.context, config.vocab + 1), "int")
    B, T = tokens.shape
    x = ops.take(p["embed"], tokens, axis=0)  # (B, T, D)
    positions = ops.broadcast_to(ops.reshape(ops.arange(T), (1, T)), (B, T))
    shape = {"heads": config.heads, "rope_base": config.rope_base, "norm_eps": config.norm_eps,
             "mlp": config.mlp}
    aux = ops.zeros(())
    for i in range(config.layers):
        lp, ffn = layer_params(p, i), None
        if config.is_moe(i):
            def ffn(u, lp=lp):
                nonlocal aux
                out = layer_forward(config.moe, u, lp, ops, expert=config.expert, mode=mode,
                                    noise=_soft_noise(ops, config, u.shape, mode, noise))
                aux = aux + out["aux/total"]
                return out["y"]
        x = x + block_branch(ops, shape, lp, x, positions, positions >= 0, ffn=ffn, kv=_every_key)
    x = rms_norm(ops, x, p["norm_f"], config.norm_eps)
    return x @ ops.transpose(p["embed"][: config.vocab], (1, 0)), {"aux": aux}


def _soft_noise(ops: Ops, config: EncoderConfig, shape, mode: str, noise: bool):
    spec = config.moe
    if mode != "train" or spec.noise_std == 0:
        return None
    G, S = group_shape(spec, shape[0], shape[1])
    draw = (G, S, spec.num_experts * spec.slots_for(S))
    return ops.normal(draw) if noise else ops.zeros(draw)


def mask_positions(shape: tuple[int, int], mask_rate: float, seed: int) -> np.ndarray:
    """Which bytes are masked: a seeded Bernoulli(mask_rate) draw, at least one per batch."""
    if not 0 < mask_rate < 1:
        raise ValueError(f"mask_rate {mask_rate}: expected 0 < mask_rate < 1")
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < mask_rate
    if not mask.any():
        mask.flat[rng.integers(mask.size)] = True
    return mask


def loss(ops: Ops, config: EncoderConfig, params: dict, tokens, mask_rate: float = 0.15,
         seed: int = 0, *, mode: str = "train", noise: bool = True):
    """(mean cross-entropy over the masked bytes + aux, metrics {"ce", "aux", "mask",
    "masked"}). `tokens` (B, T) are the original bytes; the masked ones are replaced by the
    mask id (`config.vocab`) in the input and are the only targets counted."""
    tokens = tokens if isinstance(tokens, np.ndarray) else ops.to_numpy(tokens)
    mask = mask_positions(tokens.shape, mask_rate, seed)
    logits, info = forward(ops, config, params, np.where(mask, config.vocab, tokens), mode=mode,
                           noise=noise)
    B, T, V = logits.shape
    picked = ops.take_along_axis(logits, ops.asarray(tokens.reshape(B, T, 1), "int"), axis=-1)
    per_byte = ops.logsumexp(logits, axis=-1) - ops.reshape(picked, (B, T))
    weight = ops.asarray(mask.astype(np.float32)) / float(mask.sum())
    ce = ops.sum(per_byte * weight)
    return ce + info["aux"], {"ce": ce, "aux": info["aux"], "mask": mask,
                              "masked": int(mask.sum())}
