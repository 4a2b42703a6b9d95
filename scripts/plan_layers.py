"""`jaxalign plan` of a model too deep to compile here, from two shallow compiles (an extrapolation).

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python scripts/plan_layers.py Llama-3.1-70B \\
        model.dtype=bfloat16 mesh.data=1 mesh.fsdp=64 model.remat=full --topology v5p:4x4x4 \\
        --pairs 64 --layers 2 4 --out docs/plan/llama-3.1-70b_dpo_v5p-4x4x4_layers.json

By default jaxalign's decoders run their blocks one after another in Python, so the compiled train step
holds one copy of the block's program per layer, and a host must compile all of them: the 80-layer
Llama-3.1-70B would need far more host memory and time than the 8B's 10 GB and 5–10 minutes. With
``model.scan_layers=true`` (a scan over layers, :mod:`jaxalign.models.scan`) the program holds one block
and the real depth compiles directly (``jaxalign plan`` or ``scripts/plan_presets.py``; docs/scale.md);
this script takes that override too, and is then a check that a scanned plan's quantities grow as the
unrolled ones do. Every block is the same program, so each per-chip quantity of the compiled step (argument bytes,
temporaries, XLA's FLOPs and bytes accessed, every collective's bytes) is ``a + b·L`` in the layer count
``L`` as long as XLA schedules every layer alike. This script plans the model with ``--layers L1 L2``
blocks (the rest of its config unchanged), fits the line through the two plans and evaluates it at the
real depth; the roofline is then recomputed from the extrapolated inputs with the analytic FLOPs of the
full model. Checked against a real compile of Llama-3.1-8B (32 layers) in docs/scale.md. An estimate
of an estimate: XLA can schedule a deep program differently (e.g. keep more buffers live), which the
line does not see.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jaxalign.jobs import plan as P  # noqa: E402

MEMORY_KEYS = ("params_bytes", "optimizer_bytes", "batch_bytes", "other_bytes", "padding_bytes", "argument_bytes",
               "temp_bytes", "output_bytes", "code_bytes", "total_bytes")


def line_at(x1: float, y1: float, x2: float, y2: float, x: float) -> float:
    """The value at ``x`` of the line through ``(x1, y1)`` and ``(x2, y2)``."""
    return y1 + (y2 - y1) * (x - x1) / (x2 - x1)


def extrapolate(shallow: list[dict], layers: int, full_dims: dict, tgt, shapes, job: str) -> dict:
    """The plan at ``layers`` blocks from two plans of fewer blocks (each quantity on its line)."""
    (a, b), (la, lb) = shallow, (s["dims"]["layers"] for s in shallow)
    at = lambda ya, yb: line_at(la, ya, lb, yb, layers)  # noqa: E731
    mem = {k: at(a["memory"][k], b["memory"][k]) for k in MEMORY_KEYS if k in a["memory"]}
    out = {"estimate": True, "extrapolated_from_layers": [la, lb], "layers": layers, "model": a["model"],
           "job": job, "target": a["target"], "chips": a["chips"], "mesh": a["mesh"], "shapes": a["shapes"],
           "options": a["options"], "params": full_dims["params"], "memory": mem,
           "collectives": {k: {f: at(a["collectives"][k][f], b["collectives"][k][f])
                               for f in ("count", "bytes", "traffic_bytes")} for k in a["collectives"]}}
    hbm = tgt.hbm_bytes
    if hbm:
        mem.update(hbm_bytes=hbm, fits=mem["total_bytes"] <= hbm, headroom_bytes=hbm - mem["total_bytes"],
                   headroom_fraction=(hbm - mem["total_bytes"]) / hbm)
    if tgt.chip is None or "roofline_inputs" not in a:
        return out
    n, flops = a["chips"], P.analytic_flops(job, full_dims, shapes)
    inputs = dict(a["roofline_inputs"], flops_per_chip=max(at(a["flops"]["compiler_per_chip"],
                                                              b["flops"]["compiler_per_chip"]), flops["total"] / n),
                  hbm_bytes_per_chip=at(a["roofline_inputs"]["hbm_bytes_per_chip"],
                                        b["roofline_inputs"]["hbm_bytes_per_chip"]),
                  ici_bytes_per_chip=sum(c["traffic_bytes"] for c in out["collectives"].values()),
                  model_flops=flops["total"])
    out.update(roofline_inputs=inputs, roofline=P.roofline(tgt.chip, n, **inputs))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--job", default="train")
    ap.add_argument("--topology", required=True)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--response-len", type=int, default=512)
    ap.add_argument("--layers", type=int, nargs=2, default=(2, 4))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    hf, name = P.model_config(args.model)
    run = P.run_config(None, args.overrides)
    tgt, shapes = P.target(topology=args.topology), P.Shapes(args.pairs, args.prompt_len, args.response_len)
    shallow = []
    for layers in args.layers:
        t0 = time.time()
        p = P.plan(dict(hf, num_hidden_layers=layers), f"{name} ({layers} layers)", args.job, tgt, shapes, run)
        print(f"{layers} layers: {p['memory']['total_bytes'] / 1e9:.2f} GB per chip, compiled in "
              f"{time.time() - t0:.0f} s", flush=True)
        shallow.append(p)
    full_dims = P.model_dims(P.abstract_model(hf, run))
    result = extrapolate(shallow, hf["num_hidden_layers"], full_dims, tgt, shapes, args.job)
    result["shallow_plans"] = shallow
    P.write_json(result, args.out)
    m, r = result["memory"], result.get("roofline", {})
    print(f"{name} at {hf['num_hidden_layers']} layers (extrapolated): {m['total_bytes'] / 1e9:.1f} GB per chip "
          f"(temp {m['temp_bytes'] / 1e9:.1f}, arguments {m['argument_bytes'] / 1e9:.1f})"
          + (f" of {m['hbm_bytes'] / 1e9:.0f}: {'fits' if m['fits'] else 'DOES NOT FIT'}" if "fits" in m else "")
          + (f"; step {r['step_s'] * 1e3:.0f} – {r['step_s_no_overlap'] * 1e3:.0f} ms, MFU "
             f"{100 * r['mfu_no_overlap']:.0f} – {100 * r['mfu']:.0f}%" if r else ""))
    print(json.dumps({k: round(v["traffic_bytes"] / 1e9, 2) for k, v in result["collectives"].items()}))


if __name__ == "__main__":
    main()
