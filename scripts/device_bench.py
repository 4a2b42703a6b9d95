"""Accelerator benchmarks for ``scripts/device_check.sh``: jaxalign beside PyTorch on the same device.

Letters: B pairs (rows for ``forward``), P prompt tokens, R response tokens, T = P + R, D width, F MLP
width, L layers, N query heads, K key/value heads, H head dim, V vocabulary.

Subcommands (each run as its own process by the shell script, each under its own ``timeout``):

``versions``          python, jax, jaxlib, flax, optax, torch, transformers, the devices.
``matmul``            the versions again and the card's matmul rate in the run's dtype (8192³ on GPU,
                      1024³ on CPU; JAX and PyTorch, the better one is the peak used for model FLOPs
                      utilisation).
``jax --model M``     jaxalign's ``forward`` (logits of a ``[B, T]`` batch), ``train`` (one DPO step:
                      :func:`jaxalign.train.step.train_step`, cached reference log-probs, the prompt run
                      once, AdamW), ``ches`` (:func:`jaxalign.analysis.ches.make_scorer`) and ``entangle``
                      (:func:`jaxalign.analysis.entanglement.make_pair_grads`, ``method="gram"``).
``torch --model M``   the PyTorch counterparts on the same shapes: the ``transformers`` forward; a plain
                      DPO step (chosen and rejected rows ``[2B, T]``, float32 log-softmax of the logits,
                      cached reference log-probs, fused AdamW); CHES from ``transformers``' last hidden
                      states of the ``2B`` rows; entanglement by the papers' per-example autograd
                      procedure (for each pair, ``backward`` of log π(y_w|x) and of log π(y_l|x), the two
                      flattened gradients, their norms and inner product).
``table FILE``        the results table (partial results print: every finished task appended a line).

Models (random weights from a config; nothing is downloaded): ``1b`` is Llama-3.2-1B-shaped
(D 2048, F 8192, L 16, N 32, K 8, H 64, V 128256, tied), ``135m`` SmolLM2-135M-shaped (D 576, F 1536,
L 30, N 9, K 3, H 64, V 49152, tied); bfloat16 parameters and activations on both sides by default
(``--param-dtype float32`` runs mixed precision: float32 weights, bfloat16 compute). ``--cpu``
swaps in tiny one-block models and batches, float32 (XLA emulates bfloat16 on CPU), with the same stages
(the script's own test).

Model FLOPs (the useful work, each side counted on the tokens it runs): a forward pass is
``2 · (matmul parameters, lm_head included) · tokens + 4 · L · N · H · (causal query-key pairs)``; a
train step is 3 forwards (forward + backward; rematerialised logits are not counted). jaxalign runs the
prompt once per pair (``B·P + 2B·R`` tokens); PyTorch runs ``2B`` full rows. MFU = model FLOPs / time /
measured matmul peak.

    python scripts/device_bench.py jax --model 1b --out /tmp/results.jsonl
    python scripts/device_bench.py table /tmp/results.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TASKS = ("forward", "train", "ches", "entangle")
TARGETS = {  # (model, task, column) -> (threshold, description); checked on GPU only
    ("1b", "train", "speedup"): (1.5, "train step ≥ 1.5× PyTorch"),
    ("135m", "train", "speedup"): (1.5, "train step ≥ 1.5× PyTorch"),
    ("1b", "train", "mfu"): (0.40, "1B train-step MFU ≥ 40%"),
    ("1b", "entangle", "speedup"): (10.0, "entanglement gram ≥ 10× per-example autograd"),
    ("135m", "entangle", "speedup"): (10.0, "entanglement gram ≥ 10× per-example autograd"),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama-like model shape and the batch sizes of each task."""

    name: str
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    theta: float
    forward_bt: tuple[int, int]  # rows, tokens
    train_bpr: tuple[int, int, int]  # pairs, prompt, response
    ches_bpr: tuple[int, int, int]
    entangle_bpr: tuple[int, int, int]
    torch_entangle_pairs: int  # pairs timed with the per-example procedure (it is slow)

    def matmul_params(self) -> int:
        D, F, N, K, H = self.hidden, self.inter, self.heads, self.kv_heads, self.head_dim
        return self.layers * (D * (N + 2 * K) * H + N * H * D + 3 * D * F) + self.vocab * D

    def unembed_flops(self, tokens: int) -> float:
        """The lm_head's share of :meth:`forward_flops` (CHES computes no logits)."""
        return 2.0 * self.vocab * self.hidden * tokens

    def forward_flops(self, tokens: int, qk_pairs: int) -> float:
        return 2.0 * self.matmul_params() * tokens + 4.0 * self.layers * self.heads * self.head_dim * qk_pairs


