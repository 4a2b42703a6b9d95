"""D2PO: the reward model (last-token scalar head, Bradley–Terry loss and gradients against float64 NumPy and
transformers' PyTorch model), gold labellers, the config, and the online loop end to end with an exact resume.

Models are tiny random ``transformers`` models with the tiny byte-level tokenizer; nothing is downloaded.
Compiled programs are cached on disk for the module (``jax_compilation_cache_dir``), so the runs of the
resume test compile once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from numerics import assert_close_to_scale  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from jaxalign import cli  # noqa: E402
from jaxalign.errors import CheckpointError, ConfigError  # noqa: E402
from jaxalign.online import config, d2po  # noqa: E402
from jaxalign.online import reward_model as rm  # noqa: E402
from jaxalign.train import step as step_lib  # noqa: E402

VOCAB = 272


pytestmark = pytest.mark.usefixtures("compile_cache")  # conftest: equal programs compile once


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A one-layer tiny random Llama with the tiny tokenizer (one layer: less to compile)."""
    folder = make_tiny("llama", tmp_path_factory.mktemp("d2po1") / "llama", vocab_size=VOCAB, pad_token_id=3,
                       eos_token_id=2, bos_token_id=4, num_hidden_layers=1)
    make_tiny_tokenizer(folder)
    return folder


# --- Bradley–Terry ----------------------------------------------------------------------------------------

def test_bradley_terry_equals_float64_numpy():
    rc = np.array([2.0, -1.0, 0.0, 50.0, -50.0, 3.5])
    rr = np.array([1.0, 1.0, 0.0, -50.0, 50.0, 3.5])
    got = np.asarray(rm.bradley_terry(jnp.asarray(rc), jnp.asarray(rr)))
    want = -np.log(1.0 / (1.0 + np.exp(-(rc - rr))))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Gradients: d/drc = -sigma(rr - rc), d/drr = +sigma(rr - rc).
    g = jax.grad(lambda a, b: jnp.sum(rm.bradley_terry(a, b)), argnums=(0, 1))(jnp.asarray(rc, jnp.float32),
                                                                               jnp.asarray(rr, jnp.float32))
    s = 1.0 / (1.0 + np.exp(-(rr - rc)))
    np.testing.assert_allclose(np.asarray(g[0]), -s, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g[1]), s, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        rm.bradley_terry(jnp.zeros(2), jnp.zeros(3))


def test_bradley_terry_doctest():
    import doctest

    assert doctest.testmod(rm).failed == 0


# --- the reward model against transformers ------------------------------------------------------------

PROMPTS = ["hello there\n", "q\n", "what is 2+2? "]
PAIRS = [{"prompt": 0, "chosen": "fine", "rejected": "go away now"},
         {"prompt": 1, "chosen": "a much longer answer", "rejected": "b"},
         {"prompt": 2, "chosen": "4", "rejected": "five"}]


def _setup(tiny):
    from flax import nnx
    from transformers import AutoTokenizer

    from jaxalign.models import load_pretrained

    backbone, _ = load_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(str(tiny), local_files_only=True)
    model = rm.RewardModel(backbone, rngs=nnx.Rngs(params=0), head_std=0.5)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    pairs = [{"prompt": p["prompt"], "chosen": tok(p["chosen"], add_special_tokens=False)["input_ids"] + [2],
              "rejected": tok(p["rejected"], add_special_tokens=False)["input_ids"] + [2]} for p in PAIRS]
    pairs[2]["rejected"] = pairs[2]["rejected"][:-1]  # a response cut before its EOS
    batch, w = d2po.pairs_batch(prompt_ids, pairs, np.array([0, 1, 2, -1]), 16, 32, 3)
    return model, prompt_ids, pairs, batch, w


