"""The two documented ways of getting reference log-probs, and the cache key of one of them (issue 21).

* ``loss.reference: online``: the reference weights are passed to the step, which runs them on each
  batch. It must give the same step as reference log-probs computed beforehand and put in the batch.
* the reference cache (``train/ref_cache.py``): its key must change with the weights, the dtype and the
  token ids, and with nothing else: not with the folder the weights are in, the output folder or the
  batch size.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from numerics import assert_trees_close_to_scale  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from jaxalign.train import config, loop, optim, ref_cache  # noqa: E402
from jaxalign.train import step as step_lib  # noqa: E402

VOCAB = 272  # the tiny tokenizer's 265 ids, rounded up
PAIRS = [{"prompt": f"question {i}?\n", "chosen": "yes " * (i % 3 + 1), "rejected": "no, not at all"[:4 + i]}
         for i in range(6)]

pytestmark = pytest.mark.usefixtures("compile_cache")  # conftest: equal programs compile once


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A policy and a reference of the same structure with different weights, and the pairs."""
    root = tmp_path_factory.mktemp("refmodes")
    out = {"root": root}
    for name, seed in (("policy", 0), ("reference", 1)):
        out[name] = make_tiny("llama", root / name, seed=seed, vocab_size=VOCAB, pad_token_id=3,
                              eos_token_id=2, bos_token_id=4)
        make_tiny_tokenizer(out[name])
    out["data"] = root / "pairs.jsonl"
    out["data"].write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return out


# --- loss.reference: online == cached ------------------------------------------------------------------

def _batch(tokens, pad_id):
    batch = loop.host_batch(tokens, np.arange(4), loop.padded_lengths(tokens), pad_id)
    return {k: jnp.asarray(v) for k, v in batch.items() if k in step_lib.BATCH_KEYS}


def test_online_reference_step_equals_cached_reference_step(tiny):
    from jaxalign import models

    model, tok = models.load_pretrained(tiny["policy"])
    ref_model, _ = models.load_pretrained(tiny["reference"])
    tokens = loop.load_tokens(str(tiny["data"]), tok, config.DataConfig())
    batch = _batch(tokens, tok.pad_token_id)
    parts, params = step_lib.ModelParts.split(model)
    _, ref_params = step_lib.ModelParts.split(ref_model)
    # the cached mode: the reference's log-probs computed beforehand (as the cache computes them)
    cached = jax.jit(lambda p, b: step_lib.logps_step(p, b, parts.rest, parts=parts))(ref_params, batch)
    policy_lp = jax.jit(lambda p, b: step_lib.logps_step(p, b, parts.rest, parts=parts))(params, batch)
    # a reference that differs from the policy, or the test could not tell the modes apart
    assert np.abs(np.asarray(cached["chosen_logps"]) - np.asarray(policy_lp["chosen_logps"])).max() > 0.1
    cfg = config.OptimConfig(name="sgd", lr=1.0)
    opt, sched = optim.make_optimizer(cfg, 10), optim.make_schedule(cfg, 10)
    spec = step_lib.Objective(names=("sigmoid",), weights=None, beta=0.1)
    fn = step_lib.jit_train_step(parts=parts, spec=spec, optimizer=opt, schedule=sched, state_shardings=None,
                                 batch_shardings=None, rest_shardings=None, ref_shardings=None, mesh=None)

    def run(batch_, ref):
        state = step_lib.init_state(opt, jax.tree.map(jnp.copy, params), None, None)
        return fn(state, batch_, parts.rest, ref)

    s_on, m_on = run(batch, ref_params)
    s_ca, m_ca = run(dict(batch, ref_chosen_logps=cached["chosen_logps"],
                          ref_rejected_logps=cached["rejected_logps"]), None)
    # the same forward passes in two programs: log-probs summed over ~10 tokens agree to float32 rounding
    for k in step_lib.METRIC_NAMES + ("grad_norm",):
        np.testing.assert_allclose(m_on[k], m_ca[k], rtol=1e-5, atol=1e-6, err_msg=k)
    start = jax.tree.map(np.asarray, params)
    update = lambda s: jax.tree.map(lambda a, p: np.asarray(a, np.float64) - p, s.params, start)  # noqa: E731
    # SGD at lr 1: the update is the gradient; entries cancel, so compare to each leaf's scale
    assert_trees_close_to_scale(update(s_on), update(s_ca), 1e-4, "update")
    # and the reference really entered the loss: the reward margin is beta * (policy - reference) margins
    c, r = (np.asarray(policy_lp[k], np.float64) for k in ("chosen_logps", "rejected_logps"))
    rc, rr = (np.asarray(cached[k], np.float64) for k in ("chosen_logps", "rejected_logps"))
    np.testing.assert_allclose(m_on["rewards/margins"], np.mean(0.1 * ((c - rc) - (r - rr))), rtol=1e-4,
                               atol=1e-6)  # float32 sums of ~10 log-probs, compared in float64


