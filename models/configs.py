"""Model configurations: `LMConfig` (the routed decoder of models/lm.py), `EncoderConfig` (the
Soft MoE encoder of models/encoder.py), named `PRESETS`, and `apply_overrides` for the CLI's
`--set key=value`. Frozen data with strict JSON, validated like the routing spec (moe_min.spec).
May import: moe_min.spec and the stdlib.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Literal, Union

from moe_min import spec as _spec
from moe_min.spec import ExpertChoice, ExpertMLP, MixtureOfDepths, SoftMoE, SpecError, TokenChoice

@dataclass(frozen=True)
class _Model(_spec._Spec):
    """What both configs share: sizes, the attention shape checks, strict JSON. Block i is MoE
    if `is_moe(i)` (experts `expert`), else its FFN is the dense `mlp`."""

    vocab: int = 256
    dim: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128
    mlp: ExpertMLP = ExpertMLP(hidden=512)  # ReLU: cheap on CPU (reference/backends.md §1)
    moe_every: int = 2  # every other FFN is MoE (GShard; arXiv:2202.09368 §3.4)
    moe_first: int = 1
    expert: ExpertMLP = ExpertMLP(hidden=256)  # top-2 of hidden 256: the dense MLP's FLOPs
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def _validate(self):
        for name in ("vocab", "dim", "layers", "heads", "context", "moe_every", "norm_eps",
                     "rope_base"):
            self._positive(name)
        self._at_least("moe_first", 0)
        if self.dim % self.heads:
            _spec._fail(self, "dim", self.dim, f"a multiple of heads ({self.heads})")
        if (self.dim // self.heads) % 2:
            _spec._fail(self, "heads", self.heads, f"an even head dim (dim/heads = "
                        f"{self.dim // self.heads}; RoPE rotates pairs)")
        if self.moe is not None and not any(map(self.is_moe, range(self.layers))):
            _spec._fail(self, "moe_first", self.moe_first, f"< layers ({self.layers}): no block "
                        "would be MoE, so the moe spec would be silently unused")

    def is_moe(self, block: int) -> bool:
        return self.moe is not None and block >= self.moe_first and \
            (block - self.moe_first) % self.moe_every == 0

    @classmethod
    def from_dict(cls, data: dict):
        """Inverse of `to_dict`; unknown keys and kinds are errors, never dropped."""
        kind = data.get("kind", cls.__name__) if isinstance(data, dict) else data
        if kind != cls.__name__:
            raise SpecError(f"config kind {kind!r}: expected {cls.__name__!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"kind"})
        if unknown:
            raise SpecError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: _spec.from_dict(v) if isinstance(v, dict) else v
                      for k, v in data.items() if k != "kind"})


@dataclass(frozen=True)
class LMConfig(_Model):
    """A byte-level decoder (models/lm.py). Block i is MoD-routed if `mod.is_routed(i)`, else
    MoE or dense; never both (staged MoDE is not supported). Defaults are the tiny size."""

    moe: Union[TokenChoice, ExpertChoice, None] = None
    mod: Union[MixtureOfDepths, None] = None
    tie_embeddings: bool = True  # nanoGPT

    def __post_init__(self):
        if isinstance(self.moe, SoftMoE):
            raise SpecError("LMConfig.moe = SoftMoE(...): Soft MoE is not causal (every slot "
                            "mixes all tokens of its group): use models.encoder")
        super().__post_init__()

    def _validate(self):
        super()._validate()
        if self.mod is not None and not any(map(self.mod.is_routed, range(self.layers))):
            _spec._fail(self, "mod.first_routed", self.mod.first_routed,
                        f"< layers ({self.layers}): no block would be routed")
        both = [i for i in range(self.layers) if self.is_moe(i) and self.block_kind(i) == "mod"]
        if both:
            _spec._fail(self, "moe_first", self.moe_first, f"MoE blocks apart from the MoD-routed "
                        f"blocks {both} (set moe_first/moe_every or mod.first_routed/every)")

    def block_kind(self, block: int) -> Literal["dense", "moe", "mod"]:
        if self.mod is not None and self.mod.is_routed(block):
            return "mod"
        return "moe" if self.is_moe(block) else "dense"


@dataclass(frozen=True)
class EncoderConfig(_Model):
    """A non-causal byte encoder for masked-byte prediction (models/encoder.py) whose MoE blocks
    are Soft MoE. The mask id is `vocab` (the embedding has vocab + 1 rows)."""

    moe: Union[SoftMoE, None] = SoftMoE(num_experts=8, slots_per_expert=16)  # 128 slots, T=128


_SMALL = dict(dim=384, layers=6, heads=6, context=256, mlp=ExpertMLP(1536), expert=ExpertMLP(768))
_MIXTRAL = TokenChoice(num_experts=8, top_k=2, capacity="dropless", renormalize=True,
                       load_balance_counting="all_k")
_SCHEMES = {
    "dense": {},
    "moe": dict(moe=TokenChoice(num_experts=8, top_k=2)),
    # Mixtral: top-2 of 8, dropless, renormalised, SwiGLU experts (hidden 2/3 of 256: the same
    # FLOPs as the ReLU experts with three matrices)
    "mixtral": dict(moe=_MIXTRAL, expert=ExpertMLP(hidden=176, activation="silu", glu=True)),
    "ec": dict(moe=ExpertChoice(num_experts=8, capacity_factor=2.0)),  # with its Predictor
    "mod": dict(layers=8, mod=MixtureOfDepths(capacity=0.125, every=2, first_routed=1)),
}
PRESETS = {
    **{f"tiny-{name}": LMConfig(**kw) for name, kw in _SCHEMES.items()},
    **{f"small-{name}": LMConfig(**{**_SMALL, **kw}) for name, kw in _SCHEMES.items()},
    "small-mixtral": LMConfig(**{**_SMALL, "moe": _MIXTRAL, "expert": ExpertMLP(  # 2/3 of 768
        hidden=512, activation="silu", glu=True)}),
    "tiny-soft-encoder": EncoderConfig(),
    "small-soft-encoder": EncoderConfig(**_SMALL, moe=SoftMoE(num_experts=8, slots_per_expert=32)),
}
def _parse(hint, text: str):
    """`text` as a value of the field type `hint`; a ValueError says what is accepted. Ranges
    and finiteness are left to the config's and the spec's own validation."""
    origin, arms = typing.get_origin(hint), typing.get_args(hint) or (hint,)
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            kind = "an integer" if hint is int else "a number"
            raise ValueError(f"{text!r}: expected {kind}") from None
    if origin is Literal:
        choices = {a: a for a in arms}
    elif hint is bool:
        choices, text = {"true": True, "false": False}, text.lower()
    else:  # a nested spec by its kind, with its defaults (moe=TokenChoice), or none
        choices = {"none" if a is type(None) else a.__name__: a() for a in arms}
    if text not in choices:
        raise ValueError(f"{text!r}: expected one of {', '.join(choices)}")
    return choices[text]


def _set(tree: dict, path: list[str], text: str):
    """Set the dotted `path` in a config's `to_dict()` tree; the kinds say the field types."""
    kinds = {**_spec._KINDS, "LMConfig": LMConfig, "EncoderConfig": EncoderConfig}
    hints, name = typing.get_type_hints(kinds[tree["kind"]]), path[0]
    if name not in hints:
        raise ValueError(f"unknown key {name!r} in {tree['kind']}; known: "
                         f"{', '.join(k for k in tree if k != 'kind')}")
    if len(path) > 1 and not isinstance(tree[name], dict):
        hint = f" (set {name}=<Kind> first)" if tree[name] is None else ""
        raise ValueError(f"{name} = {tree[name]!r} has no field {path[1]!r}{hint}")
    if len(path) > 1:
        return _set(tree[name], path[1:], text)
    value = _parse(hints[name], text)
    tree[name] = value.to_dict() if isinstance(value, _spec._Spec) else value


def apply_overrides(config, items: list[str]):
    """`config` with `--set key=value` items applied: dotted keys reach nested specs
    (`moe.num_experts=8`, `mod.capacity=0.25`, `moe=ExpertChoice`, `mod.predictor=none`), values
    are parsed by the field's type, and the result is validated once, after every item (so
    `mod.causal=router mod.router_bce_coef=0.1 mod.predictor=none` works in any order).
    Errors are one line naming the key or the field."""
    tree = config.to_dict()
    for item in items:
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected key=value")
        try:
            _set(tree, key.split("."), text)
        except ValueError as e:
            raise SpecError(f"--set {key}: {e}") from None
    return type(config).from_dict(tree)  # its errors name the class and field