SHAPES = {
    "1b": Shape("1b", 128256, 2048, 8192, 16, 32, 8, 64, 500000.0, forward_bt=(8, 512),
                train_bpr=(16, 256, 128), ches_bpr=(32, 256, 128), entangle_bpr=(8, 64, 64),
                torch_entangle_pairs=4),
    "135m": Shape("135m", 49152, 576, 1536, 30, 9, 3, 64, 100000.0, forward_bt=(16, 512),
                  train_bpr=(32, 256, 128), ches_bpr=(64, 256, 128), entangle_bpr=(16, 64, 64),
                  torch_entangle_pairs=8),
}
CPU_SHAPES = {  # --cpu: the same stages on tiny one-block models (GQA kept), float32 by default
    "1b": Shape("1b", 512, 64, 128, 1, 4, 2, 16, 10000.0, forward_bt=(4, 32), train_bpr=(4, 16, 8),
                ches_bpr=(4, 16, 8), entangle_bpr=(2, 8, 8), torch_entangle_pairs=2),
    "135m": Shape("135m", 256, 32, 64, 1, 4, 2, 8, 10000.0, forward_bt=(4, 32), train_bpr=(4, 16, 8),
                  ches_bpr=(4, 16, 8), entangle_bpr=(2, 8, 8), torch_entangle_pairs=2),
}


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def shared_prompt_work(P: int, R: int) -> tuple[int, int]:
    """Tokens and causal query-key pairs of one pair with the prompt run once."""
    return P + 2 * R, causal_pairs(P) + 2 * (R * P + causal_pairs(R))


def full_rows_work(P: int, R: int) -> tuple[int, int]:
    """Tokens and causal query-key pairs of one pair as two full rows."""
    return 2 * (P + R), 2 * causal_pairs(P + R)


# --- results -------------------------------------------------------------------------------------------

class TaskTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raises :class:`TaskTimeout` after ``seconds`` (checked when Python regains control)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise TaskTimeout(f"over its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def record(out: Path | None, row: dict) -> None:
    line = json.dumps(row, default=float)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")


def timed(fn, iters: int, warmup: int = 1, sync=lambda x: x) -> tuple[float, float]:
    """``(first call seconds, median seconds)`` of ``fn()``; the first call includes compilation."""
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        sync(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def peak_rate(out: Path | None) -> float | None:
    """The matmul peak (FLOP/s) recorded by the ``matmul`` stage in ``out``, if any."""
    if out is None or not out.exists():
        return None
    rates = [r.get("rate") for r in map(json.loads, out.read_text().splitlines())
             if r.get("stage") == "matmul" and r.get("status") == "ok"]
    return max(rates) if rates else None


def run_tasks(side: str, model: str, tasks, impls: dict, args) -> None:
    shape = (CPU_SHAPES if args.cpu else SHAPES)[model]
    peak = peak_rate(args.out)
    for task in tasks:
        row = dict(stage="bench", side=side, model=model, task=task, cpu=args.cpu, dtype=args.dtype,
                   param_dtype=args.param_dtype)
        t0 = time.perf_counter()
        try:
            with time_limit(args.task_timeout):
                row.update(impls[task](shape, args))
            row["status"] = "ok"
            if peak and row.get("flops") and row.get("time_s"):
                row["mfu"] = row["flops"] / row["time_s"] / peak
        except TaskTimeout as err:
            row.update(status="timeout", note=str(err))
        except Exception as err:  # a failed task is a result too; the next task still runs
            row.update(status="error", note=f"{type(err).__name__}: {str(err)[:300]}")
            traceback.print_exc()
        row["wall_s"] = time.perf_counter() - t0
        record(args.out, row)


# --- versions and matmul ---------------------------------------------------------------------------------

def _version(mod: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(mod)
    except metadata.PackageNotFoundError:
        pass
    try:
        return getattr(__import__(mod), "__version__", "?")
    except Exception as err:  # report, don't fail: the table says what is missing
        return f"missing ({type(err).__name__})"


def cmd_versions(args) -> None:
    row = dict(stage="versions", status="ok", python=platform.python_version())
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "safetensors", "tensorstore",
                "gguf"):
        row[mod] = _version(mod)
    try:
        import jax

        row["jax_devices"] = ", ".join(sorted({d.device_kind for d in jax.devices()}))
        row["jax_backend"] = jax.default_backend()
    except Exception as err:
        row["jax_devices"] = f"error: {err}"
    try:
        import torch

        row["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (torch)"
    except Exception as err:
        row["gpu"] = f"error: {err}"
    record(args.out, row)


def cmd_matmul(args) -> None:
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # PyTorch shares the GPU in this process
    cmd_versions(args)
    n = 1024 if args.cpu else 8192
    flops = 2.0 * n ** 3
    iters = 3 if args.cpu else 20
    try:
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), args.dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), args.dtype)
        mm = jax.jit(lambda a, b: a @ b)
        _, t = timed(lambda: mm(a, b), iters, warmup=3, sync=lambda x: x.block_until_ready())
        record(args.out, dict(stage="matmul", side="jax", status="ok", n=n, dtype=args.dtype, time_s=t,
                              rate=flops / t))
        del a, b
    except Exception as err:
        record(args.out, dict(stage="matmul", side="jax", status="error", note=f"{type(err).__name__}: {err}"))
    try:
        import torch

        dev = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
        a = torch.randn(n, n, dtype=getattr(torch, args.dtype), device=dev)
        b = torch.randn(n, n, dtype=getattr(torch, args.dtype), device=dev)
        sync = (lambda x: torch.cuda.synchronize()) if dev == "cuda" else (lambda x: x)
        _, t = timed(lambda: a @ b, iters, warmup=3, sync=sync)
        record(args.out, dict(stage="matmul", side="torch", status="ok", n=n, dtype=args.dtype, time_s=t,
                              rate=flops / t))
    except Exception as err:
        record(args.out, dict(stage="matmul", side="torch", status="error",
                              note=f"{type(err).__name__}: {err}"))


# --- batches -------------------------------------------------------------------------------------------------

