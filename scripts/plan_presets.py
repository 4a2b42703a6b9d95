"""`jaxalign plan` over rows of (model preset × job × topology); raw results and the table of docs/scale.md.

    JAX_PLATFORMS=cpu python scripts/plan_presets.py                 # every row not in the raw file yet
    JAX_PLATFORMS=cpu python scripts/plan_presets.py --rows 8b-dpo-v5p-8 1b-dpo-v5e-4
    JAX_PLATFORMS=cpu python scripts/plan_presets.py --grid          # the generated grid (160 rows), resumable
    python scripts/plan_presets.py --table-only                      # rewrite the table from the raw file

Each row is planned by a separate ``jaxalign plan`` process (a compile that runs out of host memory
loses that row only) and appended as one JSON line to ``docs/plan/presets.jsonl``: the row, the plan
(or the failure), the compile and wall seconds, the host's CPU, memory and load, and the jax, jaxlib and
libtpu versions. Rows already in the file are skipped (resume); ``--retry-failed`` plans failed rows
again and ``--force --rows ID…`` plans those rows again after a code change (the earlier lines stay in
the file as the "before"; the last line wins). The rows are ordered most useful first, because a full
grid (10 presets × 3 jobs × 10 topologies) takes days on a small host: the 8B and 70B compiles take
minutes to hours each.

The table between the ``presets-table`` markers of ``docs/scale.md`` is rewritten from the raw file (the
last line of each row wins). Every number in it is an estimate of `jaxalign plan` (docs/plan.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import bench_record

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "docs" / "plan" / "presets.jsonl"
DOC = ROOT / "docs" / "scale.md"
BEGIN, END = "<!-- presets-table: begin (scripts/plan_presets.py) -->", "<!-- presets-table: end -->"
GRID_BEGIN, GRID_END = "<!-- grid-matrix: begin (scripts/plan_presets.py) -->", "<!-- grid-matrix: end -->"
BF16 = ["model.dtype=bfloat16"]  # float32 parameters and AdamW state, bfloat16 compute
LORA = ["lora.target=[q,k,v]", "lora.r=64", "lora.alpha=128", "loss.reference=adapter_off"]
SCAN_DOTS_4 = ["mesh.data=1", "mesh.fsdp=4", "model.remat=dots_with_no_batch_dims_saveable", "model.scan_layers=true"]


def _scan_full(fsdp: int) -> list[str]:
    """Scanned layers, full remat, the fused pair pass, parameters split over ``fsdp`` chips."""
    return ["mesh.data=1", f"mesh.fsdp={fsdp}", "model.remat=full", "data.fused_pairs=true", "model.scan_layers=true"]


SCAN_FULL_64 = _scan_full(64)


def _row(id_: str, model: str, job: str, topology: str, overrides=(), *, pairs: int = 8, prompt: int = 512,
         response: int = 512, method: str | None = None, search: int = 0, shard_params: bool = False) -> dict:
    row = dict(id=id_, model=model, job=job, topology=topology, overrides=list(BF16) + list(overrides),
               pairs=pairs, prompt_len=prompt, response_len=response, method=method, search=search)
    return dict(row, shard_params=True) if shard_params else row


# Most useful first: issue #15's targets (8B DPO on v5p-8 and v5e-16), the LoRA run, the 1B/3B sizes
# (minutes each), 8B CHES and entanglement (jvp), then larger slices.
ROWS = [
    _row("8b-dpo-v5p-8", "Llama-3.1-8B", "train", "v5p:2x2x1", ["mesh.data=1", "mesh.fsdp=4"]),
    _row("8b-dpo-lora-v5p-8", "Llama-3.1-8B", "train", "v5p:2x2x1", ["mesh.data=1", "mesh.fsdp=4"] + LORA),
    _row("1b-dpo-v5e-4", "Llama-3.2-1B", "train", "v5e:2x2",
         ["mesh.data=1", "mesh.fsdp=4", "train.grad_accum=2"]),
    _row("1b-dpo-v5e-4-free", "Llama-3.2-1B", "train", "v5e:2x2",
         ["mesh.data=1", "mesh.fsdp=4", "train.grad_accum=2", "mesh.constrain_activations=false"]),
    _row("8b-dpo-v5e-16", "Llama-3.1-8B", "train", "v5e:4x4",
         ["mesh.data=1", "mesh.fsdp=16", "model.remat=full", "data.fused_pairs=true"], pairs=16),
    _row("8b-dpo-v5e-16-bf16", "Llama-3.1-8B", "train", "v5e:4x4",
         ["mesh.data=1", "mesh.fsdp=16", "model.remat=full", "model.param_dtype=bfloat16"], pairs=16),
    _row("8b-dpo-v5e-16-tp2", "Llama-3.1-8B", "train", "v5e:4x4",
         ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=2", "model.remat=full"], pairs=8),
    _row("3b-dpo-v5p-8", "Llama-3.2-3B", "train", "v5p:2x2x1", ["mesh.data=1", "mesh.fsdp=4"]),
    _row("8b-ches-v5p-8", "Llama-3.1-8B", "ches", "v5p:2x2x1", ["mesh.data=1", "mesh.fsdp=4"]),
    _row("8b-entangle-jvp-v5p-8", "Llama-3.1-8B", "entangle", "v5p:2x2x1", ["mesh.data=1", "mesh.fsdp=4"],
         method="jvp"),
    _row("8b-entangle-gram-v5p-8", "Llama-3.1-8B", "entangle", "v5p:2x2x1", ["mesh.data=1", "mesh.fsdp=4"],
         method="gram"),
    _row("8b-dpo-v5p-16-b32", "Llama-3.1-8B", "train", "v5p:2x2x2",
         ["mesh.data=1", "mesh.fsdp=8", "model.remat=dots_with_no_batch_dims_saveable", "model.scan_layers=true"],
         pairs=32),
    _row("1b-dpo-v5e-16", "Llama-3.2-1B", "train", "v5e:4x4", ["mesh.data=4", "mesh.fsdp=4"], pairs=16),
    _row("3b-dpo-v5e-16", "Llama-3.2-3B", "train", "v5e:4x4", ["mesh.data=1", "mesh.fsdp=16", "model.scan_layers=true"],
         pairs=16),
    _row("3b-dpo-v5e-16-full", "Llama-3.2-3B", "train", "v5e:4x4",
         ["mesh.data=1", "mesh.fsdp=16", "model.remat=full", "model.scan_layers=true"], pairs=16),
    _row("1b-dpo-v6e-16", "Llama-3.2-1B", "train", "v6e:4x4", ["mesh.data=4", "mesh.fsdp=4", "model.scan_layers=true"],
         pairs=16),
    _row("70b-dpo-v5p-128", "Llama-3.1-70B", "train", "v5p:4x4x4",
         ["mesh.data=1", "mesh.fsdp=64", "model.remat=full", "data.fused_pairs=true", "model.scan_layers=true"],
         pairs=64),
    _row("8b-dpo-v5p-8-scan", "Llama-3.1-8B", "train", "v5p:2x2x1",
         ["mesh.data=1", "mesh.fsdp=4", "model.scan_layers=true"]),
    _row("8b-dpo-v5p-8-scan-dots", "Llama-3.1-8B", "train", "v5p:2x2x1",
         ["mesh.data=1", "mesh.fsdp=4", "model.remat=dots_with_no_batch_dims_saveable", "model.scan_layers=true"]),
    _row("8b-dpo-v5e-16-scan", "Llama-3.1-8B", "train", "v5e:4x4",
         ["mesh.data=1", "mesh.fsdp=16", "model.remat=full", "data.fused_pairs=true", "model.scan_layers=true"],
         pairs=16),
    # Session 7, scanned (1-2 minutes each here): the other presets, 70B CHES, larger v5e/v6e slices.
    _row("qwen72b-dpo-v5p-128", "Qwen2.5-72B", "train", "v5p:4x4x4", SCAN_FULL_64, pairs=64),
    _row("70b-ches-v5p-128", "Llama-3.1-70B", "ches", "v5p:4x4x4",
         ["mesh.data=1", "mesh.fsdp=64", "model.scan_layers=true"], pairs=64),
    _row("qwen7b-dpo-v5p-8-scan-dots", "Qwen2.5-7B", "train", "v5p:2x2x1", SCAN_DOTS_4),
    _row("olmo7b-dpo-v5p-8-scan-dots", "OLMo-2-7B", "train", "v5p:2x2x1", SCAN_DOTS_4),
    _row("olmo13b-dpo-v5p-16-scan", "OLMo-2-13B", "train", "v5p:2x2x2",
         ["mesh.data=1", "mesh.fsdp=8", "model.remat=full", "data.fused_pairs=true", "model.scan_layers=true"]),
    _row("8b-dpo-v6e-16-scan", "Llama-3.1-8B", "train", "v6e:4x4",
         ["mesh.data=1", "mesh.fsdp=16", "model.remat=full", "data.fused_pairs=true", "model.scan_layers=true"],
         pairs=16),
    _row("8b-dpo-v5e-64-scan", "Llama-3.1-8B", "train", "v5e:8x8",
         ["mesh.data=1", "mesh.fsdp=64", "model.remat=full", "data.fused_pairs=true", "model.scan_layers=true"],
         pairs=64),
    _row("8b-dpo-v5p-32-scan", "Llama-3.1-8B", "train", "v5p:2x2x4", _scan_full(16), pairs=16),
    _row("8b-dpo-v5p-128-scan", "Llama-3.1-8B", "train", "v5p:4x4x4", _scan_full(64), pairs=64),
    _row("8b-dpo-v6e-64-scan", "Llama-3.1-8B", "train", "v6e:8x8", _scan_full(64), pairs=64),
    _row("8b-ches-v5e-16-scan", "Llama-3.1-8B", "ches", "v5e:4x4",
         ["mesh.data=1", "mesh.fsdp=16", "model.scan_layers=true"], pairs=16),
    _row("qwen7b-ches-v5p-8-scan", "Qwen2.5-7B", "ches", "v5p:2x2x1", ["mesh.data=1", "mesh.fsdp=4",
                                                                    "model.scan_layers=true"]),
    _row("olmo13b-ches-v5p-8-scan", "OLMo-2-13B", "ches", "v5p:2x2x1", ["mesh.data=1", "mesh.fsdp=4",
                                                                      "model.scan_layers=true"]),
    _row("70b-dpo-v5e-256", "Llama-3.1-70B", "train", "v5e:16x16",
         ["mesh.data=1", "mesh.fsdp=256", "model.remat=full", "data.fused_pairs=true", "model.scan_layers=true"],
         pairs=256),
    # The 70B gram probe with its weights sharded (--shard-params) at half the grid's lengths (Session 9).
    _row("70b-entangle-gram-fsdp-v5p-32-256", "Llama-3.1-70B", "entangle", "v5p:2x2x4", ["mesh.data=1", "mesh.fsdp=16"],
         pairs=16, prompt=256, response=256, method="gram", shard_params=True),
    _row("70b-entangle-gram-fsdp-v5p-128", "Llama-3.1-70B", "entangle", "v5p:4x4x4", ["mesh.data=1", "mesh.fsdp=64"],
         pairs=64, method="gram", shard_params=True),
    # The same slice both ways: what sharding the weights costs and saves (8B, v5p-8; the grid's shapes).
    _row("8b-entangle-gram-fsdp-v5p-8", "Llama-3.1-8B", "entangle", "v5p:2x2x1", ["mesh.data=1", "mesh.fsdp=4"],
         pairs=4, method="gram", shard_params=True),
]


# The grid (docs/scale.md): every preset × {train, ches} × these topologies, one configuration rule per
# job (scanned layers; train: full remat and the fused pair pass; parameters and pairs split over every chip),
# then the gram entanglement probe (parameters replicated, one pair per chip) on each chip type's smallest slice.
GRID_TOPOLOGIES = {"v5p-8": "v5p:2x2x1", "v5e-16": "v5e:4x4", "v6e-16": "v6e:4x4", "v5p-32": "v5p:2x2x4",
                   "v5e-64": "v5e:8x8", "v6e-64": "v6e:8x8", "v5p-128": "v5p:4x4x4", "v5e-256": "v5e:16x16",
                   "v6e-256": "v6e:16x16", "v5p-512": "v5p:8x8x4"}
GRID_PRESETS = ["Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B", "Qwen2.5-7B", "OLMo-2-7B", "OLMo-2-13B",
                "Llama-3.1-70B", "Qwen2.5-72B"]
GRID_PRESETS_LATER = ["Gemma-2-9B", "Gemma-2-27B"]  # added once alternating layers scanned (Session 8)
GRAM_TOPOLOGIES = ["v5p-8", "v5e-16", "v6e-16"]
# The gram probe with its weights sharded over the chips (--shard-params, Session 9): where the replicated
# parameters take more than half a chip; the largest models first.
GRAM_FSDP_TOPOLOGIES = ["v5p-32", "v6e-16", "v5e-16", "v5p-8"]


def _chips(topology: str) -> int:
    return math.prod(int(d) for d in topology.split(":")[1].split("x"))


def _grid_row(preset: str, job: str, name: str) -> dict:
    """Train and ches scanned; gram unrolled: inside a scan every block's weights are used in a loop, which
    the Gram analysis cannot follow, so it would form every per-pair gradient (docs/entanglement.md)."""
    topology = GRID_TOPOLOGIES[name]
    chips = _chips(topology)
    split = ["mesh.data=1", f"mesh.fsdp={chips}"]
    overrides = {"train": _scan_full(chips), "ches": split + ["model.scan_layers=true"]}.get(job, split)
    gram = job.startswith("gram")
    return _row(f"grid-{preset.lower()}-{job}-{name}", preset, "entangle" if gram else job, topology,
                overrides, pairs=chips, method="gram" if gram else None, shard_params=job == "gram-fsdp")


@functools.cache
def replicated_gb(preset: str) -> float:
    """GB of the preset's float32 parameters: what every chip holds in the gram probe (replicated)."""
    from jaxalign.jobs import plan

    hf = json.loads((ROOT / "configs" / "models" / f"{preset}.json").read_text())
    return plan.model_dims(plan.abstract_model(hf, plan.run_config(None, [])))["params"] * 4 / 1e9


