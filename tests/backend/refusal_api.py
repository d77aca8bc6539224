"""The table of refusals, the Python API half (tests/backend/test_nothing_lost.py runs it):
spec values and JSON, layer inputs (moe_min.layers.forward) and token ids, each a call that
must raise one line naming the input and what is accepted."""

from __future__ import annotations


import numpy as np

from conftest import load_backend  # tests/conftest.py, on sys.path under pytest
from moe_min.models import train as tr
from refusal_rows import Row  # tests/backend, on sys.path under pytest



# ---- the Python API rows ----------------------------------------------------------------------

def _layer(kind="tc", x=None, drop=(), noise=None, **change):
    """moe_min.layers.forward (NumPy backend) on a 4-wide, 2-expert layer of 8 tokens, one
    input or parameter changed, or dropped."""
    from moe_min.layers import forward
    from moe_min.spec import ExpertMLP, SoftMoE, TokenChoice

    ops = load_backend("numpy", None)
    rng = np.random.default_rng(0)
    spec = {"tc": TokenChoice(num_experts=2, top_k=1), "soft": SoftMoE(num_experts=2),
            "noisy": TokenChoice(num_experts=2, top_k=1, noise="additive"),
            "fixed": TokenChoice(num_experts=2, top_k=1, capacity="fixed",
                                 expert_capacity=10 ** 12)}[kind]
    params = {"router_w": rng.standard_normal((4, 2)), "expert_w1": rng.standard_normal((2, 4, 8)),
              "expert_w2": rng.standard_normal((2, 8, 4)),
              "slot_mu": rng.standard_normal((4, 2, 1)), "slot_scale": np.ones(()), **change}
    x = rng.standard_normal((1, 8, 4)) if x is None else x
    forward(spec, ops.asarray(x), {k: ops.asarray(v) for k, v in params.items() if k not in drop},
            ops, expert=ExpertMLP(8), mode="eval" if noise is None else "train",
            noise=None if noise is None else ops.asarray(noise))


def _not_a_spec():
    from moe_min.layers import forward

    ops = load_backend("numpy", None)
    forward({"kind": "TokenChoice"}, ops.asarray(np.ones((1, 8, 4))), {}, ops)


def _with(array, index, value):
    array = array.copy()
    array[index] = value
    return array


def _raw_numpy_on_mlx():
    from moe_min.layers import forward
    from moe_min.spec import ExpertMLP, TokenChoice

    ops = load_backend("mlx", "cpu")
    rng = np.random.default_rng(0)
    params = {"router_w": rng.standard_normal((4, 2)), "expert_w1": rng.standard_normal((2, 4, 8)),
              "expert_w2": rng.standard_normal((2, 8, 4))}
    forward(TokenChoice(num_experts=2, top_k=1), rng.standard_normal((1, 8, 4)),
            {k: ops.asarray(v) for k, v in params.items()}, ops, expert=ExpertMLP(8))


def _lm_ids(ids):
    from moe_min.models import lm
    from moe_min.models.configs import LMConfig

    config = LMConfig(vocab=16, dim=8, layers=1, heads=2, context=16)
    lm.forward(load_backend("mlx", "cpu"), config, lm.init_params(config), np.array(ids),
               mode="eval")


def _decoder_ids():
    from moe_min.models import decode, lm
    from moe_min.models.configs import LMConfig

    config = LMConfig(vocab=16, dim=8, layers=1, heads=2, context=16)
    decode.Decoder(load_backend("mlx", "cpu"), config, lm.init_params(config)).prefill(
        np.array([[3, 16]]))


def _spec_json(text):
    from moe_min.spec import from_json

    return lambda: from_json(text)


def _spec(**kw):
    from moe_min.spec import TokenChoice

    return lambda: TokenChoice(**kw)


# ---- the table ----------------------------------------------------------------------------

