"""The routed decoder LM (models/lm.py), its configs and the Soft MoE encoder, on every backend.

Tiny sizes (D = 32, 4 blocks, T = 16); parameters are redrawn larger than the init so that every
path (routers, predictors, routed blocks) moves the logits visibly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_min.models import decode, encoder, lm
from moe_min.models.configs import PRESETS, EncoderConfig, LMConfig, apply_overrides
from moe_min.spec import (ExpertChoice, ExpertMLP, MixtureOfDepths, SoftMoE, SpecError,
                          TokenChoice)

T, D = 16, 32
SCHEMES = ["dense", "token_choice", "expert_choice", "mod"]

MODEL_LEVEL = True  # numpy and MLX; tinygrad compiles per shape, so only tests marked
# tinygrad_too (the decoding, causality and MoD properties) also run there


def _config(scheme: str) -> LMConfig:
    routed = {"dense": {},
              "token_choice": {"moe": TokenChoice(num_experts=4, top_k=2, capacity_factor=1.0)},
              "expert_choice": {"moe": ExpertChoice(num_experts=4)},  # grouped by batch
              "mod": {"mod": MixtureOfDepths(capacity=0.25)}}[scheme]  # MoD routes blocks 1, 3
    return LMConfig(dim=D, layers=4, heads=2, context=24, mlp=ExpertMLP(64),
                    expert=ExpertMLP(32), **routed)


def _params(config, seed: int = 0, scale: float = 0.3) -> dict:
    """Every weight N(0, scale²), norm gains 1: predictor biases near 0 route about half."""
    rng = np.random.default_rng(seed)
    return {name: value if "norm" in name else
            (rng.standard_normal(value.shape) * scale).astype(np.float32)
            for name, value in lm.init_params(config, seed).items()}


def _tokens(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape)


def _np(ops, x) -> np.ndarray:
    return np.asarray(ops.to_numpy(x), np.float64)


def _close(ops, got, want, rtol: float | None = None):
    got, want = _np(ops, got), _np(ops, want)
    rtol = rtol or (1e-9 if want.dtype == np.float64 and ops.name == "numpy" else 2e-4)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(1.0, np.abs(want).max()))


def _routed(ops, stats, row: int = 0) -> np.ndarray:
    return np.flatnonzero(_np(ops, stats["experts_per_token"])[row])


def _decode(ops, config, params, tokens, prompt: int, skip: str = "branch"):
    """Prefill `prompt` tokens in one call, then one token per call -> (logits, decoder)."""
    decoder = decode.Decoder(ops, config, params, skip=skip)
    steps = [decoder.prefill(tokens[:, :prompt])[:, None]]
    for t in range(prompt, tokens.shape[1]):
        steps.append(decoder.step(tokens[:, t:t + 1])[:, None])
    return np.concatenate([steps[0], *steps[1:]], axis=1), decoder


@pytest.mark.tinygrad_too
@pytest.mark.parametrize("scheme, skip", [*((s, "branch") for s in SCHEMES), ("mod", "mask")])
def test_incremental_decoding_matches_the_causal_forward(ops, scheme, skip):
    config = _config(scheme)
    params, tokens = _params(config), _tokens((1, T))
    full, info = lm.forward(ops, config, params, tokens, mode="causal")
    prompt = 6
    got, decoder = _decode(ops, config, params, tokens, prompt, skip)
    _close(ops, got, _np(ops, full)[:, prompt - 1:])
    lengths = decoder.lengths()
    for i in range(config.layers):  # dense/MoE blocks hold every token; MoD the routed ones
        want = _routed(ops, info["blocks"][i]) if config.block_kind(i) == "mod" else np.arange(T)
        assert decoder.positions(i) == want.tolist() and lengths[i] == len(want)
    if scheme == "mod":
        assert all(0 < lengths[i] < T for i in (1, 3)), lengths


@pytest.mark.tinygrad_too
def test_mod_decoding_after_a_prompt_that_routes_nothing_into_a_block(ops):
    config = _config("mod")
    params, tokens = _params(config, seed=1), _tokens((1, T), seed=3)  # block 3: from t = 7
    params["blocks.1.predictor_b2"] = np.full(1, -1e4, np.float32)  # block 1 routes nothing
    full, info = lm.forward(ops, config, params, tokens, mode="causal")
    routed = _routed(ops, info["blocks"][3])
    assert _routed(ops, info["blocks"][1]).size == 0 and 0 < routed[0] < routed[-1], routed
    prompt = int(routed[0])
    decoder = decode.Decoder(ops, config, params)
    decoder.prefill(tokens[:, :prompt])
    assert decoder.lengths()[1] == 0 and decoder.lengths()[3] == 0  # nothing routed yet
    got, decoder = _decode(ops, config, params, tokens, prompt)
    _close(ops, got, _np(ops, full)[:, prompt - 1:])
    assert decoder.lengths()[1] == 0 and decoder.positions(3) == routed.tolist()


def _future_leak(ops, scheme: str, mode: str, t: int = 9) -> float:
    """Largest change of the logits at positions <= t over 16 choices of the byte at t + 1."""
    config = _config(scheme)
    tokens = np.repeat(_tokens((1, T)), 16, axis=0)
    tokens[:, t + 1] = np.arange(16) * 16
    logits, _ = lm.forward(ops, config, _params(config), tokens, mode=mode, noise=False)
    past = _np(ops, logits)[:, : t + 1]
    return float(np.abs(past - past[:1]).max() / np.abs(past).max())


@pytest.mark.tinygrad_too
@pytest.mark.parametrize("scheme", SCHEMES)
def test_causal_mode_never_reads_the_future(ops, scheme):
    assert _future_leak(ops, scheme, "causal") < 1e-5


@pytest.mark.tinygrad_too
@pytest.mark.parametrize("scheme", ["token_choice", "expert_choice", "mod"])  # TC: drops
def test_training_mode_reads_the_future_so_the_check_can_see_a_leak(ops, scheme):
    assert _future_leak(ops, scheme, "train") > 1e-3


def _block(ops, config, params, x, positions, mode="causal", block=1):
    p = {name: ops.asarray(value) for name, value in params.items()}
    return lm.block(ops, config, p, block, ops.asarray(x), ops.asarray(positions, "int"),
                    mode=mode, noise=False)


@pytest.mark.tinygrad_too
@pytest.mark.parametrize("mode", lm.MODES)
def test_mod_block_with_zero_router_weight_is_the_identity_on_every_token(ops, mode):
    config = _config("mod")
    params = _params(config)
    params["blocks.1.mod.router_w"] = np.zeros(D, np.float32)  # weight "raw": r = 0
    x = np.random.default_rng(4).standard_normal((2, T, D))
    y, stats = _block(ops, config, params, x, np.tile(np.arange(T), (2, 1)), mode)
    assert float(_np(ops, stats["routed_fraction"])) > 0
    np.testing.assert_array_equal(_np(ops, y), _np(ops, ops.asarray(x)))


@pytest.mark.tinygrad_too
def test_mod_routed_outputs_ignore_unrouted_tokens_at_true_positions(ops):
    config = _config("mod")
    params, x = _params(config), np.random.default_rng(5).standard_normal((1, T, D))
    y, stats = _block(ops, config, params, x, np.arange(T)[None])
    routed = _routed(ops, stats)
    # the check below needs both kinds: these parameters route some tokens and skip others
    assert 1 < routed.size < T, f"block 1 routed {routed.size} of {T} tokens"
    alone, _ = _block(ops, config, params, x[:, routed], routed[None])
    _close(ops, alone, _np(ops, y)[:, routed])
    compacted, _ = _block(ops, config, params, x[:, routed], np.arange(routed.size)[None])
    assert np.abs(_np(ops, compacted) - _np(ops, alone)).max() > 1e-3  # P10 would be visible


def test_predictor_loss_of_a_batch_is_the_mean_of_its_rows_losses(ops):
    config = _config("mod")
    params, x = _params(config), np.random.default_rng(6).standard_normal((3, T, D))
    pos = np.tile(np.arange(T), (3, 1))
    _, stats = _block(ops, config, params, x, pos, mode="train")
    rows = [_block(ops, config, params, x[r:r + 1], pos[:1], mode="train")[1] for r in range(3)]
    want = np.mean([_np(ops, s["aux_terms"]["predictor"]) for s in rows])
    _close(ops, stats["aux_terms"]["predictor"], want)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny-")])
def test_tiny_presets_run_forward(ops, name):
    config = PRESETS[name]
    model = encoder if isinstance(config, EncoderConfig) else lm
    logits, info = model.forward(ops, config, model.init_params(config, 0), _tokens((2, 8)))
    assert tuple(logits.shape) == (2, 8, 256) and np.isfinite(_np(ops, logits)).all()
    assert np.isfinite(_np(ops, info["aux"]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loss_gradients_are_finite_and_reach_routers_and_predictors(autodiff_ops, scheme):
    ops, config = autodiff_ops, _config(scheme)
    params = {k: ops.asarray(v) for k, v in _params(config).items()}
    tokens = _tokens((2, T + 1))

    def objective(p, inputs, targets):
        return lm.loss(ops, config, p, inputs, targets, mode="train")[0]

    value, grads = ops.value_and_grad(objective)(params, tokens[:, :-1], tokens[:, 1:])
    assert set(grads) == set(params) and np.isfinite(float(_np(ops, value)))
    for name, g in grads.items():
        g = _np(ops, g)
        assert np.isfinite(g).all(), name
        if "router" in name or "predictor" in name:
            assert np.abs(g).max() > 0, name


def test_a_soft_moe_decoder_config_is_refused_with_a_clear_error():
    with pytest.raises(SpecError, match="Soft MoE is not causal.*use models.encoder"):
        LMConfig(moe=SoftMoE())
    data = json.loads(PRESETS["tiny-moe"].to_json())
    data["moe"] = SoftMoE().to_dict()
    with pytest.raises(SpecError, match="Soft MoE is not causal"):
        LMConfig.from_dict(data)
    with pytest.raises(SpecError, match="--set moe: 'SoftMoE': expected one of TokenChoice, "
                                        "ExpertChoice, none"):
        apply_overrides(PRESETS["tiny-dense"], ["moe=SoftMoE"])


@pytest.mark.parametrize("items, message", [
    (["nope=1"], r"--set nope: unknown key 'nope' in LMConfig; known: vocab, dim"),
    (["dim=abc"], r"--set dim: 'abc': expected an integer"),
    (["mod.capacity=0.25"], r"--set mod.capacity: mod = None has no field 'capacity' "
                            r"\(set mod=<Kind> first\)"),
    (["mlp.activation=tanh"], r"'tanh': expected one of relu, gelu, gelu_tanh, silu"),
    (["tie_embeddings=maybe"], r"'maybe': expected one of true, false"),
    (["dim=30"], r"LMConfig.dim = 30: expected a multiple of heads \(4\)"),
    (["heads=3", "dim=129"], r"LMConfig.heads = 3: expected an even head dim"),
    (["moe=TokenChoice", "moe.top_k=9"], r"TokenChoice.top_k = 9: expected 1 <= top_k"),
    (["dim"], r"--set 'dim': expected key=value"),
])
def test_bad_overrides_give_one_line_errors_naming_the_key(items, message):
    with pytest.raises(SpecError, match=message) as error:
        apply_overrides(PRESETS["tiny-dense"], items)
    assert "\n" not in str(error.value)


def test_overrides_reach_nested_specs_and_validate_once_at_the_end():
    config = apply_overrides(PRESETS["tiny-mod"], [
        "mod.capacity=0.25", "mod.causal=router", "mod.router_bce_coef=0.1", "mod.predictor=none",
        "layers=6", "tie_embeddings=False"])
    assert config.mod.capacity == 0.25 and config.mod.predictor is None and config.layers == 6
    assert not config.tie_embeddings
    config = apply_overrides(PRESETS["tiny-dense"], ["moe=ExpertChoice", "moe.num_experts=4"])
    assert config.moe == ExpertChoice(num_experts=4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trips_and_unknown_keys_are_errors(name):
    config = PRESETS[name]
    assert type(config).from_dict(json.loads(config.to_json())) == config
    with pytest.raises(SpecError, match="unknown key"):
        type(config).from_dict({**config.to_dict(), "n_layer": 4})


def test_encoder_loss_counts_exactly_the_masked_bytes(ops):
    config = EncoderConfig(dim=D, layers=2, heads=2, context=24, mlp=ExpertMLP(64),
                           expert=ExpertMLP(32), moe=SoftMoE(num_experts=4, slots_per_expert=2))
    params, tokens = encoder.init_params(config, 0), _tokens((2, 24))
    total, metrics = encoder.loss(ops, config, params, tokens, 0.15, seed=3, mode="eval")
    mask = encoder.mask_positions(tokens.shape, 0.15, 3)
    assert np.array_equal(metrics["mask"], mask) and metrics["masked"] == mask.sum() > 0
    logits, _ = encoder.forward(ops, config, params, np.where(mask, config.vocab, tokens),
                                mode="eval")
    logits = _np(ops, logits)
    top = logits.max(-1, keepdims=True)
    per_byte = np.log(np.exp(logits - top).sum(-1)) + top[..., 0] - \
        np.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    _close(ops, metrics["ce"], per_byte[mask].mean())
    _close(ops, total, per_byte[mask].mean())  # Soft MoE has no aux loss
