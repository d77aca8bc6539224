"""The conformance corpus as code: each case is a few lines (spec, sizes, seed, why); the
oracle fills in the expected outputs, and gradients of the scalar loss come from float64
central differences with every routing decision held fixed. `python -m
moe_min.conformance.generate [DIR]` writes the corpus byte-reproducibly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from moe_min import oracle
from moe_min.conformance.case import CASES_DIR, TOLERANCE_BOUNDS, Case, quantity_kind
from moe_min.spec import ExpertChoice, ExpertMLP, MixtureOfDepths, SoftMoE, TokenChoice

VERSION = 1
STEP = 1e-5  # central-difference step: O(h²) ≈ 1e-10 truncation, O(eps/h) ≈ 1e-11 rounding
SCHEMES = {TokenChoice: "token_choice", ExpertChoice: "expert_choice", SoftMoE: "soft_moe",
           MixtureOfDepths: "mixture_of_depths"}


def tolerance_for(scheme: str, key: str) -> list[float]:
    """[rtol, atol] for a float32 backend: |got - want| <= atol + rtol·|want|. Each case
    gets its bound in TOLERANCE_BOUNDS: decisions exact, gradients looser (float32 autodiff
    against float64 differences)."""
    return list(TOLERANCE_BOUNDS[scheme][quantity_kind(key)])


def _params(rng, spec, B: int, T: int, D: int, expert: ExpertMLP, block, router_scale: float):
    E = getattr(spec, "num_experts", 1)

    def w(*shape, scale=None):
        return rng.normal(size=shape) * (scale if scale is not None else shape[-2] ** -0.5)

    p = {}
    if isinstance(spec, SoftMoE):
        P = spec.slots_for({"sequence": T, "batch": B * T}.get(spec.group, spec.group_size))
        p["slot_mu"], p["slot_scale"] = rng.normal(size=(D, E, P)), np.array(1 + 0.5 * rng.random())
    elif isinstance(spec, MixtureOfDepths):
        p["router_w"] = rng.normal(size=D) * router_scale
    else:
        p["router_w"] = w(D, E, scale=router_scale)
    if block is None:
        H = expert.hidden
        p["expert_w1"], p["expert_w2"] = w(E, D, H), w(E, H, D)
        if expert.glu:
            p["expert_w3"] = w(E, D, H)
    else:
        H = block["mlp"].hidden
        p.update(block_norm1=1 + 0.1 * rng.normal(size=D), block_norm2=1 + 0.1 * rng.normal(size=D),
                 block_wq=w(D, D), block_wk=w(D, D), block_wv=w(D, D), block_wo=w(D, D),
                 block_w1=w(D, H), block_w2=w(H, D))
    pred = getattr(spec, "predictor", None)
    if pred is not None:
        hidden, out = pred.width(D), E if isinstance(spec, ExpertChoice) else 1
        p.update(predictor_w1=w(D, hidden), predictor_b1=0.1 * rng.normal(size=hidden),
                 predictor_w2=w(hidden, out), predictor_b2=0.1 * rng.normal(size=out))
    return p


def run_oracle(case_spec, call: dict, x, params, noise, x_predictor=None) -> dict:
    """The oracle on one case's arrays; `call` holds its `mode`, `expert` and (MoD) `block`."""
    mode, expert, block = call["mode"], call.get("expert"), call.get("block")
    if isinstance(case_spec, TokenChoice):
        return oracle.token_choice(case_spec, x, params, expert, mode=mode, noise=noise)
    if isinstance(case_spec, ExpertChoice):
        return oracle.expert_choice(case_spec, x, params, expert, mode=mode, noise=noise,
                                    x_predictor=x_predictor)
    if isinstance(case_spec, SoftMoE):
        return oracle.soft_moe(case_spec, x, params, expert, mode=mode, noise=noise)
    return oracle.mixture_of_depths(case_spec, x, params, block, mode=mode,
                                    x_predictor=x_predictor)


def scalar_loss(out: dict, cotangent: np.ndarray) -> float:
    """The loss whose gradients the corpus stores: Σ y·cotangent + aux/total."""
    return float(np.sum(out["y"] * cotangent) + out.get("aux/total", 0.0))


def _decisions(out: dict):
    return out.get("plan/slot_token")


