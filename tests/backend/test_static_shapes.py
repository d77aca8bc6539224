"""Static shapes in every jitted path: a decode step and an evaluation chunk are traced once
and then reused (counted), and padding the last evaluation chunk changes nothing.
Decode == the full causal forward is in test_lm.py (all schemes, both MoD skips)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from moe_min.cli import main
from moe_min.models import decode, evaluation, lm
from moe_min.models.configs import ExpertMLP, LMConfig
from moe_min.spec import ExpertChoice, MixtureOfDepths, TokenChoice

MOD = LMConfig(dim=32, layers=4, heads=2, context=32, mlp=ExpertMLP(64), expert=ExpertMLP(32),
               mod=MixtureOfDepths(capacity=0.25))


def _params(config, scale=0.3):
    rng = np.random.default_rng(0)  # larger than the init: the predictors route about half
    return {k: v if "norm" in k else (rng.standard_normal(v.shape) * scale).astype(np.float32)
            for k, v in lm.init_params(config).items()}


@pytest.mark.parametrize("skip", decode.SKIP_MODES)
def test_a_decode_step_is_traced_once_and_then_replayed(autodiff_ops, skip):
    ops = autodiff_ops  # MLX (mx.compile) and tinygrad (TinyJit): both jit
    decoder = decode.Decoder(ops, MOD, _params(MOD), skip=skip)
    tokens = np.random.default_rng(1).integers(0, 256, 20)
    # three prompts in one bucket: MLX retraces a process's first call once, and tinygrad's
    # two alternating TinyJits (ops_tinygrad.compile) each capture on their own
    for prompt in (3, 5, 4):
        decoder.prefill(tokens[None, :prompt])
        for t in tokens[prompt:12]:
            decoder.step([[t]])
    before = dict(decoder.traces)
    for t in tokens[12:]:
        decoder.step([[t]])
    decoder.prefill(tokens[None, :2])
    assert decoder.traces == before, (before, decoder.traces)
    assert all(n <= 3 for n in before.values()), before  # TinyJit: eager, then two captures
    if skip == "branch":  # the all-skip step, and reruns from an entered MoD block
        assert ("branch", None) in before and any(k[0] == "branch" and k[1] in (1, 3)
                                                   for k in before), before


def test_prefill_buckets_are_powers_of_two_up_to_the_context():
    assert decode.buckets(128) == [16, 32, 64, 128]
    assert decode.buckets(100) == [16, 32, 64, 100]
    assert decode.buckets(8) == [8]


def test_a_mod_decoder_refuses_a_batch_and_a_step_before_prefill(ops):
    with pytest.raises(ValueError, match="batch 2 with MoD blocks"):
        decode.Decoder(ops, MOD, lm.init_params(MOD), batch=2)
    with pytest.raises(ValueError, match="before prefill"):
        decode.Decoder(ops, MOD, lm.init_params(MOD)).step([[1]])
    with pytest.raises(ValueError, match="skip 'sometimes'"):
        decode.Decoder(ops, MOD, lm.init_params(MOD), skip="sometimes")


SCHEMES = {"mod": MOD,
           "token_choice": LMConfig(dim=32, layers=2, heads=2, context=16, mlp=ExpertMLP(64),
                                    expert=ExpertMLP(32), moe=TokenChoice(num_experts=4)),
           "expert_choice": LMConfig(dim=32, layers=2, heads=2, context=16, mlp=ExpertMLP(64),
                                     expert=ExpertMLP(32), moe=ExpertChoice(num_experts=4))}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mode", ["eval", "causal"])
def test_evaluation_in_fixed_chunks_equals_the_whole_forward(ops, scheme, mode):
    config = SCHEMES[scheme]
    params = {k: ops.asarray(v) for k, v in _params(config, 0.1).items()}
    windows = np.random.default_rng(2).integers(0, 256, (10, config.context + 1))
    evaluation._COMPILED.clear()
    chunked = evaluation.evaluate(ops, config, params, windows, mode, batch=4)  # 4, 4, 2 (+2)
    shapes = {key[3] for key in evaluation._COMPILED}
    exact = evaluation.padding_is_exact(config, mode)
    assert shapes == ({(4, config.context)} if exact else {(4, config.context),
                                                           (2, config.context)})
    assert exact == (scheme != "expert_choice" or mode == "causal")
    logits, info = lm.forward(ops, config, params, windows[:, :-1], mode=mode, noise=False)
    logits = np.asarray(ops.to_numpy(logits), np.float64)
    z = logits.max(-1, keepdims=True)
    lse = (z + np.log(np.exp(logits - z).sum(-1, keepdims=True)))[..., 0]
    ce = lse - np.take_along_axis(logits, windows[:, 1:, None], -1)[..., 0]
    if exact:  # routing per row: chunks and padding change nothing
        assert chunked["loss"] == pytest.approx(ce.mean(), rel=1e-5)
        whole = evaluation.evaluate(ops, config, params, windows, mode, batch=10)
        for i, block in chunked["blocks"].items():
            for key in ("routed_fraction", "experts_per_token", "dropped_fraction"):
                assert block[key] == pytest.approx(whole["blocks"][i][key]), (i, key)
            routed = np.asarray(ops.to_numpy(info["blocks"][int(i)]["experts_per_token"]))
            assert block["routed_fraction"] == pytest.approx((routed > 0).mean())


def test_bench_generate_prints_rates_first_calls_and_ratios():
    result = CliRunner().invoke(main, ["bench", "generate", "--backend", "numpy", "--config",
                                       "tiny-mod", "--tokens", "6", "--prompt-len", "8",
                                       "--no-compare-mlx"])
    assert result.exit_code == 0, result.output
    for text in ("tiny-mod (mask)", "tiny-mod (branch)", "dense twin", "first calls",
                 "decode, routed", "routed b1:"):
        assert text in result.output, (text, result.output)


def test_after_warm_up_no_step_is_traced_again(autodiff_ops):
    decoder = decode.Decoder(autodiff_ops, MOD, _params(MOD), skip="branch")
    tokens = np.random.default_rng(3).integers(0, 256, 24)
    decoder.prefill(tokens[None, :4])
    decoder.warm_up()
    steps = {k: n for k, n in decoder.traces.items() if k[0] == "branch"}
    assert len(steps) == 1 + len(decode.mod_blocks(MOD)), steps  # all-skip + one per MoD block
    for t in tokens[4:]:
        decoder.step([[t]])
    assert {k: n for k, n in decoder.traces.items() if k[0] == "branch"} == steps
