"""The routing specification: what the user wants, as plain frozen data.

One dataclass per scheme (`TokenChoice`, `ExpertChoice`, `SoftMoE`, `MixtureOfDepths`), plus
`Predictor` (the causal router used at sampling time) and `ExpertMLP` (the expert function).
Every knob that differs between the reference implementations is a named field; the default
is the common reference value, and each field's comment names the reference it follows
(`shared/reference/routing_semantics.md` §6). Validation happens at construction: an error
names the class, the field, the bad value and the accepted range. May import: stdlib only.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Literal, Union

Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
Group = Literal["sequence", "batch", "fixed"]


class SpecError(ValueError):
    """A spec value outside its accepted range."""


def _fail(obj, name: str, value, accepted: str):
    raise SpecError(f"{type(obj).__name__}.{name} = {value!r}: expected {accepted}")


def _check_type(obj, name: str, value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            _fail(obj, name, value, "one of " + ", ".join(repr(a) for a in args))
    elif origin in (Union, types.UnionType):
        for arm in args:
            try:
                return _check_type(obj, name, value, arm)
            except SpecError:
                pass
        _fail(obj, name, value, " or ".join(getattr(a, "__name__", str(a)) for a in args))
    elif hint is type(None):
        if value is not None:
            _fail(obj, name, value, "None")
    elif hint is bool:
        if not isinstance(value, bool):
            _fail(obj, name, value, "True or False")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(obj, name, value, "an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(obj, name, value, "a number")
        try:
            value = float(value)  # 1 and 1.0 must serialise the same
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            _fail(obj, name, getattr(obj, name), "a finite number")
        object.__setattr__(obj, name, value)
    elif isinstance(hint, type) and not isinstance(value, hint):
        _fail(obj, name, value, f"a {hint.__name__}")


class _Spec:
    """Shared behaviour: type checks from the annotations, range checks, strict JSON."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_type(self, f.name, getattr(self, f.name), hints[f.name])
        self._validate()

    def _validate(self):
        pass

    def _at_least(self, name: str, low):
        if getattr(self, name) < low:
            _fail(self, name, getattr(self, name), f">= {low}")

    def _positive(self, name: str):
        if not getattr(self, name) > 0:
            _fail(self, name, getattr(self, name), "> 0")

    def to_dict(self) -> dict:
        out = {"kind": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _Spec) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _capacity(obj, num_tokens: int, num_experts: int) -> int:
    """Slots per expert from a factor (vmoe `compute_capacity`), or the explicit value. The
    factor is applied in floating point left to right, as vmoe does: 100*1.1/10 is
    11.000000000000002, so its ceil is 12."""
    if obj.capacity == "fixed":
        return obj.expert_capacity
    raw = num_tokens * obj.capacity_factor / num_experts
    slots = math.ceil(raw) if obj.capacity_rounding == "ceil" else round(raw)  # round: half-even
    slots = max(slots, obj.min_capacity)
    return slots + (-slots) % obj.capacity_multiple_of


@dataclass(frozen=True)
class ExpertMLP(_Spec):
    """Each expert's function: `act(x @ w1) @ w2`, or `(silu(x @ w1) * (x @ w3)) @ w2` when
    `glu` (SwiGLU, Mixtral). No biases (Mixtral, mlx-lm). `gelu` is exact (erf); `gelu_tanh`
    the tanh form (tinygrad's `gelu`, mlx's `gelu_approx`); they differ by up to 5e-4."""

    hidden: int = 4 * 128
    activation: Activation = "relu"  # cheap on CPU (reference/backends.md §1)
    glu: bool = False

    def _validate(self):
        self._at_least("hidden", 1)
        if self.glu and self.activation != "silu":
            _fail(self, "activation", self.activation, "'silu' when glu=True (SwiGLU)")


