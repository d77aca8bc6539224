"""What a model config costs in memory, estimated before anything is allocated, so that absurd
sizes (a vocab of 10^11, a context of 10^8, a batch of 10^8) are refused with one line rather
than dying in an allocation or the kernel's OOM killer. May import: stdlib, moe_min.helpers.
"""

from __future__ import annotations

from moe_min.helpers import check_fits


def parameter_count(config) -> int:
    """An upper bound on the parameters `init_params` draws (each block counted with the larger
    of its dense and routed FFN), without allocating them."""
    D, moe = config.dim, config.moe
    width = 3 if config.mlp.glu else 2
    ffn = width * D * config.mlp.hidden
    if moe is not None:
        E, expert = moe.num_experts, config.expert
        routed = E * D * expert.hidden * (3 if expert.glu else 2) + D * E
        predictor = getattr(moe, "predictor", None)
        if predictor is not None:
            routed += (D + 1) * predictor.width(D) + (predictor.width(D) + 1) * E
        if hasattr(moe, "slots_for"):  # Soft MoE's slot parameters
            routed += D * E * moe.slots_for(config.context)
        ffn = max(ffn, routed)
    block = 4 * D * D + 2 * D + ffn + 2 * D + D * (D + 2)  # attention, norms, MoD router/predictor
    return (config.vocab + 1) * D * 2 + D + config.layers * block


def check_config_fits(config, batch_size: int = 0) -> None:
    """One line when the weights (and, with `batch_size`, a training step: gradients, AdamW's
    moments, the activations of batch_size x context tokens and their attention scores)
    exceed this machine's RAM.
    Decoding's KV caches (layers x context x 2D) count too."""
    params = parameter_count(config)
    need = 4 * params * (4 if batch_size else 1)
    need += 4 * 2 * config.layers * config.context * config.dim  # KV caches
    per_token = 4 * (config.dim * config.layers * 24 + config.vocab * 3)  # activations, grads
    need += batch_size * config.context * per_token
    need += batch_size * config.layers * config.heads * config.context ** 2 * 4 * 3  # attention
    what = (f"batch size {batch_size} x context {config.context}: a step of a model of about "
            f"{params:,} parameters") if batch_size else \
        f"a model of about {params:,} parameters (context {config.context})"
    check_fits(need, what, "lower --batch-size or the model's sizes (--set)" if batch_size else
               "lower the model's sizes")


def check_run_fits(config, batch_size: int, tokens) -> None:
    """Before a run allocates or gathers anything: the corpus's byte ids within the vocabulary
    (a larger id reaches the embedding gather unchecked: MLX reads out of bounds, or crashes),
    and a training step that fits in memory."""
    top = int(tokens.max())
    if top >= config.vocab:
        raise ValueError(f"vocab {config.vocab}: the corpus holds byte id {top}; a byte model "
                         f"needs vocab >= {top + 1}")
    check_config_fits(config, batch_size)
