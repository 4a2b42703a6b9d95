"""Mixture-of-experts dispatch: dense (every expert on every token) vs sparse (grouped, top-k only).

Builds one small random ``qwen3_moe``-shaped jaxalign model, and for each dispatch jits the gradient of
the mean squared logits (a forward and a backward pass, as a training step does), reads XLA's FLOP count
from the compiled program (``cost_analysis()["flops"]``) and times it (median of ``--iters`` calls after
one warm-up, the two dispatches alternating over ``--rounds``). It also checks that both give the same
loss. Prints one JSON line per dispatch and the ratios.

    python scripts/bench_moe.py                      # E=16 experts, k=2, 2 layers, 4 x 256 tokens
    python scripts/bench_moe.py --experts 8 --k 2 --batch 2 --seq 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models import moe
from jaxalign.models.llama import Llama, LlamaConfig


def build(args) -> nnx.Module:
    hf = {"model_type": "qwen3_moe", "vocab_size": args.vocab, "hidden_size": args.hidden,
          "intermediate_size": 4 * args.hidden, "moe_intermediate_size": args.expert_width,
          "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": args.hidden // 4, "num_experts": args.experts, "num_experts_per_tok": args.k,
          "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6,
          "rope_theta": 1e6, "max_position_embeddings": args.seq, "tie_word_embeddings": False}
    return Llama(LlamaConfig.from_hf(hf), rngs=nnx.Rngs(0))


def measure(model, dispatch: str, ids, mask, iters: int) -> tuple[float, float, list[float]]:
    """``(loss, compiled FLOPs, seconds per call)`` of the jitted gradient under ``dispatch``."""
    moe.set_dispatch(model, dispatch)
    graphdef, state = nnx.split(model)

    def loss(state):
        return jnp.mean(nnx.merge(graphdef, state)(ids, mask).logits.astype(jnp.float32) ** 2)

    fn = jax.jit(jax.value_and_grad(loss))
    compiled = fn.lower(state).compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    value, grads = compiled(state)
    jax.block_until_ready(grads)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state))
        times.append(time.perf_counter() - start)
    return float(value), flops, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expert-width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model = build(args)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, args.vocab, size=(args.batch, args.seq)), jnp.int32)
    mask = jnp.ones_like(ids)
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for dispatch in ("dense", "sparse"):
            value, flops, times = measure(model, dispatch, ids, mask, args.iters)
            row = results.setdefault(dispatch, {"dispatch": dispatch, "loss": value, "flops": flops, "times": []})
            row["times"] += times
    for row in results.values():
        row["median_s"] = statistics.median(row.pop("times"))
        print(json.dumps(row | {"config": vars(args)}))
    dense, sparse = results["dense"], results["sparse"]
    print(json.dumps({"flops_dense_over_sparse": dense["flops"] / sparse["flops"],
                      "time_dense_over_sparse": dense["median_s"] / sparse["median_s"],
                      "loss_rel_diff": abs(dense["loss"] - sparse["loss"]) / abs(dense["loss"]),
                      "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "load": os.getloadavg()[0], "backend": jax.default_backend()}))


if __name__ == "__main__":
    main()
