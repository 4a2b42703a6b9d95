"""`jaxalign plan` of device_bench's DPO train step on the device at hand, beside the measured time.

    python scripts/plan_device.py --model 1b --results /tmp/device_check/results.jsonl   # GPU
    JAX_PLATFORMS=cpu python scripts/plan_device.py --model 1b --cpu --results …           # tiny, CPU

The program planned is the benchmark's own (scripts/device_bench.py ``jax --model M``, task ``train``):
the same Llama shape (tied embeddings), pairs, prompt and response lengths and dtypes (bfloat16
parameters and compute on a GPU; float32 with ``--cpu``), one device, AdamW, cached reference
log-probs, the prompt run once per pair. Compiled ahead of time through :func:`jaxalign.jobs.plan.plan`
on the current backend (``--cpu``: ``--cpu-devices 1``, no chip spec, so no roofline), it prints the
plan's predicted step (roofline with and without overlap; an estimate from the chip table of
docs/plan.md) beside the step time the benchmark measured (its ``bench`` row for ``jax``/``train`` in the
results file), and appends a ``{"stage": "plan", …}`` line to that file. The plan itself goes to
``--out`` (default: ``plan_<model>_train.json`` beside the results).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import device_bench  # scripts/ is on the path when run as a script; it puts the repository there too


def hf_config(shape: device_bench.Shape) -> dict:
    """The HF ``config.json`` of device_bench's model (``device_bench.jax_model``'s LlamaConfig)."""
    return {"model_type": "llama", "vocab_size": shape.vocab, "hidden_size": shape.hidden,
            "intermediate_size": shape.inter, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
            "head_dim": shape.head_dim, "rope_theta": shape.theta, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True}


def measured_step(results: Path, model: str) -> float | None:
    """The benchmark's measured jaxalign train step (seconds), or None when it did not run or failed."""
    if not results.exists():
        return None
    found = None
    for line in results.read_text().splitlines():
        if line.strip().startswith("{"):
            r = json.loads(line)
            if (r.get("stage"), r.get("model"), r.get("task"), r.get("side")) == ("bench", model, "train", "jax"):
                found = r.get("time_s") if r.get("status") == "ok" else None
    return found


def compare_line(p: dict, measured: float | None) -> str:
    """One line: the plan's predicted step (overlap – serial) beside the measured one."""
    r = p.get("roofline")
    shape = f"{p['shapes']['pairs']} pairs of {p['shapes']['prompt_len']} + {p['shapes']['response_len']}"
    head = f"plan vs measured ({p['model']}, {p['target']}, train, {shape}): "
    pred = (f"predicted {r['step_s'] * 1e3:.3g} – {r['step_s_no_overlap'] * 1e3:.3g} ms ({r['bound']}-bound, "
            f"MFU {100 * r['mfu']:.0f}%)" if r else "predicted: no roofline (no chip spec for this device)")
    meas = f"measured {measured * 1e3:.3g} ms" if measured else "measured: no benchmark row"
    ratio = f", measured / predicted (overlap) {measured / r['step_s']:.2f}" if r and measured else ""
    mem = p["memory"]
    return (head + pred + "; " + meas + ratio + f"; memory {mem['total_bytes'] / 1e9:.3g} GB per device"
            + (f" of {mem['hbm_bytes'] / 1e9:.0f}" if mem.get("hbm_bytes") else ""))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b", choices=sorted(device_bench.SHAPES))
    ap.add_argument("--cpu", action="store_true", help="device_bench's tiny --cpu shapes, float32, 1 CPU device")
    ap.add_argument("--results", type=Path, required=True, help="device_bench's results file (read and appended)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from jaxalign.jobs import plan as P

    shape = (device_bench.CPU_SHAPES if args.cpu else device_bench.SHAPES)[args.model]
    dtype = "float32" if args.cpu else "bfloat16"
    run = P.run_config(None, [f"model.dtype={dtype}", f"model.param_dtype={dtype}", "mesh.data=1",
                              "optim.max_grad_norm=null"])  # device_bench: optax.adamw, no clipping
    tgt = P.target(cpu_devices=1) if args.cpu else P.target()
    B, Pl, R = shape.train_bpr
    p = P.plan(hf_config(shape), f"device_bench {args.model}", "train", tgt, P.Shapes(B, Pl, R), run)
    out = args.out or args.results.parent / f"plan_{args.model}_train.json"
    P.write_json(p, out)
    measured = measured_step(args.results, args.model)
    print(P.format_plan(p))
    print(compare_line(p, measured))
    r = p.get("roofline") or {}
    device_bench.record(args.results, {
        "stage": "plan", "model": args.model, "target": p["target"], "measured_s": measured,
        "predicted_s": r.get("step_s"), "predicted_serial_s": r.get("step_s_no_overlap"),
        "bound": r.get("bound"), "gb_per_device": p["memory"]["total_bytes"] / 1e9, "plan": str(out)})


if __name__ == "__main__":
    main()