API_ROWS = [
    # the Python API: spec values and JSON
    Row("spec/top-k-above-experts", "TokenChoice.top_k = 9: expected 1 <= top_k <= num_experts "
        "(8)", call=_spec(top_k=9)),
    Row("spec/capacity-factor-nan", "TokenChoice.capacity_factor = nan: expected a finite number",
        call=_spec(capacity_factor=float("nan"))),
    Row("spec/bool-for-int", "TokenChoice.num_experts = True: expected an integer",
        call=_spec(num_experts=True)),
    Row("spec/json-unknown-key", "TokenChoice: unknown key(s) ['capacity_factr']",
        call=_spec_json('{"kind": "TokenChoice", "capacity_factr": 1.0}')),
    Row("spec/json-invalid", "spec is not valid JSON", call=_spec_json("{kind: TokenChoice")),
    Row("spec/json-not-an-object", "spec kind [1]: expected one of", call=_spec_json("[1]")),
    Row("spec/train-config-type", "TrainConfig.compile = 'yes': expected True or False",
        call=lambda: tr.TrainConfig(compile="yes")),
    Row("spec/adamw-beta", "AdamW.beta1 = 1.5: expected 0 <= beta1 < 1",
        call=lambda: tr.optim.AdamW(beta1=1.5)),
    # the Python API: layer inputs (moe_min.layers.forward), token ids
    Row("layer/x-wrong-width", "router_w has shape (4, 2): expected (5, 2)",
        call=lambda: _layer(x=np.zeros((1, 8, 5)))),
    Row("layer/x-one-dimensional", "x has shape (4,): expected (B, T, D) or (T, D)",
        call=lambda: _layer(x=np.zeros(4))),
    Row("layer/x-empty", "x has shape (1, 0, 4): expected (B, T, D) or (T, D), none of them 0",
        call=lambda: _layer(x=np.zeros((1, 0, 4)))),
    Row("layer/x-int", "x is int64: expected a float array",
        call=lambda: _layer(x=np.ones((1, 8, 4), np.int64))),
    Row("layer/x-not-a-backend-array", "x is a numpy.ndarray: expected an array of the backend",
        call=_raw_numpy_on_mlx),
    Row("layer/router-missing", "params has no 'router_w': TokenChoice reads router_w",
        call=lambda: _layer(drop=("router_w",))),
    Row("layer/experts-count", "expert_w1 has shape (3, 4, 8): expected (2, 4, 8)",
        call=lambda: _layer(expert_w1=np.zeros((3, 4, 8)))),
    Row("layer/noise-shape", "noise has shape (1, 8, 5): expected 16 standard-normal draws",
        call=lambda: _layer("noisy", noise=np.zeros((1, 8, 5)))),
    Row("layer/x-nan", "router logits contain NaN or inf: check the input and router_w",
        call=lambda: _layer(x=_with(np.ones((1, 8, 4)), (0, 3, 1), np.nan))),
    Row("layer/soft-moe-x-nan", "check the input and slot_mu and slot_scale",
        call=lambda: _layer("soft", x=_with(np.ones((1, 8, 4)), (0, 3, 1), np.nan))),
    Row("layer/expert-weight-inf", "the layer output contains NaN or inf though the routing was "
        "finite", call=lambda: _layer(expert_w2=_with(np.ones((2, 8, 4)), (1, 0, 0), np.inf))),
    Row("layer/absurd-capacity", "lower the capacity or num_experts", call=lambda: _layer("fixed")),
    Row("layer/spec-not-a-spec", "spec is dict: expected one of TokenChoice",
        call=_not_a_spec),
    Row("lm/token-ids-above-vocab", "tokens: ids 3..99: expected 0..15 (the vocabulary)",
        call=lambda: _lm_ids([[3, 99]])),
    Row("lm/token-ids-negative", "tokens: ids -1..3: expected 0..15", call=lambda: _lm_ids(
        [[3, -1]])),
    Row("lm/tokens-past-context", "tokens have shape (1, 40): expected (B, T) with B >= 1 and "
        "1 <= T <= 16", call=lambda: _lm_ids(np.zeros((1, 40), int))),
    Row("lm/decoder-ids", "token ids 3..16: expected 0..15", call=_decoder_ids),
]