def hbm_gb(topology: str) -> float:
    from jaxalign.jobs import chips

    return chips.from_topology(topology).hbm_bytes / 1e9


def gram_can_fit(preset: str, name: str) -> bool:
    """Whether the replicated parameters alone leave room on the chip (else the row is not compiled)."""
    return replicated_gb(preset) < hbm_gb(GRID_TOPOLOGIES[name])


def gram_fsdp_wanted(preset: str, name: str) -> bool:
    """Whether the grid plans the sharded gram probe: the replicated parameters take more than half the
    chip, and their shards fit it."""
    gb, hbm = replicated_gb(preset), hbm_gb(GRID_TOPOLOGIES[name])
    return gb > hbm / 2 and gb / _chips(GRID_TOPOLOGIES[name]) < hbm


def grid_rows() -> list[dict]:
    """The grid's rows ``grid-{preset}-{job}-{slice}``: train and ches on each chip type's smallest slice,
    the gram probe there, then the larger slices (smaller first), then the sharded gram probe."""
    presets = GRID_PRESETS + GRID_PRESETS_LATER

    def train_and_ches(names):
        return [_grid_row(p, job, name) for name in names for p in presets for job in ("train", "ches")]

    gram = [_grid_row(p, "gram", name) for name in GRAM_TOPOLOGIES for p in presets if gram_can_fit(p, name)]
    by_size = sorted(presets, key=replicated_gb, reverse=True)
    gram_fsdp = [_grid_row(p, "gram-fsdp", name) for name in GRAM_FSDP_TOPOLOGIES for p in by_size
                 if gram_fsdp_wanted(p, name)]
    return (train_and_ches(GRAM_TOPOLOGIES) + gram
            + train_and_ches([n for n in GRID_TOPOLOGIES if n not in GRAM_TOPOLOGIES]) + gram_fsdp)


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "libtpu", "flax"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def host() -> dict:
    mem = {k: v for k, v in (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()[:3])}
    return {"cpu": bench_record.cpu_name(), "cpus": os.cpu_count(), "mem_total": mem.get("MemTotal", "").strip(),
            "load": list(os.getloadavg())}