@dataclass(frozen=True)
class Predictor(_Spec):
    """The small MLP that decides routing causally at sampling time: D -> hidden -> out,
    trained beside the main loss with binary cross-entropy on "was this token chosen in
    training mode", its input under stop-gradient (arXiv:2404.02258 §3.5). A token is routed
    iff the predictor's logit exceeds `threshold` (0 ⇔ sigmoid > 0.5)."""

    hidden: int = 0  # 0: D // 2, as in the D -> D/2 -> 1 predictor of kyegomez/Mixture-of-Depths
    activation: Activation = "relu"
    threshold: float = 0.0
    loss_coef: float = 1.0  # only scales the predictor's own update: its input is stop-gradient

    def _validate(self):
        self._at_least("hidden", 0)
        self._at_least("loss_coef", 0.0)

    def width(self, model_dim: int) -> int:
        return self.hidden or max(1, model_dim // 2)


@dataclass(frozen=True)
class TokenChoice(_Spec):
    """Each token picks its top-K experts (Switch, GShard, V-MoE, Mixtral).

    gate: softmax over all E then top-K (vmoe, Switch, Mixtral), or an independent sigmoid
    per expert (DeepSeek-V3 style). Ties: lower expert index first. Capacity per expert per
    group: `ceil|round(S*K*capacity_factor/E)`, at least `min_capacity`, rounded up to
    `capacity_multiple_of`; or `expert_capacity` ("fixed"); or none ("dropless", Mixtral).
    Choices claim slots in k-major order (every first choice before any second choice), tokens
    ordered by position or, with drop_priority="score", by descending top-1 gate with a stable
    sort (V-MoE's batch-prioritised routing). A choice past capacity drops; nothing re-routes.
    """

    num_experts: int = 8
    top_k: int = 2  # GShard, V-MoE, Mixtral (Switch: 1)
    gate: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = False  # vmoe, Switch (Mixtral: True)
    capacity: Literal["factor", "fixed", "dropless"] = "factor"
    capacity_factor: float = 1.25  # Switch §2.2
    capacity_rounding: Literal["ceil", "round"] = "ceil"  # vmoe
    capacity_multiple_of: int = 4  # vmoe
    min_capacity: int = 1  # vmoe raises on 0; we clamp so a short group never fails
    expert_capacity: int = 0  # with capacity="fixed" (HF Switch `expert_capacity`)
    group: Group = "sequence"  # HF Switch: each sequence is a group
    group_size: int = 0  # with group="fixed" (vmoe's fixed-size groups)
    drop_priority: Literal["position", "score"] = "position"  # Switch, HF, vmoe default
    noise: Literal["none", "additive", "jitter"] = "none"
    noise_std: float = 1.0  # additive: sigma = noise_std / E on the logits (V-MoE)
    jitter_eps: float = 0.01  # jitter: router input * U(1-eps, 1+eps) (Switch)
    load_balance_coef: float = 0.01  # Switch alpha
    load_balance_counting: Literal["top1", "all_k"] = "top1"  # Switch/GShard (Mixtral: all_k)
    z_loss_coef: float = 0.0  # ST-MoE uses 1e-3
    importance_coef: float = 0.0  # V-MoE paper configs: 0.005
    load_coef: float = 0.0  # V-MoE, needs additive noise

    def _validate(self):
        self._at_least("num_experts", 1)
        if not 1 <= self.top_k <= self.num_experts:
            _fail(self, "top_k", self.top_k, f"1 <= top_k <= num_experts ({self.num_experts})")
        _validate_capacity(self)
        _validate_group(self)
        _validate_noise_std(self)
        jitter = self.noise == "jitter"  # unused without jitter: 0 is then allowed
        if not (0 < self.jitter_eps < 1 if jitter else 0 <= self.jitter_eps < 1):
            _fail(self, "jitter_eps", self.jitter_eps, "0 < jitter_eps < 1 when noise='jitter'"
                  if jitter else "0 <= jitter_eps < 1")
        for name in ("load_balance_coef", "z_loss_coef", "importance_coef", "load_coef"):
            self._at_least(name, 0.0)
        if self.load_coef > 0 and self.noise != "additive":
            _fail(self, "load_coef", self.load_coef, "0 unless noise='additive' (V-MoE)")

    def slots(self, group_tokens: int) -> int:
        """Capacity C for a group of `group_tokens` tokens; dropless: every token fits."""
        if self.capacity == "dropless":
            return group_tokens
        return _capacity(self, group_tokens * self.top_k, self.num_experts)


def _validate_capacity(spec):
    spec._positive("capacity_factor")
    spec._at_least("capacity_multiple_of", 1)
    spec._at_least("min_capacity", 0)
    if (spec.capacity == "fixed") != (spec.expert_capacity > 0):
        _fail(spec, "expert_capacity", spec.expert_capacity, "> 0 exactly when capacity='fixed'")


def _validate_group(spec):
    if (spec.group == "fixed") != (spec.group_size > 0):
        _fail(spec, "group_size", spec.group_size, "> 0 exactly when group='fixed'")


def _validate_noise_std(spec):
    """noise_std scales additive noise only: > 0 with it, and unused (any value >= 0) without."""
    if spec.noise == "additive" and not spec.noise_std > 0:
        _fail(spec, "noise_std", spec.noise_std, "> 0 when noise='additive'")
    spec._at_least("noise_std", 0.0)


def _validate_causal(spec):
    if spec.causal == "predictor" and spec.predictor is None:
        _fail(spec, "predictor", None, "a Predictor when causal='predictor'")
    if spec.causal == "router" and not spec.router_bce_coef > 0:
        _fail(spec, "router_bce_coef", spec.router_bce_coef, "> 0 when causal='router'")
    if spec.causal == "router" and spec.predictor is not None:
        _fail(spec, "predictor", spec.predictor, "None when causal='router' (it would be unused)")
    spec._at_least("router_bce_coef", 0.0)


@dataclass(frozen=True)
class ExpertChoice(_Spec):
    """Each expert takes the C highest-gated tokens of its group (arXiv:2202.09368 §3.2).

    Gates are a softmax over experts; slot c of an expert holds its c-th highest gate, equal
    gates lower token index first; the combine weight is the gate itself, not renormalised.
    C = rounding(S * capacity_factor / E), at least `min_capacity`, rounded up to
    `capacity_multiple_of`, at most S. The top-C sees future tokens, so a decoder samples with
    a causal rule: the `predictor`, or (causal="router") the router's own logits trained with
    binary cross-entropy so that logit > 0 means chosen.
    """

    num_experts: int = 8
    capacity: Literal["factor", "fixed"] = "factor"
    capacity_factor: float = 2.0  # the paper's EC-CF2: same compute as top-2
    capacity_rounding: Literal["ceil", "round"] = "ceil"  # vmoe (Soft MoE paper baselines: round)
    capacity_multiple_of: int = 1  # the paper's k = n*c/e is a plain integer
    min_capacity: int = 1
    expert_capacity: int = 0
    group: Group = "batch"  # the paper: n = every token of the batch
    group_size: int = 0
    noise: Literal["none", "additive"] = "none"
    noise_std: float = 1.0  # sigma = noise_std / E, as vmoe
    causal: Literal["predictor", "router"] = "predictor"
    router_bce_coef: float = 0.0
    predictor: Union[Predictor, None] = field(default_factory=Predictor)

    def _validate(self):
        self._at_least("num_experts", 1)
        _validate_capacity(self)
        _validate_group(self)
        _validate_noise_std(self)
        _validate_causal(self)

    def slots(self, group_tokens: int) -> int:
        return min(_capacity(self, group_tokens, self.num_experts), group_tokens)


@dataclass(frozen=True)
class SoftMoE(_Spec):
    """Every slot is a softmax-weighted mix of all tokens of its group; every token a softmax
    mix of all slot outputs (vmoe `projects/soft_moe/router.py`, arXiv:2308.00951).

    Tokens (and slot parameters) are L2-normalised with eps 1e-6 inside the rsqrt; a learned
    scalar `scale` multiplies the smaller operand ("smaller", vmoe) or a named one. Dispatch is
    a softmax over tokens, combine a softmax over all E*P slots jointly. Slots receive the raw
    tokens. Not causal: refused in a decoder.
    """

    num_experts: int = 8
    slots: Literal["per_expert", "factor"] = "per_expert"
    slots_per_expert: int = 1  # the paper: one slot per expert works best
    capacity_factor: float = 1.0  # slots="factor": P = max(1, round(S * cf / E))
    normalize_input: bool = True  # vmoe
    normalize_slots: bool = True  # vmoe
    scale: Literal["smaller", "input", "slots", "none"] = "smaller"  # vmoe
    noise_std: float = 0.0  # additive N(0, noise_std) on the logits while training
    round_bf16: bool = False  # vmoe's wrapper rounds data to bfloat16; exact by default
    group: Group = "sequence"
    group_size: int = 0

    def _validate(self):
        self._at_least("num_experts", 1)
        self._at_least("slots_per_expert", 1)
        self._positive("capacity_factor")
        self._at_least("noise_std", 0.0)
        _validate_group(self)

    def slots_for(self, group_tokens: int) -> int:
        """P, slots per expert, for a group of `group_tokens` tokens."""
        if self.slots == "per_expert":
            return self.slots_per_expert
        return max(1, round(group_tokens * self.capacity_factor / self.num_experts))


@dataclass(frozen=True)
class MixtureOfDepths(_Spec):
    """A routed block processes the top-k tokens of each sequence by a scalar router
    r = x . w; the others ride the residual (arXiv:2404.02258 §3.4).

    k = rounding(capacity * T), at least `min_tokens`; ties lower index first; chosen tokens
    stay in time order and attend only among themselves at their true positions. Output
    x + weight(r) * f(x) for chosen tokens, x for the rest. Blocks `first_routed`,
    `first_routed + every`, ... are routed. Causal rule at sampling: the predictor, or the
    router itself trained with BCE (r > 0 means routed, §3.5 method 1).
    """

    capacity: float = 0.125  # §4.1: best of 12.5 %..95 %
    capacity_rounding: Literal["floor", "ceil", "round"] = "floor"  # k = int(c*T), public code
    min_tokens: int = 1
    every: int = 2  # §4.1: every other block
    first_routed: int = 1  # the paper leaves the parity open; block 0 stays dense
    weight: Literal["raw", "sigmoid"] = "raw"  # §3.4 writes the raw r
    causal: Literal["predictor", "router"] = "predictor"
    router_bce_coef: float = 0.0
    predictor: Union[Predictor, None] = field(default_factory=Predictor)

    def _validate(self):
        if not 0 < self.capacity <= 1:
            _fail(self, "capacity", self.capacity, "0 < capacity <= 1")
        self._at_least("min_tokens", 0)
        self._at_least("every", 1)
        self._at_least("first_routed", 0)
        _validate_causal(self)

    def tokens(self, seq_len: int) -> int:
        """k, tokens routed into the block for a sequence of `seq_len` tokens."""
        raw = self.capacity * seq_len
        k = {"floor": math.floor, "ceil": math.ceil, "round": round}[self.capacity_rounding](raw)
        return min(max(k, self.min_tokens), seq_len)

    def is_routed(self, block: int) -> bool:
        return block >= self.first_routed and (block - self.first_routed) % self.every == 0


Spec = Union[TokenChoice, ExpertChoice, SoftMoE, MixtureOfDepths]
_KINDS = {c.__name__: c for c in (TokenChoice, ExpertChoice, SoftMoE, MixtureOfDepths,
                                  Predictor, ExpertMLP)}


def from_dict(data: dict):
    """Inverse of `to_dict`; an unknown kind or key is an error, never silently dropped."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or \
            data["kind"] not in _KINDS:
        kind = data.get("kind") if isinstance(data, dict) else data
        raise SpecError(f"spec kind {kind!r}: expected one of {', '.join(sorted(_KINDS))}")
    cls = _KINDS[data["kind"]]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known - {"kind"})
    if unknown:
        raise SpecError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(known)}")
    args = {k: from_dict(v) if isinstance(v, dict) else v for k, v in data.items() if k != "kind"}
    return cls(**args)


def from_json(text: str):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"spec is not valid JSON: {e}") from None
    return from_dict(data)