def pair_batch(vocab: int, B: int, P: int, R: int, seed: int = 0) -> dict:
    """Random full-length pairs in the shared-prompt layout (NumPy), reference log-probs included."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ones = lambda n: np.ones((B, n), np.int32)  # noqa: E731
    return dict(prompt_ids=rng.integers(3, vocab, (B, P), dtype=np.int32), prompt_mask=ones(P),
                chosen_ids=rng.integers(3, vocab, (B, R), dtype=np.int32), chosen_mask=ones(R),
                rejected_ids=rng.integers(3, vocab, (B, R), dtype=np.int32), rejected_mask=ones(R),
                ref_chosen_logps=rng.normal(-R * 10.0, 1.0, B).astype(np.float32),
                ref_rejected_logps=rng.normal(-R * 10.0, 1.0, B).astype(np.float32))


# --- jaxalign ------------------------------------------------------------------------------------------------

def jax_model(shape: Shape, attention_impl: str, dtype: str, param_dtype: str):
    import jax.numpy as jnp
    from flax import nnx

    from jaxalign.models.llama import Llama, LlamaConfig
    from jaxalign.models.rope import RopeConfig

    cfg = LlamaConfig("llama", vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.inter,
                      num_layers=shape.layers, num_heads=shape.heads, num_kv_heads=shape.kv_heads,
                      head_dim=shape.head_dim, rope=RopeConfig(theta=shape.theta), norm_eps=1e-5,
                      tie_word_embeddings=True)
    dt, pdt = jnp.dtype(dtype), jnp.dtype(param_dtype)
    # One compiled initialisation instead of an eager op per parameter.
    return nnx.jit(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=pdt,
                                 attention_impl=attention_impl))()


def jax_tasks(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxalign.models import base

    models: dict = {}
    fallback = {"note": ""}

    def model_for(shape, impl):
        if (shape.name, impl) not in models:
            models.clear()  # one model alive at a time
            models[(shape.name, impl)] = jax_model(shape, impl, args.dtype, args.param_dtype)
        return models[(shape.name, impl)]

    def attention_used(model) -> str:
        return base.resolve_attention_impl(model.attention_impl, dtype=model.dtype,
                                           head_dim=model.cfg.head_dim)

    def preflight() -> None:
        """A small cuDNN attention forward and backward before the big compiles; XLA attention if it fails."""
        if args.attention not in ("auto", "cudnn") or jax.default_backend() not in ("gpu", "cuda"):
            return
        try:
            q = jax.random.normal(jax.random.key(0), (2, 8, 4, 64), jnp.dtype(args.dtype))
            mask = jnp.tril(jnp.ones((8, 8), bool))[None].repeat(2, 0)
            f = lambda q: base.attend(q, q, q, mask, impl="cudnn").astype(jnp.float32).sum()  # noqa: E731
            jax.block_until_ready(jax.jit(jax.grad(f))(q))
        except Exception as err:
            fallback["note"] = f"cuDNN attention preflight failed ({type(err).__name__}: {str(err)[:150]}); xla"
            args.attention = "xla"
            print(fallback["note"], flush=True)

    def with_fallback(task):
        """Runs ``task(shape, args, impl)``; a failure off the XLA attention path is retried on it."""
        def run(shape, args):
            try:
                out = task(shape, args, args.attention)
            except TaskTimeout:
                raise
            except Exception as err:
                if args.attention == "xla":
                    raise
                traceback.print_exc()
                models.clear()
                out = task(shape, args, "xla")
                out["note"] = f"attention {args.attention} failed ({type(err).__name__}: {str(err)[:150]}); xla"
            if fallback["note"] and not out.get("note"):
                out["note"] = fallback["note"]
            return out
        return run

    ready = lambda x: jax.block_until_ready(x)  # noqa: E731

    def forward(shape, args, impl):
        model = model_for(shape, impl)
        graphdef, state = nnx.split(model)
        Bf, T = shape.forward_bt
        ids = jnp.asarray(np.random.default_rng(0).integers(3, shape.vocab, (Bf, T)), jnp.int32)
        mask = jnp.ones_like(ids)
        fn = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m).logits)
        first, t = timed(lambda: fn(state, ids, mask), args.iters, sync=ready)
        out = fn(state, ids, mask)
        assert bool(jnp.isfinite(out).all()), "non-finite logits"
        return dict(time_s=t, first_call_s=first, tokens=Bf * T, tokens_per_s=Bf * T / t,
                    flops=shape.forward_flops(Bf * T, Bf * causal_pairs(T)), shape=f"B{Bf} T{T}",
                    attention=attention_used(model))

    def train(shape, args, impl):
        import optax

        from jaxalign.train import step as step_lib

        model = model_for(shape, impl)
        B, P, R = shape.train_bpr
        parts, params = step_lib.ModelParts.split(model)
        params = jax.tree.map(jnp.copy, params)  # the step donates its state; the model stays usable
        optimizer = optax.adamw(1e-5)
        spec = step_lib.Objective(names=("sigmoid",), weights=None, beta=0.1)
        state = step_lib.init_state(optimizer, params, None, None)
        step = step_lib.jit_train_step(parts=parts, spec=spec, optimizer=optimizer,
                                       schedule=optax.constant_schedule(1e-5), state_shardings=None,
                                       batch_shardings=None, rest_shardings=None, ref_shardings=None, mesh=None)
        batch = {k: jnp.asarray(v) for k, v in pair_batch(shape.vocab, B, P, R).items()}
        holder = [state]

        def run():
            holder[0], metrics = step(holder[0], batch, parts.rest, None)
            return metrics["loss"]

        first, t = timed(run, args.iters, sync=ready)
        loss = float(run())
        del holder
        assert np.isfinite(loss), f"loss {loss}"
        tokens, qk = shared_prompt_work(P, R)
        return dict(time_s=t, first_call_s=first, tokens=B * tokens, tokens_per_s=B * tokens / t,
                    pairs_per_s=B / t, flops=3 * shape.forward_flops(B * tokens, B * qk),
                    shape=f"B{B} P{P} R{R}", attention=attention_used(model), loss=loss)

    def ches(shape, args, impl):
        from jaxalign.analysis import ches as ches_lib

        model = model_for(shape, impl)
        B, P, R = shape.ches_bpr
        scorer = ches_lib.make_scorer(model)
        batch = pair_batch(shape.vocab, B, P, R)
        first, t = timed(lambda: scorer(batch), args.iters)
        scores = scorer(batch)
        assert np.isfinite(np.asarray(scores["ches"])).all(), "non-finite CHES"
        tokens, qk = shared_prompt_work(P, R)
        return dict(time_s=t, first_call_s=first, pairs_per_s=B / t, tokens=B * tokens,
                    flops=shape.forward_flops(B * tokens, B * qk) - shape.unembed_flops(B * tokens),
                    shape=f"B{B} P{P} R{R}", attention=attention_used(model))

    def entangle(shape, args, impl):
        from jaxalign.analysis import entanglement

        model = model_for(shape, impl)
        B, P, R = shape.entangle_bpr
        batch = pair_batch(shape.vocab, B, P, R)
        probe = entanglement.make_pair_grads(model, method="gram", chunk_size=B)
        first, t = timed(lambda: probe(batch), args.iters)
        g = probe(batch)
        assert np.isfinite(g.grad_inner).all(), "non-finite inner products"
        tokens, _ = shared_prompt_work(P, R)
        return dict(time_s=t, first_call_s=first, pairs_per_s=B / t, tokens=B * tokens,
                    shape=f"B{B} P{P} R{R}", method=g.method, attention=attention_used(model))

    preflight()
    return {name: with_fallback(fn) for name, fn in
            dict(forward=forward, train=train, ches=ches, entangle=entangle).items()}


# --- PyTorch ---------------------------------------------------------------------------------------------

def torch_model(shape: Shape, device: str, dtype: str):
    """The ``transformers`` Llama of ``shape`` with random weights stored in ``dtype``."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.inter,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, rope_theta=shape.theta, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype),
                                                              attn_implementation="sdpa")
    return model