def command(row: dict, out: Path, hlo_dir: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-c", "import sys; from jaxalign.cli import main; sys.exit(main())", "plan",
           row["model"], *row["overrides"], "--job", row["job"], "--topology", row["topology"],
           "--pairs", str(row["pairs"]), "--prompt-len", str(row["prompt_len"]),
           "--response-len", str(row["response_len"]), "--out", str(out)]
    if row["method"]:
        cmd += ["--method", row["method"]]
    if row.get("shard_params"):
        cmd += ["--shard-params"]
    if row["search"]:
        cmd += ["--search", "--max-compiles", str(row["search"])]
    if hlo_dir is not None:
        cmd += ["--hlo", str(hlo_dir / f"{row['id']}.hlo.txt")]
    return cmd


def run_row(row: dict, timeout: float, hlo_dir: Path | None = None) -> dict:
    """Plans one row in a child process; returns the raw line (``status`` ok, failed or timeout)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    entry = {"row": row, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host_before": host(),
             "versions": versions()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        t0 = time.time()
        try:
            proc = subprocess.run(command(row, out, hlo_dir), env=env, capture_output=True, text=True, timeout=timeout)
            entry.update(returncode=proc.returncode, tail=(proc.stdout + proc.stderr)[-1500:])
        except subprocess.TimeoutExpired:
            entry.update(returncode=None, tail=f"timed out after {timeout:.0f} s")
        entry["wall_s"] = round(time.time() - t0, 1)
        # peak resident memory of the largest child so far (the row's own compile when one row is planned)
        entry["children_max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
        entry["host_after"] = host()
        if out.exists():
            entry.update(status="ok", plan=json.loads(out.read_text()))
        else:
            entry["status"] = "timeout" if entry["returncode"] is None else "failed"
    return entry


def read_raw(path: Path) -> dict[str, dict]:
    """The last line of each row id in the raw file, its plan refreshed by ``plan.with_recompute`` (lines
    written before Session 8 left rematerialisation's recomputation out of scanned steps' compute time)
    and ``plan.with_reparsed_refusal`` (a refused program's memory from libtpu's other message form)."""
    from jaxalign.jobs import plan

    found = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                e = json.loads(line)
                if e.get("plan"):
                    e["plan"] = plan.with_reparsed_refusal(plan.with_recompute(e["plan"]))
                found[e["row"]["id"]] = e
    return found


def _cell_config(p: dict) -> str:
    o = p["options"]
    mesh = "×".join(str(p["mesh"][k]) for k in ("data", "fsdp", "tensor"))
    extra = f", LoRA r={o['lora_r']}" if o.get("lora_r") else ""
    extra += f", {o['param_dtype']} params" if o.get("param_dtype") != "float32" else ""
    extra += ", activations unconstrained" if o.get("constrain_activations") is False else ""
    extra += ", fused pairs" if o.get("fused_pairs") else ""
    extra += ", scanned layers" if o.get("scan_layers") else ""
    return (f"mesh {mesh}, remat {o['remat'] or 'none'}, grad_accum {o.get('grad_accum', 1)}, "
            f"{p['shapes']['pairs']} pairs{extra}")


def table(entries: dict[str, dict]) -> str:
    head = ("| row | model | job | topology (chips) | configuration | fits | GB per chip (of HBM) | step "
            "(estimate: overlap – serial) | MFU (estimate) | compile s |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for row in ROWS + [g for g in grid_rows() if g["id"] in entries]:  # the grid's rows once compiled
        e = entries.get(row["id"])
        job = row["job"] + (f" {row['method']}" if row["method"] else "")
        if e is None:
            lines.append(f"| {row['id']} | {row['model']} | {job} | {row['topology']} | "
                         f"{' '.join(row['overrides'])}, {row['pairs']} pairs | not compiled | | | | |")
            continue
        if e["status"] != "ok":
            rc = e.get("returncode")
            why = (f"killed by signal {-rc} (host out of memory, most likely)" if rc is not None and rc < 0 else
                   e["tail"].strip().splitlines()[-1][:120].replace("|", "/") if e.get("tail") else e["status"])
            lines.append(f"| {row['id']} | {row['model']} | {job} | {row['topology']} | "
                         f"{' '.join(row['overrides'])} | {e['status']}: {why} | | | | {e['wall_s']} (wall) |")
            continue
        p = e["plan"]
        m, r = p["memory"], p.get("roofline") or {}
        fits = "yes" if m.get("fits") else ("no (compiler: out of HBM)" if "compiler_error" in m else "no")
        step = (f"{r['step_s'] * 1e3:.0f} – {r['step_s_no_overlap'] * 1e3:.0f} ms" if r else "")
        mfu = f"{100 * r['mfu_no_overlap']:.0f} – {100 * r['mfu']:.0f}%" if r else ""
        lines.append(f"| {row['id']} | {p['model']} | {job} | {p['target']} ({p['chips']}) | {_cell_config(p)} | "
                     f"{fits} | {m['total_bytes'] / 1e9:.1f} ({m['hbm_bytes'] / 1e9:.0f}) | {step} | {mfu} | "
                     f"{p['compile_s']} |")
    return "\n".join(lines)


def _cell(e: dict | None) -> str:
    """One grid cell: GB per chip and the MFU range when it fits, ✗ and GB when not, – when not compiled."""
    if e is None:
        return "–"
    if e["status"] != "ok":
        return e["status"]
    m, r = e["plan"]["memory"], e["plan"].get("roofline") or {}
    if not m.get("fits"):
        return f"✗ {m['total_bytes'] / 1e9:.1f}"
    return f"{m['total_bytes'] / 1e9:.1f} · {100 * r['mfu_no_overlap']:.0f}–{100 * r['mfu']:.0f}%" if r else "fits"


def grid_matrix(entries: dict[str, dict]) -> str:
    """The grid as one line per preset and job, one column per topology (:func:`_cell`)."""
    names = list(GRID_TOPOLOGIES)
    lines = ["| preset | job | " + " | ".join(f"{n} ({_chips(GRID_TOPOLOGIES[n])})" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for preset in GRID_PRESETS + GRID_PRESETS_LATER:
        for job in ("train", "ches"):
            cells = [_cell(entries.get(f"grid-{preset.lower()}-{job}-{n}")) for n in names]
            lines.append(f"| {preset} | {job} | " + " | ".join(cells) + " |")
        lines.append(f"| {preset} | gram | " + " | ".join(_gram_cell(entries, preset, n) for n in names) + " |")
    return "\n".join(lines)


def _gram_cell(entries: dict[str, dict], preset: str, name: str) -> str:
    """The gram probe's cell: the replicated row where it fits, else the sharded one (marked "fsdp"), else
    what is known (the replicated row that did not fit, or "✗ params": the replicated parameters alone
    exceed the chip, not compiled)."""
    # replicated rows only where the grid plans them (the raw file keeps Session 8's first, discarded tries)
    rep = entries.get(f"grid-{preset.lower()}-gram-{name}") if gram_can_fit(preset, name) else None
    wanted = name in GRAM_FSDP_TOPOLOGIES and gram_fsdp_wanted(preset, name)
    sharded = entries.get(f"grid-{preset.lower()}-gram-fsdp-{name}") if wanted else None
    if rep and rep["status"] == "ok" and rep["plan"]["memory"].get("fits"):
        return _cell(rep)
    if sharded:
        return f"fsdp {_cell(sharded)}"
    if rep:
        return _cell(rep)
    if name not in GRAM_TOPOLOGIES and not wanted:
        return ""
    return "–" if wanted else f"✗ params {replicated_gb(preset):.0f}"


def _replace_between(text: str, begin: str, end: str, body: str, doc: Path) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: the markers {begin!r} and {end!r} are missing")
    before, rest = text.split(begin, 1)
    return before + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def write_table(entries: dict[str, dict], doc: Path) -> None:
    text = _replace_between(doc.read_text(), BEGIN, END, table(entries), doc)
    doc.write_text(_replace_between(text, GRID_BEGIN, GRID_END, grid_matrix(entries), doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", help="row ids to plan (default: all, in order)")
    ap.add_argument("--raw", type=Path, default=RAW)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    ap.add_argument("--retry-failed", action="store_true")
    ap.add_argument("--force", action="store_true",
                    help="plan the --rows again even when done (after a code change; the new line wins)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--grid", action="store_true", help="the issue's grid (grid_rows) instead of the hand-made rows")
    ap.add_argument("--hlo-dir", type=Path, help="also write each row's optimized HLO text here")
    args = ap.parse_args()
    # SIGTERM as an exception: subprocess.run then kills the row's compile instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    known = {r["id"]: r for r in ROWS + grid_rows()}
    unknown = [r for r in args.rows or () if r not in known]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(known)}")
    if not args.table_only:
        for row in (known[r] for r in args.rows) if args.rows else (grid_rows() if args.grid else ROWS):
            done = read_raw(args.raw).get(row["id"])
            if done and not (args.force and args.rows) and (done["status"] == "ok" or not args.retry_failed):
                continue
            print(f"{time.strftime('%H:%M:%S')} planning {row['id']}", flush=True)
            entry = run_row(row, args.timeout, args.hlo_dir)
            args.raw.parent.mkdir(parents=True, exist_ok=True)
            with open(args.raw, "a") as f:
                f.write(json.dumps(entry, default=str) + "\n")
            print(f"  {entry['status']} in {entry['wall_s']} s", flush=True)
            write_table(read_raw(args.raw), args.doc)
    write_table(read_raw(args.raw), args.doc)


if __name__ == "__main__":
    main()
