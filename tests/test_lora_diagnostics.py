"""Diagnostics on LoRA parameters: ``--params lora`` selects the adapters' A and B alone, and
``--adapter PATH`` (a PEFT folder made here by ``peft`` with non-zero B) loads onto the model of
``entangle``, ``ches``, ``displacement`` and ``probe``.

Checks: the entanglement of the LoRA leaves equals brute force (one ``jax.grad`` per response of its
summed log-prob with respect to A and B only, in float32: relative 1e-4, the summation order differs);
``--params lora`` on a model without adapters exits 2; ``ches --adapter`` equals ``ches`` of the merged
model written as a Hugging Face folder; ``displacement --adapter`` and ``probe --checkpoints … --adapter``
equal the same jobs on the merged folder; ``probe --run`` of a LoRA training run reads its adapters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from jaxalign import cli, models, pairs  # noqa: E402
from jaxalign.analysis import entanglement as ent  # noqa: E402
from jaxalign.errors import ConfigError  # noqa: E402
from jaxalign.models import lora  # noqa: E402

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 272
FAST = {"xla_backend_optimization_level": "0"}  # halves compile time; numerics unchanged
PAIRS = [
    {"prompt": "hello there, how are you?\n", "chosen": "fine thanks", "rejected": "go away"},
    {"prompt": "what is 2+2?\n", "chosen": "4", "rejected": "five, I think"},
    {"prompt": "name a colour\n", "chosen": "blue", "rejected": "hello"},
]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """``(base folder, PEFT adapter folder, merged folder, data file)``."""
    root = tmp_path_factory.mktemp("lora_diag")
    base = make_tiny("llama", root / "llama", vocab_size=VOCAB, pad_token_id=3, eos_token_id=2,
                     bos_token_id=4, max_position_embeddings=128)
    make_tiny_tokenizer(base)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    pm.save_pretrained(root / "adapter")
    model, tok = models.load_pretrained(base)
    lora.load_peft(model, root / "adapter")
    models.save_pretrained(lora.merged(model), tok, root / "merged")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return base, root / "adapter", root / "merged", data


def _examples():
    rng = np.random.default_rng(3)
    ids = lambda n: rng.integers(5, VOCAB, size=n).tolist()  # noqa: E731
    return [(ids(P), ids(Rc - 1) + [2], ids(Rr - 1) + [2]) for P, Rc, Rr in ((4, 3, 5), (6, 2, 2), (3, 5, 4))]


def _batch(ex, Tp=6, Tr=5):
    """Shared-prompt layout: prompts left-padded, responses right-padded."""
    out = {k: np.zeros((len(ex), Tp if k.startswith("prompt") else Tr), np.int32) for k in ent.BATCH_FIELDS}
    for b, (p, c, r) in enumerate(ex):
        out["prompt_ids"][b, Tp - len(p):], out["prompt_mask"][b, Tp - len(p):] = p, 1
        for side, y in (("chosen", c), ("rejected", r)):
            out[f"{side}_ids"][b, :len(y)], out[f"{side}_mask"][b, :len(y)] = y, 1
    return out


def _brute_lora(model, ex):
    """``[B, 2, |A, B|]``: per pair and side, the gradient of s = Σ log π(y_t|·) over the full row with
    respect to the LoRAParam leaves alone (the base weights are constants)."""
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def grad_s(adapters, ids, mask, plen):
        return jax.grad(lambda a: pairs.sequence_forward(nnx.merge(graphdef, a, rest), ids, mask, plen)
                        ["logps"][0])(adapters)

    out = []
    for p, c, r in ex:
        row = []
        for y in (c, r):
            seq = np.asarray([p + y], np.int32)
            g = grad_s(adapters, jnp.asarray(seq), jnp.ones_like(jnp.asarray(seq)), jnp.asarray([len(p)]))
            row.append(np.asarray(ravel_pytree(g)[0], np.float64))
        out.append(row)
    return np.asarray(out)


@pytest.mark.parametrize("method", ["exact", "gram"])
def test_lora_entanglement_equals_brute_force(made, method):
    base, adapter, _, _ = made
    model = lora.load_peft(models.load_pretrained(base)[0], adapter)
    ex = _examples()
    probe = ent.make_pair_grads(model, method=method, params="lora", compiler_options=FAST)
    res = probe(_batch(ex))
    names = probe.split.selected_names
    assert len(names) == 8 and all(".lora.lora_" in n for n in names)  # 2 layers × (q, v) × (A, B)
    g = _brute_lora(model, ex)
    scale = np.linalg.norm(g[:, 0], axis=1) * np.linalg.norm(g[:, 1], axis=1)
    # float32 on both sides with a different summation order: relative 1e-4
    np.testing.assert_allclose(res.grad_chosen_sqnorm, (g[:, 0] ** 2).sum(1), rtol=1e-4)
    np.testing.assert_allclose(res.grad_rejected_sqnorm, (g[:, 1] ** 2).sum(1), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(res.grad_inner) / scale, (g[:, 0] * g[:, 1]).sum(1) / scale, atol=1e-4)


def test_params_lora_selection(made):
    base, adapter, _, _ = made
    model = lora.load_peft(models.load_pretrained(base)[0], adapter)
    q = ent.split_model(model, ["lora", r"q_proj"]).selected_names
    assert q == tuple(f"layers.{i}.attn.q_proj.lora.lora_{x}" for i in (0, 1) for x in "ab")
    everything = ent.split_model(model).selected_names  # no --params: base weights and adapters
    assert set(q) < set(everything) and any(n.endswith("q_proj.kernel") for n in everything)
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        ent.split_model(models.load_pretrained(base)[0], "lora")


def test_entangle_cli_adapter_and_refusal(made, tmp_path, capsys):
    base, adapter, _, data = made
    rc = cli.main(["entangle", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "e"),
                   "--params", "lora", "--adapter", str(adapter), "--method", "exact"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    # 2 layers × (q: A [64, 2] + B [2, 4·16]; v: A [64, 2] + B [2, 2·16])
    assert summary["parameters"] == 2 * ((64 * 2 + 2 * 64) + (64 * 2 + 2 * 32))
    assert summary["adapter"] == str(adapter)
    capsys.readouterr()
    rc = cli.main(["entangle", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "f"),
                   "--params", "lora"])
    err = capsys.readouterr().err
    assert rc == 2 and "--params lora" in err and "Traceback" not in err


def test_ches_and_displacement_with_adapter_equal_merged(made, tmp_path):
    from jaxalign.jobs import ches, displacement

    base, adapter, merged, data = made
    a = ches.run_ches(str(base), str(data), str(tmp_path / "a"), adapter=str(adapter), progress=False)
    b = ches.run_ches(str(merged), str(data), str(tmp_path / "b"), progress=False)
    ta, tb = pq.read_table(tmp_path / "a" / "scores.parquet"), pq.read_table(tmp_path / "b" / "scores.parquet")
    for col in ("ches", "ln_ches", "real_cosine"):
        # merged kernels are W + s·A·B rounded to float32: 1e-4 relative
        np.testing.assert_allclose(ta.column(col).to_numpy(), tb.column(col).to_numpy(), rtol=1e-4, atol=1e-5)
    assert a["adapter"] == str(adapter) and b["adapter"] is None
    da = displacement.run_displacement(str(base), str(base), str(data), str(tmp_path / "da"),
                                       adapter=str(adapter), progress=False)
    db = displacement.run_displacement(str(base), str(merged), str(data), str(tmp_path / "db"), progress=False)
    for col in da["pairs"]:
        if np.issubdtype(np.asarray(da["pairs"][col]).dtype, np.floating):
            np.testing.assert_allclose(da["pairs"][col], db["pairs"][col], rtol=1e-4, atol=1e-5)  # as above


def test_probe_checkpoints_with_adapter(made, tmp_path):
    from jaxalign.jobs import probe

    base, adapter, merged, data = made
    a = probe.run_probe(str(tmp_path / "a"), str(data), checkpoints=[str(base), str(base)], adapter=str(adapter),
                        what="logps", progress=False)
    b = probe.run_probe(str(tmp_path / "b"), str(data), checkpoints=[str(merged), str(merged)], what="logps",
                        progress=False)
    ra, rb = probe.read_probe(tmp_path / "a" / probe.STORE_NAME), probe.read_probe(tmp_path / "b" / probe.STORE_NAME)
    assert a["steps"] == b["steps"]
    for key in probe.LOGP_MEASURES:
        np.testing.assert_allclose(ra[key], rb[key], rtol=1e-4)  # merged float32 kernels, as above


def test_probe_of_a_lora_run_reads_its_adapters(made, tmp_path):
    """``probe --run`` of a LoRA run: step 0 is the base (fresh adapters, B = 0) and the last checkpoint's
    adapters are the exported PEFT folder's (both checked against ``probe --checkpoints`` of those)."""
    from jaxalign.jobs import probe
    from jaxalign.train import config, loop

    base, _, _, data = made
    raw = {"model": {"path": str(base)}, "lora": {"target": ["q", "v"], "r": 2, "alpha": 4.0},
           "data": {"train": str(data), "probe_size": 1, "shuffle": False, "prompt_length": 32,
                    "response_length": 24},
           "loss": {"name": "sigmoid", "beta": 0.5, "reference": "adapter_off"},
           "optim": {"name": "sgd", "lr": 2.0}, "train": {"batch_size": 2, "steps": 1}, "mesh": {"data": 1},
           "intervals": {"probe": None, "ledger": None, "checkpoint": 1},
           "checkpoint": {"export": True, "async_save": False},
           "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "ref_cache")}
    loop.train(config.from_dict(raw), progress=False)
    got = probe.run_probe(str(tmp_path / "p"), str(data), run=str(tmp_path / "run"), what="logps", progress=False)
    assert got["steps"] == [0, 1]
    run_rows = probe.read_probe(tmp_path / "p")
    probe.run_probe(str(tmp_path / "b"), str(data), checkpoints=[str(base)], what="logps", progress=False)
    probe.run_probe(str(tmp_path / "a"), str(data), checkpoints=[str(base)], what="logps", progress=False,
                    adapter=str(tmp_path / "run" / "final_adapter"))
    for step, other in ((0, "b"), (1, "a")):
        want = probe.read_probe(tmp_path / other)
        for key in probe.LOGP_MEASURES:  # the same float32 computation: 1e-5
            np.testing.assert_allclose(run_rows[key][step], want[key][0], rtol=1e-5)
    assert np.abs(run_rows["chosen_logps"][1] - run_rows["chosen_logps"][0]).max() > 1e-3  # training moved it
    with pytest.raises(ConfigError, match="--adapter goes with --checkpoints"):
        probe.run_probe(str(tmp_path / "c"), str(data), run=str(tmp_path / "run"), adapter=str(base))


def test_lora_run_entanglement_is_over_the_adapters(made, tmp_path):
    """A LoRA run's logged ``entanglement/*`` (after step 1) are over A and B alone: brute force, one
    ``jax.grad`` per response with respect to the LoRAParam leaves of the exported adapter, on the run's
    own probe tokens."""
    from jaxalign.train import config, loop

    base, _, _, data = made
    raw = {"model": {"path": str(base)}, "lora": {"target": ["q", "v"], "r": 2, "alpha": 4.0},
           "data": {"train": str(data), "probe_size": 3, "shuffle": False},
           "loss": {"name": "sigmoid", "beta": 0.5, "reference": "adapter_off"},
           "optim": {"name": "sgd", "lr": 2.0}, "train": {"batch_size": 2, "steps": 1}, "mesh": {"data": 1},
           "intervals": {"probe": None, "ledger": None, "checkpoint": None, "entanglement": 1},
           "checkpoint": {"export": True, "async_save": False},
           "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "ref_cache")}
    cfg = config.from_dict(raw)
    loop.train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in rows if "entanglement/grad_inner_mean" in r]
    assert [r["step"] for r in rec] == [1]
    base_model, tok = models.load_pretrained(base)
    model = lora.load_peft(base_model, tmp_path / "run" / "final_adapter")
    tokens = loop.load_tokens(str(data), tok, cfg.data)
    b = loop.host_batch(tokens, np.arange(3), loop.padded_lengths(tokens), tok.pad_token_id)
    ex = [tuple(b[f"{k}_ids"][i][b[f"{k}_mask"][i] > 0].tolist() for k in ("prompt", "chosen", "rejected"))
          for i in range(3)]
    g = _brute_lora(model, ex)
    # float32 on both sides with a different summation order: relative 1e-4
    for key, want in (("grad_chosen_sqnorm", (g[:, 0] ** 2).sum(1)), ("grad_rejected_sqnorm", (g[:, 1] ** 2).sum(1)),
                      ("grad_inner", (g[:, 0] * g[:, 1]).sum(1))):
        np.testing.assert_allclose(rec[0][f"entanglement/{key}_mean"], want.mean(), rtol=1e-4, err_msg=key)
    cosine = (g[:, 0] * g[:, 1]).sum(1) / np.linalg.norm(g[:, 0], axis=1) / np.linalg.norm(g[:, 1], axis=1)
    np.testing.assert_allclose(rec[0]["entanglement/grad_cosine_mean"], cosine.mean(), atol=1e-4)
