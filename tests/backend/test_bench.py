"""The benchmark code runs on every backend and reports what it measured (no timing asserts)."""

from __future__ import annotations

from click.testing import CliRunner

from moe_min import bench
from moe_min.cli import main

MODEL_LEVEL = True  # numpy and MLX: on tinygrad every new shape compiles (tests/conftest.py)


def test_layer_bench_reports_every_row_and_its_ratios(ops):
    timings = bench.layer(ops, tokens=64, dim=16, hidden=32, experts=4, top_k=2, repeat=1)
    glu = bench.layer(ops, tokens=64, dim=16, hidden=32, experts=4, top_k=2, glu=True, repeat=1)
    assert {t.name for t in glu} >= {"MoE layer fwd", "dense MLP fwd"}
    names = {t.name for t in timings}
    assert {"routing (plan only)", "MoE layer fwd", "dense MLP fwd"} <= names
    for t in timings:
        assert (t.seconds is not None and t.seconds > 0) or t.note, t
    labels = [label for label, _ in bench.ratios(timings)]
    assert "MoE/dense throughput, fwd" in labels and "routing share of the MoE fwd" in labels
    if ops.caps.autodiff:
        assert "MoE/dense throughput, fwd+bwd" in labels


def test_bench_cli_prints_environment_and_ratios():
    result = CliRunner().invoke(main, ["bench", "layer", "--backend", "numpy", "--tokens", "64",
                                       "--dim", "16", "--hidden", "32", "--repeat", "1"])
    assert result.exit_code == 0, result.output
    assert "OPENBLAS_CORETYPE" in result.output and "MoE/dense throughput, fwd" in result.output
    result = CliRunner().invoke(main, ["bench", "matmul", "--size", "64"])
    assert result.exit_code == 0 and "GFLOP/s" in result.output


def test_every_scheme_and_dropless_has_a_ratio_to_its_dense_equivalent(ops):
    for scheme, capacity in (("token_choice", "dropless"), ("token_choice", "1.25"),
                             ("expert_choice", "1.0"), ("soft_moe", "1.0")):
        timings = bench.layer(ops, tokens=32, dim=8, hidden=16, experts=4, top_k=2, repeat=1,
                              scheme=scheme, capacity=capacity)
        labels = [label for label, _ in bench.ratios(timings)]
        assert "MoE/dense throughput, fwd" in labels, (scheme, capacity, timings)


def test_bench_layer_refuses_a_bad_capacity_in_one_line():
    result = CliRunner().invoke(main, ["bench", "layer", "--capacity", "fast"])
    assert result.exit_code == 1 and "capacity 'fast'" in result.output, result.output
