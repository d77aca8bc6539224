"""A layer call's inputs (`moe_min.layers.forward`) checked against its spec before any array is
made or gathered: the spec's type, x's shape and dtype, every parameter the scheme reads with
its shape (docs/conventions.md), the training noise, and the size of the plan. A wrong shape
otherwise surfaced as a framework's matmul or reshape error, a missing weight as a KeyError,
an absurd capacity as a MemoryError. May import: moe_min.spec, moe_min.routing, helpers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from moe_min.helpers import check_fits
from moe_min.routing import group_shape
from moe_min.spec import ExpertChoice, ExpertMLP, MixtureOfDepths, SoftMoE, TokenChoice

SCHEMES = (TokenChoice, ExpertChoice, SoftMoE, MixtureOfDepths)


def _shape(name: str, a, kind: type) -> tuple[int, ...]:
    """a's shape, once it is a float array of the backend (`kind`, its arrays' type)."""
    if not isinstance(a, kind):
        raise TypeError(f"{name} is a {type(a).__module__}.{type(a).__name__}: expected an array "
                        f"of the backend, {kind.__module__}.{kind.__name__} (ops.asarray)")
    dtype = str(a.dtype)
    if "float" not in dtype and "half" not in dtype:
        raise TypeError(f"{name} is {dtype}: expected a float array")
    return tuple(int(n) for n in a.shape)


def _expected(spec, D: int, S: int, expert, block) -> dict[str, tuple[int, ...]]:
    """name -> shape of every parameter `spec` reads (docs/conventions.md, "Parameters")."""
    E = getattr(spec, "num_experts", 1)
    want = {"router_w": (D,) if isinstance(spec, MixtureOfDepths) else (D, E)}
    if not isinstance(spec, MixtureOfDepths):
        if not isinstance(expert, ExpertMLP):
            raise TypeError(f"expert={expert!r}: {type(spec).__name__} needs an ExpertMLP")
        H = expert.hidden
        want = {**({} if isinstance(spec, SoftMoE) else want), "expert_w1": (E, D, H),
                "expert_w2": (E, H, D), **({"expert_w3": (E, D, H)} if expert.glu else {})}
    if isinstance(spec, SoftMoE):
        want.update(slot_mu=(D, E, spec.slots_for(S)), slot_scale=())
    predictor = getattr(spec, "predictor", None)
    if predictor is not None:
        Hp, O = predictor.width(D), 1 if isinstance(spec, MixtureOfDepths) else E
        want.update(predictor_w1=(D, Hp), predictor_b1=(Hp,), predictor_w2=(Hp, O),
                    predictor_b2=(O,))
    if isinstance(spec, MixtureOfDepths):
        keys = {"heads", "norm_eps", "rope_base", "mlp"}
        if not isinstance(block, Mapping) or not keys <= set(block) or \
                not isinstance(block["mlp"], ExpertMLP) or D % block["heads"]:
            raise ValueError(f"block={block!r}: MixtureOfDepths needs a dict of {sorted(keys)} "
                             f"(mlp an ExpertMLP, heads dividing D={D})")
        H = block["mlp"].hidden
        want.update({f"block_w{n}": (D, D) for n in "qkvo"}, block_norm1=(D,), block_norm2=(D,),
                    block_w1=(D, H), block_w2=(H, D), **({"block_w3": (D, H)}
                                                         if block["mlp"].glu else {}))
    return want


def _noise_size(spec, B: int, T: int, D: int, S: int) -> int:
    """Elements of the standard-normal draw mode="train" reads (0: none)."""
    E, noise = getattr(spec, "num_experts", 1), getattr(spec, "noise", "none")
    if isinstance(spec, SoftMoE):
        return B * T * E * spec.slots_for(S) if spec.noise_std > 0 else 0
    return {"additive": B * T * E, "jitter": B * T * D}.get(noise, 0)


def check_layer_inputs(ops, spec, x, params, expert, block, mode: str, noise,
                       x_predictor) -> None:
    """One line (TypeError or ValueError) naming the input and what is accepted."""
    kind = type(ops.zeros((1,)))
    if not isinstance(spec, SCHEMES):
        raise TypeError(f"spec is {type(spec).__name__}: expected one of "
                        f"{', '.join(c.__name__ for c in SCHEMES)}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params is {type(params).__name__}: expected a dict of arrays by name")
    shape = _shape("x", x, kind)
    if len(shape) not in (2, 3) or 0 in shape:
        raise ValueError(f"x has shape {shape}: expected (B, T, D) or (T, D), none of them 0")
    B, T, D = (1, *shape) if len(shape) == 2 else shape
    if x_predictor is not None and _shape("x_predictor", x_predictor, kind) != shape:
        raise ValueError(f"x_predictor has shape {tuple(x_predictor.shape)}: expected x's, "
                         f"{shape}")
    G, S = (B, T) if isinstance(spec, MixtureOfDepths) else group_shape(spec, B, T)
    want = _expected(spec, D, S, expert, block)
    for name, expected in want.items():
        if name not in params:
            raise ValueError(f"params has no {name!r}: {type(spec).__name__} reads "
                             f"{', '.join(want)}")
        got = _shape(name, params[name], kind)
        if got != expected:
            raise ValueError(f"{name} has shape {got}: expected {expected} for x of shape "
                             f"{shape} under this spec (docs/conventions.md)")
    need = _noise_size(spec, B, T, D, S) if mode == "train" else 0
    if need and noise is not None and math.prod(_shape("noise", noise, kind)) != need:
        raise ValueError(f"noise has shape {tuple(noise.shape)}: expected {need} standard-normal "
                         f"draws (docs/conventions.md, 'Noise draws')")
    _check_plan_fits(spec, G, S, D)


def _check_plan_fits(spec, G: int, S: int, D: int) -> None:
    E = getattr(spec, "num_experts", 1)
    if isinstance(spec, SoftMoE):
        P = spec.slots_for(S)
        floats, what = G * E * P * (2 * S + D), f"{E} experts x {P} slots"
    elif isinstance(spec, MixtureOfDepths):
        floats, what = G * S * (D + 4), "the routed tokens"
    else:
        C = spec.slots(S)
        floats, what = G * S * E + G * (E * C + 1) * (D + 2), f"{E} experts x capacity {C:.3g}"
    check_fits(8 * 4 * floats, f"the plan of {type(spec).__name__} ({what}, {G} group(s) of "
               f"{S} tokens, D={D})", "lower the capacity or num_experts")