def _torch_last_hidden(tiny, prompt_ids, pairs):
    """float64 ``hidden_states[-1]`` at the last token of each unpadded ``prompt + response`` (torch)."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float64,
                                                           attn_implementation="eager").eval()
    seqs = [prompt_ids[p["prompt"]] + p[k] for k in ("chosen", "rejected") for p in pairs]
    return hf, seqs


def test_reward_model_and_bt_gradients_equal_float64(tiny):
    import torch

    from jaxalign.models import params as params_lib

    model, prompt_ids, pairs, batch, w = _setup(tiny)
    hf, seqs = _torch_last_hidden(tiny, prompt_ids, pairs)
    W = np.asarray(model.head.kernel[...], np.float64)[:, 0]
    b0 = float(np.asarray(model.head.bias[...])[0])
    hs = torch.stack([hf(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0, -1] for s in seqs])
    H = hs.detach().numpy()
    r_np = H @ W + b0
    rc_np, rr_np = r_np[:3], r_np[3:]

    # Rewards: shared-prompt path (padded batch) and full rows agree with torch.
    parts, full = step_lib.ModelParts.split(model)
    rewards = jax.jit(lambda p, b: d2po.rm_rewards(p, parts.rest, b, parts=parts))
    rc, rr = rewards(full, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(np.asarray(rc)[:3], rc_np, atol=2e-5)
    np.testing.assert_allclose(np.asarray(rr)[:3], rr_np, atol=2e-5)
    s0 = seqs[0]
    np.testing.assert_allclose(float(model(jnp.asarray([s0 + [3, 3]]), jnp.asarray([[1] * len(s0) + [0, 0]]))[0]),
                               r_np[0], atol=2e-5)

    # Loss and head gradient against float64 NumPy; the bias gets no gradient (BT sees differences).
    trainable, frozen = d2po.split_trainable(full, "head")
    args = (frozen, parts.rest, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(w))
    (loss, metrics), g = jax.jit(jax.value_and_grad(lambda t: d2po.rm_loss(t, *args, parts=parts),
                                                    has_aux=True))(trainable)
    loss_np = np.mean(np.log1p(np.exp(rr_np - rc_np)))
    assert float(loss) == pytest.approx(loss_np, abs=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(rc_np > rr_np))
    sig = 1.0 / (1.0 + np.exp(-(rr_np - rc_np)))
    gw_np = (-(sig[:, None]) * (H[:3] - H[3:])).mean(0)
    np.testing.assert_allclose(np.asarray(g["head"]["kernel"])[:, 0], gw_np, atol=2e-5)
    np.testing.assert_allclose(np.asarray(g["head"]["bias"]), 0.0, atol=1e-6)

    # Whole-model gradient against torch autograd (float64) through the same loss.
    g_all = jax.jit(jax.grad(lambda t: d2po.rm_loss(t, {}, *args[1:], parts=parts)[0]))(full)
    grad_model = parts.merge(g_all)
    ours = params_lib.to_hf_tensors(grad_model.backbone)
    hf.zero_grad()
    Wt = torch.tensor(W, requires_grad=True)
    r_t = hs @ Wt + b0
    torch.nn.functional.softplus(r_t[3:] - r_t[:3]).mean().backward()
    named = dict(hf.named_parameters())
    checked = 0
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.norm.weight"):
        want = named[name].grad.numpy()
        scale = np.abs(want).max()
        np.testing.assert_allclose(ours[name], want, atol=1e-4 * scale + 1e-7, err_msg=name)
        checked += 1
    np.testing.assert_allclose(np.asarray(g_all["head"]["kernel"])[:, 0], Wt.grad.numpy(), atol=2e-5)
    assert checked == 4


# --- gold labellers, prompts, config ------------------------------------------------------------------------

def test_gold_labellers():
    g = d2po.keyword_gold("Yes")
    assert g("p", "yes, YES and no") == 2.0 and g("p", "no") == 0.0
    assert d2po.length_gold(3)("p", "one two three four") == -1.0
    assert d2po.charset_gold("aE")("p", "Alice eats") == 4.0
    assert d2po.length_gold(5, "chars")("p", "abc") == -2.0
    gold = d2po.make_gold(config.GoldConfig(kind="python", function="os.path:getsize"))
    assert gold is os.path.getsize
    with pytest.raises(ConfigError, match="cannot import"):
        d2po.make_gold(config.GoldConfig(kind="python", function="no_such_module:f"))


def _raw(tiny, out, **sections):
    raw = {"model": {"path": str(tiny)},
           "prompts": {"source": "synthetic:letters", "eval_size": 4},
           "gold": {"kind": "charset", "chars": "abcdefghijklmnopqrstuvwxyz"},
           "sampling": {"max_new_tokens": 8},
           "optim": {"name": "adamw", "lr": 1e-3},
           "discriminator": {"kind": "reward_model", "steps": 3, "batch_size": 4,
                             "optim": {"name": "adamw", "lr": 1e-3}},
           "online": {"rounds": 2, "prompts_per_round": 4, "gold_per_round": 2, "batch_size": 4},
           "eval": {"probe_size": 4},
           "output_dir": str(out)}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def test_config_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown config key online.round "):
        config.from_dict(_raw(tiny, tmp_path, online={"round": 3}))
    with pytest.raises(ConfigError, match="online.gold_per_round"):
        config.from_dict(_raw(tiny, tmp_path, online={"gold_per_round": 9}))
    with pytest.raises(ConfigError, match="discriminator.kind"):
        config.from_dict(_raw(tiny, tmp_path, discriminator={"kind": "magic"}))
    with pytest.raises(ConfigError, match="gold.function"):
        config.from_dict(_raw(tiny, tmp_path, gold={"kind": "python"}))


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "configs").glob("d2po_*.yaml")))
def test_shipped_configs_load(name):
    cfg = config.load(Path(__file__).parent.parent / "configs" / name)
    assert cfg.online.rounds >= 1


# --- the loop -------------------------------------------------------------------------------------------

def _leaves(run_dir: Path, rnd: int, like):
    from jaxalign.train.checkpoint import Checkpointer

    ck = Checkpointer(run_dir / "checkpoints", async_save=False)
    try:
        state, data, meta = ck.restore(rnd, like)
    finally:
        ck.close()
    return jax.tree.leaves(state), data


def test_one_round_end_to_end_and_resume_equals_uninterrupted(tiny, tmp_path, capsys):
    # Uninterrupted: two rounds through the command line.
    full_dir = tmp_path / "full"
    cfg_path = tmp_path / "d2po.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump(_raw(tiny, full_dir)))
    assert cli.main(["online", str(cfg_path), "--no-progress"]) == 0
    assert "2 rounds" in capsys.readouterr().out
    history = [json.loads(x) for x in (full_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2]
    r1 = history[1]
    assert r1["gold/labels_round"] == 2 and r1["gold/labels_used"] == 2 and history[2]["gold/labels_used"] == 4
    for key in ("gold/reward", "discriminator/train_loss", "policy/loss", "displacement/chosen_logps_change",
                "displacement/rejected_logps_change", "pairs/identical"):
        assert key in r1, key
    assert r1["silver/pairs"] + r1["pairs/identical"] + r1["gold/labels_round"] <= 4

    # Interrupted after round 1, then resumed.
    part_dir = tmp_path / "part"
    cfg = config.from_dict(_raw(tiny, part_dir))
    d2po.run_online(cfg, progress=False, stop_after=1)
    with pytest.raises(CheckpointError, match="holds a run already"):
        d2po.run_online(cfg, progress=False)
    with pytest.raises(CheckpointError, match="would change the run.*optim.lr"):
        d2po.run_online(config.from_dict(_raw(tiny, part_dir, optim={"lr": 1e-2})), resume=True, progress=False)
    d2po.run_online(cfg, resume=True, progress=False)
    resumed = [json.loads(x) for x in (part_dir / "metrics.jsonl").read_text().splitlines()]
    strip = lambda h: {k: v for k, v in h.items() if k != "time_s"}  # noqa: E731
    assert [strip(h) for h in resumed] == [strip(h) for h in history]

    like = d2po._Run(cfg, None, False).state
    a, data_a = _leaves(full_dir, 2, like)
    b, data_b = _leaves(part_dir, 2, like)
    assert data_a == data_b
    assert len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    # The policy and the discriminator moved.
    init = jax.tree.leaves(like)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, init))


def test_gold_only_baseline_and_dpo_discriminator(tiny, tmp_path):
    calls = []

    def gold(prompt, response):
        calls.append(response)
        return float(sum(ch.isalpha() for ch in response))

    cfg = config.from_dict(_raw(tiny, tmp_path / "gold", discriminator={"kind": "none"}, online={"rounds": 1}))
    last = d2po.run_online(cfg, gold=gold, progress=False)["final"]
    assert last["round"] == 1 and "silver/pairs" not in last and "discriminator/accuracy" not in last
    assert last["gold/labels_used"] == 2 and calls  # the user's labeller was used

    # A separate DPO model as the discriminator: reward = beta * log(pi_D / pi_ref).
    cfg = config.from_dict(_raw(tiny, tmp_path / "dpo", discriminator={"kind": "dpo"}, online={"rounds": 1}))
    last = d2po.run_online(cfg, gold=gold, progress=False)["final"]
    assert "discriminator/train_loss" in last and "policy/loss" in last
    if last["gold/buffer"]:
        assert last["discriminator/train_loss"] < 0.6931 + 1e-4  # it moved from log 2 (or stayed at it)


def test_head_only_step_on_features_equals_reward_model_step(tiny):
    import optax

    model, _, _, batch, w = _setup(tiny)
    parts, full = step_lib.ModelParts.split(model)
    trainable, frozen = d2po.split_trainable(full, "head")
    opt = optax.sgd(0.5)
    state = d2po.Learner(jnp.zeros((), jnp.int32), trainable, opt.init(trainable))
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    a, ma = jax.jit(lambda s: d2po.rm_step(s, frozen, parts.rest, b, jnp.asarray(w), parts=parts,
                                           optimizer=opt))(state)
    hc, hr = d2po.rm_features(full, parts.rest, b, parts=parts)
    h, mh = d2po.head_step(state, hc, hr, jnp.asarray(w), optimizer=opt)
    # two programs (features inside the jitted step vs a separate forward): rewards are D-term dot
    # products good to ~100 ulps; the SGD update 0.5·grad averages cancelling h_c − h_r terms, so it is
    # compared with its own scale (tests/numerics.py)
    np.testing.assert_allclose(float(ma["loss"]), float(mh["loss"]), rtol=1e-5)
    before = jax.tree.leaves(state.params)
    for x, y, p in zip(jax.tree.leaves(a.params), jax.tree.leaves(h.params), before):
        assert_close_to_scale(np.asarray(x) - np.asarray(p), np.asarray(y) - np.asarray(p), 1e-4,
                              err_msg="head update")