def _gradients(spec, call, x, params, noise, cotangent, decided) -> dict:
    """Central differences of the scalar loss in every element of x and of each float param;
    raises FlipError if any step changes a routing decision."""
    x_predictor = x.copy()  # the predictor's input is stop-gradient: hold it fixed
    arrays = {"x": x, **params}
    grads = {}
    for name, array in arrays.items():
        grad = np.zeros_like(array)
        for i in np.ndindex(array.shape):
            old, values = array[i], []
            for step in (STEP, -STEP):
                array[i] = old + step
                out = run_oracle(spec, call, x, params, noise, x_predictor)
                if decided is not None and not np.array_equal(_decisions(out), decided):
                    array[i] = old
                    raise FlipError(f"{name}{list(i)}")
                values.append(scalar_loss(out, cotangent))
            array[i] = old
            grad[i] = (values[0] - values[1]) / (2 * STEP)
        grads[f"grad/{name}"] = grad
    return grads


class FlipError(Exception):
    """A routing decision changed inside a difference step: the inputs lack margin."""


def _margin_ok(spec, call, x, params, noise, decided, rng) -> bool:
    """Decisions survive a 1e-4 relative jiggle of every input: far from float32 ties."""
    for _ in range(3):
        jig = {k: v * (1 + 1e-4 * rng.standard_normal(v.shape)) for k, v in params.items()}
        out = run_oracle(spec, call, x * (1 + 1e-4 * rng.standard_normal(x.shape)), jig, noise)
        if not np.array_equal(_decisions(out), decided):
            return False
    return True


def build(name: str, spec, *, seed: int, why: str, mode: str = "eval", B: int = 1, T: int = 6,
          D: int = 4, expert: ExpertMLP = ExpertMLP(hidden=8), heads: int = 2,
          router_scale: float = 1.0, inputs=None, grads: bool = True, ties: bool = False) -> Case:
    """One case. `inputs(rng, x, params)` may edit the random inputs (ties, zero tokens);
    `ties=True` marks deliberate exact ties: no margin check, and no gradients, since a
    difference step would break the tie. Retries seeds until the decisions have margin."""
    scheme = SCHEMES[type(spec)]
    block = ({"heads": heads, "rope_base": 10000.0, "norm_eps": 1e-6, "mlp": expert}
             if scheme == "mixture_of_depths" else None)
    meta = {"name": f"{scheme}__{name}", "scheme": scheme, "mode": mode, "why": why,
            "version": VERSION, "expert": expert.to_dict() if block is None else None,
            "block": {**block, "mlp": expert.to_dict()} if block else None}
    call = {"mode": mode, "expert": expert, "block": block}
    for attempt in range(50):
        rng = np.random.default_rng([seed, attempt])
        x = rng.normal(size=(B, T, D))
        params = _params(rng, spec, B, T, D, expert, block, router_scale)
        noise = _noise(rng, spec, B, T, D) if mode == "train" else None
        if inputs is not None:
            inputs(rng, x, params)
        out = run_oracle(spec, call, x, params, noise)
        decided = _decisions(out)
        if not ties and decided is not None and not _margin_ok(spec, call, x, params, noise,
                                                                decided, rng):
            continue
        cotangent = rng.normal(size=x.shape)
        try:
            out.update(_gradients(spec, call, x, params, noise, cotangent, decided) if grads and
                       not ties else {})
        except FlipError:
            continue
        break
    else:
        raise RuntimeError(f"{meta['name']}: no seed gave routing decisions with margin")
    tensors = {"input/x": x, "input/cotangent": cotangent,
               **{f"param/{k}": v for k, v in params.items()},
               **{f"expect/{k}": np.asarray(v) for k, v in out.items()
                  if not k.startswith(oracle.LIBRARY_KEYS)}}
    if noise is not None:
        tensors["input/noise"] = noise
    meta.update(seed=[seed, attempt], gradients=bool(grads and not ties),
                tolerance={k[len("expect/"):]: tolerance_for(scheme, k[len("expect/"):])
                           for k in tensors if k.startswith("expect/")})
    return Case(spec, meta, tensors)


def _noise(rng, spec, B, T, D):
    if isinstance(spec, SoftMoE):
        S = {"sequence": T, "batch": B * T}.get(spec.group, spec.group_size)
        return rng.normal(size=(B, T, spec.num_experts, spec.slots_for(S))) \
            if spec.noise_std > 0 else None
    if getattr(spec, "noise", "none") == "jitter":
        return rng.normal(size=(B, T, D))
    if getattr(spec, "noise", "none") == "additive":
        return rng.normal(size=(B, T, spec.num_experts))
    return None


def write_corpus(root: Path | None = None, cases=None) -> list[Path]:
    """Write every case (default: the shipped corpus) under root/<scheme>/<name>.safetensors."""
    from moe_min.conformance.corpus import all_cases

    root = Path(root) if root else CASES_DIR
    paths = []
    for case in cases if cases is not None else all_cases():
        path = root / case.meta["scheme"] / f"{case.name}.safetensors"
        case.save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    written = write_corpus(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"wrote {len(written)} cases")