# --- the reference cache key ---------------------------------------------------------------------------

def _key(weights, tokens, dtype="float32", lengths=(16, 16), shared_prompt=True):
    return ref_cache.cache_key(weights=weights, dtype=dtype, tokens=ref_cache.tokens_fingerprint(tokens),
                               lengths=lengths, shared_prompt=shared_prompt)


def test_cache_key_follows_weights_dtype_and_tokens_only(tiny, tmp_path):
    from jaxalign import models
    from jaxalign.data.tokenize import Ragged, TokenizedPairs

    _, tok = models.load_pretrained(tiny["policy"])
    tokens = loop.load_tokens(str(tiny["data"]), tok, config.DataConfig())
    w = ref_cache.weights_fingerprint(tiny["policy"])
    base = _key(w, tokens)
    # the same weights copied elsewhere: the key does not depend on where the weights are
    moved = Path(shutil.copytree(tiny["policy"], tmp_path / "elsewhere"))
    assert ref_cache.weights_fingerprint(moved) == w and _key(ref_cache.weights_fingerprint(moved), tokens) == base
    # one weight byte changed: another key
    weights_file = moved / "model.safetensors"
    raw = bytearray(weights_file.read_bytes())
    raw[-1] ^= 1
    weights_file.write_bytes(bytes(raw))
    assert _key(ref_cache.weights_fingerprint(moved), tokens) != base
    assert _key(ref_cache.weights_fingerprint(tiny["reference"]), tokens) != base
    # the dtype
    assert _key(w, tokens, dtype="bfloat16") != base
    # one token id changed: another key
    ids = [list(tokens.chosen[i]) for i in range(len(tokens))]
    ids[2][0] = (ids[2][0] + 1) % VOCAB
    changed = TokenizedPairs(tokens.index, tokens.prompt, Ragged.from_rows(ids), tokens.rejected)
    assert _key(w, changed) != base
    # equal tokens built anew: the same key
    again = TokenizedPairs(tokens.index, tokens.prompt, Ragged.from_rows([list(tokens.chosen[i])
                                                                         for i in range(len(tokens))]),
                           tokens.rejected)
    assert _key(w, again) == base


def _cfg(tiny, out: Path, batch_size: int, cache: Path) -> config.RunConfig:
    return config.from_dict({
        "model": {"path": str(tiny["policy"])}, "data": {"train": str(tiny["data"]), "probe_size": 2},
        "optim": {"name": "sgd", "lr": 0.5}, "train": {"batch_size": batch_size, "steps": 1},
        "mesh": {"data": 1}, "intervals": {"probe": None, "ledger": None, "checkpoint": None},
        "checkpoint": {"export": False, "async_save": False}, "output_dir": str(out), "cache_dir": str(cache)})


def test_runs_differing_in_output_folder_and_batch_size_share_one_cache_entry(tiny, tmp_path):
    cache = tmp_path / "cache"
    first = loop.setup(_cfg(tiny, tmp_path / "a", 2, cache))
    entries = sorted(p.name for p in cache.glob("*.npz"))
    assert entries, "the run wrote no reference cache entry"
    second = loop.setup(_cfg(tiny, tmp_path / "b" / "c", 3, cache))
    assert sorted(p.name for p in cache.glob("*.npz")) == entries  # hit: no new entry
    del first, second