def torch_tasks(args) -> dict:
    import numpy as np
    import torch

    device = "cuda" if (torch.cuda.is_available() and not args.cpu) else "cpu"
    sync = (lambda x: torch.cuda.synchronize()) if device == "cuda" else (lambda x: x)
    models: dict = {}

    def model_for(shape):
        if shape.name not in models:
            models.clear()
            models[shape.name] = torch_model(shape, device, args.param_dtype)
        return models[shape.name]

    def rows(batch):
        """The ``2B`` full rows (chosen then rejected) and the mask of positions predicting a response."""
        P = batch["prompt_ids"].shape[1]
        ids = np.concatenate([np.concatenate([batch["prompt_ids"], batch[k]], 1)
                              for k in ("chosen_ids", "rejected_ids")], 0)
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        predicts = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        predicts[:, P - 1:-1] = True
        return ids, predicts

    def seq_logps(logits, ids, predicts):
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        tok = torch.gather(logp, 2, ids[:, 1:, None])[..., 0]
        return (tok * predicts[:, :-1]).sum(-1)

    def forward(shape, args):
        model = model_for(shape).eval()
        Bf, T = shape.forward_bt
        ids = torch.as_tensor(np.random.default_rng(0).integers(3, shape.vocab, (Bf, T)), device=device)

        def run():
            with torch.no_grad():
                return model(input_ids=ids).logits

        first, t = timed(run, args.iters, sync=sync)
        return dict(time_s=t, first_call_s=first, tokens=Bf * T, tokens_per_s=Bf * T / t,
                    flops=shape.forward_flops(Bf * T, Bf * causal_pairs(T)), shape=f"B{Bf} T{T}")

    def train(shape, args):
        model = model_for(shape).train()
        B, P, R = shape.train_bpr
        batch = pair_batch(shape.vocab, B, P, R)
        ids, predicts = rows(batch)
        ref = torch.as_tensor(np.concatenate([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]),
                              device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
        beta = 0.1

        def run():
            logps = seq_logps(model(input_ids=ids).logits, ids, predicts) - ref
            margin = logps[:B] - logps[B:]
            loss = -torch.nn.functional.logsigmoid(beta * margin).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        first, t = timed(run, args.iters, sync=sync)
        tokens, qk = full_rows_work(P, R)
        return dict(time_s=t, first_call_s=first, tokens=B * tokens, tokens_per_s=B * tokens / t,
                    pairs_per_s=B / t, flops=3 * shape.forward_flops(B * tokens, B * qk),
                    shape=f"B{B} P{P} R{R}", loss=float(run().detach()))

    def ches(shape, args):
        model = model_for(shape).eval()
        B, P, R = shape.ches_bpr
        ids, predicts = rows(pair_batch(shape.vocab, B, P, R))
        # S(y) sums the hidden states at the positions predicting response tokens (DESIGN §3).
        w = predicts.float()[..., None]

        def run():
            with torch.no_grad():
                h = model.model(input_ids=ids).last_hidden_state.float()
                s = (h * w).sum(1)
                sw, sl = s[:B], s[B:]
                return (sw * sl).sum(-1) - (sw * sw).sum(-1)

        first, t = timed(run, args.iters, sync=sync)
        tokens, qk = full_rows_work(P, R)
        return dict(time_s=t, first_call_s=first, pairs_per_s=B / t, tokens=B * tokens,
                    flops=shape.forward_flops(B * tokens, B * qk) - shape.unembed_flops(B * tokens),
                    shape=f"B{B} P{P} R{R}")

    def entangle(shape, args):
        model = model_for(shape).train()
        _, P, R = shape.entangle_bpr
        n = shape.torch_entangle_pairs
        ids, predicts = rows(pair_batch(shape.vocab, n, P, R))
        params = [p for p in model.parameters() if p.requires_grad]

        def grad_of(row):
            model.zero_grad(set_to_none=True)
            one, where = ids[row:row + 1], predicts[row:row + 1]
            seq_logps(model(input_ids=one).logits, one, where).sum().backward()
            return torch.cat([p.grad.float().reshape(-1) for p in params])

        def run():
            out = []
            for i in range(n):  # one pair at a time, as in the papers' code
                gw = grad_of(i)
                gl = grad_of(n + i)
                out.append(torch.stack([gw @ gw, gl @ gl, gw @ gl]))
                del gw, gl
            return torch.stack(out)

        first, t = timed(run, max(1, args.iters // 2), sync=sync)
        tokens, _ = full_rows_work(P, R)
        return dict(time_s=t / n * shape.entangle_bpr[0], pairs_per_s=n / t,
                    tokens=shape.entangle_bpr[0] * tokens, shape=f"B{n} P{P} R{R} (time scaled to "
                    f"B{shape.entangle_bpr[0]})")

    def autocast(task):
        if args.param_dtype == args.dtype:
            return task

        def run(shape, args):
            with torch.autocast(device, dtype=getattr(torch, args.dtype)):
                return task(shape, args)
        return run

    return {name: autocast(fn) for name, fn in
            dict(forward=forward, train=train, ches=ches, entangle=entangle).items()}


# --- table ---------------------------------------------------------------------------------------------

def _fmt(x, spec=".3g", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")] \
        if path.exists() else []
    lines = []
    for r in rows:
        if r.get("stage") == "versions":
            keys = ("python", "jax", "jaxlib", "flax", "optax", "torch", "transformers", "safetensors",
                    "tensorstore", "gguf", "jax_backend", "jax_devices", "gpu")
            lines.append("versions: " + ", ".join(f"{k} {r.get(k)}" for k in keys))
    for r in rows:
        if r.get("stage") == "tests":
            lines.append(f"tests ({r.get('name')}): {r.get('status')} in {_fmt(r.get('wall_s'), '.0f', ' s')}"
                         f" — {r.get('note', '')}")
    stages = [r for r in rows if r.get("stage") == "process"]
    if stages:
        lines.append("stages: " + ", ".join(f"{r.get('name')} {r.get('status')} {r.get('wall_s')}s"
                                            for r in stages))
    mm = [r for r in rows if r.get("stage") == "matmul"]
    for r in mm:
        lines.append(f"matmul {r.get('dtype')} {r.get('n')}³ ({r.get('side')}): "
                     + (f"{r['rate'] / 1e12:.1f} TFLOP/s" if r.get("status") == "ok" else
                        f"{r.get('status')} {r.get('note', '')}"))
    cpu = any(r.get("cpu") for r in rows)
    bench = {(r["model"], r["task"], r["side"]): r for r in rows if r.get("stage") == "bench"}
    hdr = ("model", "task", "shape", "jaxalign s", "torch s", "speedup", "jax MFU", "torch MFU", "jax attn",
           "jax 1st call s", "status")
    out_rows = []
    checks = []
    for model in ("135m", "1b"):
        for task in TASKS:
            j, t = bench.get((model, task, "jax")), bench.get((model, task, "torch"))
            if j is None and t is None:
                continue
            jt = j.get("time_s") if j and j.get("status") == "ok" else None
            tt = t.get("time_s") if t and t.get("status") == "ok" else None
            speed = tt / jt if jt and tt else None
            status = "; ".join(f"{side} {r.get('status')}" + (f" ({r.get('note')})" if r.get("note") else "")
                               for side, r in (("jax", j), ("torch", t)) if r and (r.get("status") != "ok"
                                                                                  or r.get("note")))
            out_rows.append((model, task, (j or t or {}).get("shape", "-"), _fmt(jt, ".4f"), _fmt(tt, ".4f"),
                             _fmt(speed, ".2f", "×"), _fmt(j.get("mfu") * 100 if j and j.get("mfu") else None,
                                                            ".1f", "%"),
                             _fmt(t.get("mfu") * 100 if t and t.get("mfu") else None, ".1f", "%"),
                             (j or {}).get("attention", "-"), _fmt((j or {}).get("first_call_s"), ".1f"),
                             status or "ok"))
            for col, value in (("speedup", speed), ("mfu", j.get("mfu") if j else None)):
                if (model, task, col) in TARGETS:
                    threshold, what = TARGETS[(model, task, col)]
                    verdict = ("n/a (cpu run)" if cpu else "not measured" if value is None else
                               "PASS" if value >= threshold else "FAIL")
                    shown = ("-" if value is None else f"{value * 100:.1f}%" if col == "mfu"
                             else f"{value:.2f}×")
                    checks.append(f"  {model}: {what}: {shown} {verdict}")
    if out_rows:
        widths = [max(len(str(x)) for x in col) for col in zip(hdr, *out_rows)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines.append(fmt.format(*hdr))
        lines.extend(fmt.format(*map(str, r)) for r in out_rows)
    else:
        lines.append("(no benchmark results)")
    if checks:
        lines.append("targets:")
        lines.extend(checks)
    lines.append("speedup = torch time / jaxalign time (> 1: jaxalign faster); MFU = model FLOPs / time / the "
                 "best matmul rate measured above; time per step (train), per batch (forward, ches, entangle).")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["versions", "matmul", "jax", "torch", "table", "record"])
    p.add_argument("file", nargs="?", type=Path, help="results file (table)")
    p.add_argument("--model", default="135m", choices=sorted(SHAPES))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--out", type=Path, default=None, help="append each result as a JSON line here")
    p.add_argument("--cpu", action="store_true", help="tiny models on the CPU (the script's test)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 5 GPU, 2 CPU)")
    p.add_argument("--task-timeout", type=float, default=None, help="seconds per task (soft limit)")
    p.add_argument("--attention", default="auto", help="jaxalign attention_impl (auto|xla|dot_product|cudnn)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="activations (compute) on both sides (default bfloat16; float32 with --cpu)")
    p.add_argument("--param-dtype", default=None, choices=["bfloat16", "float32"],
                   help="parameter storage (default: --dtype). float32 with --dtype bfloat16 is mixed "
                        "precision: jaxalign casts per matmul, PyTorch runs under torch.autocast")
    p.add_argument("--json", default=None, help="record: the JSON object to append")
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = 2 if args.cpu else 5
    if args.dtype is None:
        args.dtype = "float32" if args.cpu else "bfloat16"
    if args.param_dtype is None:
        args.param_dtype = args.dtype
    if args.command == "versions":
        cmd_versions(args)
    elif args.command == "matmul":
        cmd_matmul(args)
    elif args.command == "record":
        record(args.out, json.loads(args.json))
    elif args.command == "table":
        print(table(args.file or args.out))
    else:
        tasks = [t for t in args.tasks.split(",") if t]
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            p.error(f"unknown task {bad[0]!r} (tasks: {', '.join(TASKS)})")
        impls = jax_tasks(args) if args.command == "jax" else torch_tasks(args)
        run_tasks(args.command, args.model, tasks, impls, args)


if __name__ == "__main__":
    main()
