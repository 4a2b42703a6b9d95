"""The trainer: config, optimisers (torch RMSprop exactly), the step, the loop, checkpoints, TRL parity.

Models are tiny random ``transformers`` models (``hf_tiny``) with the tiny byte-level tokenizer
(``tiny_tokenizer``), saved to temporary folders; nothing is downloaded. Compiled programs are cached on
disk for the session (``jax_compilation_cache_dir``), so runs with equal shapes compile once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_trees_close_to_scale

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from jaxalign.errors import CheckpointError, ConfigError  # noqa: E402
from jaxalign.train import config, loop, optim  # noqa: E402
from jaxalign.train import step as step_lib  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 272  # the tiny tokenizer's 265 ids, rounded up

PAIRS = [
    {"prompt": "hello there, how are you?\n", "chosen": "fine thanks", "rejected": "go away"},
    {"prompt": "what is 2+2?\n", "chosen": "4", "rejected": "five, I think"},
    {"prompt": "name a colour\n", "chosen": "blue", "rejected": "hello"},
    {"prompt": "say hi\n", "chosen": "hi!", "rejected": "no."},
    {"prompt": "is the sky green?\n", "chosen": "no, it is blue", "rejected": "yes"},
    {"prompt": "count to three\n", "chosen": "1 2 3", "rejected": "1 2"},
    {"prompt": "hello\n", "chosen": "hello!", "rejected": "bye"},
    {"prompt": "spell cat\n", "chosen": "c-a-t", "rejected": "k-a-t"},
]


pytestmark = pytest.mark.usefixtures("compile_cache")  # conftest: equal programs compile once


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``{"llama": folder, "gpt2": folder, "data": jsonl}`` with tokenizer files in each model folder."""
    root = tmp_path_factory.mktemp("train")
    out = {}
    for kind, extra in (("llama", {"max_position_embeddings": 128}), ("gpt2", {})):
        folder = make_tiny(kind, root / kind, vocab_size=VOCAB, pad_token_id=3, eos_token_id=2,
                           bos_token_id=4, **extra)
        make_tiny_tokenizer(folder)
        out[kind] = folder
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    out["data"] = data
    out["root"] = root
    return out


def _cfg(tiny, tmp_path, overrides=(), **sections) -> config.RunConfig:
    raw = {"model": {"path": str(tiny["llama"])},
           "data": {"train": str(tiny["data"]), "probe_size": 4},
           "optim": {"name": "sgd", "lr": 0.5},
           "train": {"batch_size": 4, "steps": 3},
           "mesh": {"data": 1},
           "intervals": {"probe": None, "ledger": None, "checkpoint": None},
           "checkpoint": {"export": False, "async_save": False},
           "output_dir": str(tmp_path / "run"), "cache_dir": str(tiny["root"] / "ref_cache")}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return config.from_dict(raw, list(overrides))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- configuration -------------------------------------------------------------------------------------

def test_config_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: m}\ndata: {train: d.jsonl}\noptim: {name: rmsprop, lr: 1.0e-7}\n"
                    "loss: {name: [{name: sigmoid, weight: 1.0}, {name: sft, weight: 0.5}], beta: 0.1}\n")
    cfg = config.load(path, ["optim.lr=2e-7", "train.batch_size=32", "train.grad_accum=4",
                             "mesh.fsdp=2", "intervals.eval=null"])
    assert cfg.optim.lr == 2e-7 and cfg.optim.name == "rmsprop" and cfg.train.grad_accum == 4
    assert cfg.mesh.fsdp == 2 and cfg.intervals.eval is None
    assert config.loss_terms(cfg.loss) == [("sigmoid", 1.0, {}), ("sft", 0.5, {})]
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        config.load(path, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"unknown config key optimizer"):
        config.load(path, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number, got 'fast'"):
        config.load(path, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"optim\.name: expected one of"):
        config.load(path, ["optim.name=lion"])
    with pytest.raises(ConfigError, match=r"train\.batch_size.*grad_accum"):
        config.load(path, ["train.batch_size=6", "train.grad_accum=4"])
    with pytest.raises(ConfigError, match=r"loss.name\[0\]: unknown loss 'dpoo'"):
        step_lib.Objective.from_config(config.load(path, ["loss.name=[dpoo]"]).loss)
    with pytest.raises(ConfigError, match=r"label_smoothing"):
        step_lib.Objective.from_config(config.load(path, ["loss.name=robust",
                                                         "loss.options={label_smoothing: 2.0}"]).loss)


def test_cli_train_reports_config_errors(tmp_path, capsys):
    from jaxalign import cli

    path = tmp_path / "run.yaml"
    path.write_text("model: {path: m}\ndata: {train: d.jsonl}\n")
    assert cli.main(["train", str(path), "optim.lr=fast"]) == 2
    assert "optim.lr: expected a number, got 'fast'" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["displacement_persona", "entanglement_sentiment", "cpu_small"])
def test_shipped_configs_load(name):
    cfg = config.load(ROOT / "configs" / f"{name}.yaml")
    step_lib.Objective.from_config(cfg.loss)
    if name == "displacement_persona":
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.decay, cfg.optim.eps) == ("rmsprop", 1e-7, 0.99, 1e-8)
        assert cfg.optim.max_grad_norm is None and cfg.optim.schedule == "constant"


def test_resume_config_changes_classified():
    base = config.from_dict({"model": {"path": "m"}, "data": {"train": "d"}})
    assert config.run_changes(base.to_dict(), base.replace(
        intervals=config.IntervalConfig(log=5), mesh=config.MeshConfig(fsdp=2))) == []
    assert config.run_changes(base.to_dict(), base.replace(optim=config.OptimConfig(lr=1.0))) == ["optim.lr"]
    longer = base.replace(train=config.TrainConfig(steps=100))
    assert config.run_changes(base.to_dict(), longer) == []
    linear = base.replace(optim=config.OptimConfig(schedule="linear"))
    assert config.run_changes(linear.to_dict(), linear.replace(train=config.TrainConfig(steps=100))) == [
        "train.steps"]


# --- optimisers --------------------------------------------------------------------------------------------

def _torch_vs_optax(torch_opt, optax_opt, steps=6, seed=0):
    import torch

    rng = np.random.default_rng(seed)
    p0 = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) * (0.1 + i) for k, v in p0.items()}
             for i in range(steps)]
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    opt = torch_opt(list(tp.values()))
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state = optax_opt.init(params)
    update = jax.jit(optax_opt.update)
    for g in grads:
        for k, p in tp.items():
            p.grad = torch.tensor(g[k])
        opt.step()
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = jax.tree.map(lambda a, b: a + b, params, u)
        for k in tp:
            np.testing.assert_allclose(np.asarray(params[k]), tp[k].detach().numpy(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("lr,momentum,wd", [(1e-2, 0.0, 0.0), (1e-7, 0.0, 0.0), (3e-3, 0.9, 0.01)])
def test_rmsprop_equals_torch(lr, momentum, wd):
    import torch

    _torch_vs_optax(lambda ps: torch.optim.RMSprop(ps, lr=lr, momentum=momentum, weight_decay=wd),
                    optim.make_optimizer(config.OptimConfig(name="rmsprop", lr=lr, momentum=momentum,
                                                            weight_decay=wd), 10))


def test_rmsprop_first_step_is_sign_like():
    """Razin et al.'s setting: the first step moves each parameter by lr/√0.01 = 10·lr (v₀ = 0)."""
    opt = optim.make_optimizer(config.OptimConfig(name="rmsprop", lr=1e-7), 10)
    g = {"w": jnp.array([3.0, -0.002, 50.0])}
    u, _ = opt.update(g, opt.init(g), g)
    np.testing.assert_allclose(np.asarray(u["w"]), -1e-6 * np.sign(g["w"]), rtol=1e-4)


def test_adamw_and_sgd_equal_torch():
    import torch

    _torch_vs_optax(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
                    optim.make_optimizer(config.OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1), 10))
    _torch_vs_optax(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
                    optim.make_optimizer(config.OptimConfig(name="sgd", lr=1e-2, momentum=0.9), 10))


def test_schedule_matches_transformers():
    import torch
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for kind, hf in (("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)):
        cfg = config.OptimConfig(lr=2.0, schedule=kind, warmup_ratio=0.1)
        sched = optim.make_schedule(cfg, 40)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        ref = hf(opt, num_warmup_steps=4, num_training_steps=40)
        for i in range(40):
            np.testing.assert_allclose(float(sched(i)), opt.param_groups[0]["lr"], rtol=1e-5, atol=1e-6)
            opt.step()
            ref.step()


# --- the step ----------------------------------------------------------------------------------------------

def _step_inputs(tiny, kind="llama"):
    from jaxalign import models

    model, tok = models.load_pretrained(tiny[kind])
    tokens = loop.load_tokens(str(tiny["data"]), tok, config.DataConfig())
    batch = loop.host_batch(tokens, np.arange(4), loop.padded_lengths(tokens), tok.pad_token_id)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in step_lib.BATCH_KEYS}
    batch["ref_chosen_logps"] = jnp.array([-30.0, -10.0, -20.0, -25.0])
    batch["ref_rejected_logps"] = jnp.array([-40.0, -50.0, -12.0, -20.0])
    parts, params = step_lib.ModelParts.split(model)
    return parts, params, batch


def test_shared_prompt_step_equals_unshared_and_accumulation(tiny):
    """One jitted train step: pair_forward == full rows == its fused one-pass form (data.fused_pairs);
    2 accumulated micro-batches == 1 batch."""
    parts, params, batch = _step_inputs(tiny)
    cfg = config.OptimConfig(name="sgd", lr=1.0)
    opt, sched = optim.make_optimizer(cfg, 10), optim.make_schedule(cfg, 10)
    outs = {}
    for shared, A in ((True, 1), (False, 1), (True, 2), ("fused", 1)):
        spec = step_lib.Objective(names=("sigmoid",), weights=None, beta=0.1, sft_coeff=0.3,
                                 shared_prompt=bool(shared), fused_pairs=shared == "fused", grad_accum=A)
        state = step_lib.init_state(opt, jax.tree.map(jnp.copy, params), None, None)
        fn = step_lib.jit_train_step(parts=parts, spec=spec, optimizer=opt, schedule=sched, state_shardings=None,
                                     batch_shardings=None, rest_shardings=None, ref_shardings=None, mesh=None)
        outs[shared, A] = fn(state, batch, parts.rest, None)
    (s1, m1) = outs[True, 1]
    assert float(m1["grad_norm"]) > 0.1
    start = jax.tree.map(np.asarray, params)
    update = lambda s: jax.tree.map(lambda a, p: np.asarray(a, np.float64) - p, s.params, start)  # noqa: E731
    for other in ((False, 1), (True, 2), ("fused", 1)):
        s2, m2 = outs[other]
        # three programs on the same pairs: metrics are means of log-probs summed over ~10 tokens of one
        # sign (1e-5 ≈ 170 ulps; atol for metrics near 0 such as accuracies and margins)
        for k in step_lib.METRIC_NAMES + ("grad_norm",):
            np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=f"{other} {k}")
        # SGD at lr 1: the update is the gradient, whose entries cancel: bounded by each leaf's scale
        assert_trees_close_to_scale(update(s2), update(s1), 1e-4, f"{other} update")


def test_step_metrics_and_loss_by_hand(tiny):
    """TRL's metric definitions recomputed in float64 NumPy from the step's own log-probs."""
    parts, params, batch = _step_inputs(tiny)
    spec = step_lib.Objective(names=("sigmoid", "ipo"), weights=(1.0, 0.5), beta=0.2)
    fn = jax.jit(lambda p, b: (step_lib.loss_fn(p, b, parts=parts, spec=spec),
                               step_lib.pair_logps(parts.merge(p), b)))
    (loss, m), lp = fn(params, batch)
    c, r = np.asarray(lp["chosen_logps"], np.float64), np.asarray(lp["rejected_logps"], np.float64)
    rc = 0.2 * (c - np.asarray(batch["ref_chosen_logps"]))
    rr = 0.2 * (r - np.asarray(batch["ref_rejected_logps"]))
    nc, nr = np.asarray(lp["chosen_lengths"]), np.asarray(lp["rejected_lengths"])
    ipo = ((rc / 0.2 / nc - rr / 0.2 / nr) - 1 / (2 * 0.2)) ** 2
    expected = np.mean(np.log1p(np.exp(-(rc - rr))) + 0.5 * ipo)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    for name, value in (("rewards/chosen", rc.mean()), ("rewards/rejected", rr.mean()),
                        ("rewards/margins", (rc - rr).mean()), ("rewards/accuracies", (rc > rr).mean()),
                        ("logps/chosen", c.mean()), ("logps/rejected", r.mean())):
        np.testing.assert_allclose(m[name], value, rtol=1e-5, atol=1e-6)


# --- the loop ------------------------------------------------------------------------------------------------

def test_train_run_outputs_ledger_checkpoints_export(tiny, tmp_path):
    from jaxalign.train.ledger import read_ledger

    cfg = _cfg(tiny, tmp_path, optim={"name": "rmsprop", "lr": 1e-3}, train={"steps": 4, "grad_accum": 2},
               data={"eval": str(tiny["data"])},
               intervals={"probe": 2, "ledger": 2, "checkpoint": 2, "eval": 2},
               checkpoint={"export": True, "best_metric": "eval/loss", "keep_last": 1})
    summary = loop.train(cfg, progress=False)
    run = Path(summary["output_dir"])
    records = _metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for name in step_lib.METRIC_NAMES + ("grad_norm", "learning_rate", "tokens_per_s"):
        assert all(math.isfinite(r[name]) for r in steps), name
    assert records[0]["step"] == 0 and abs(records[0]["displacement/chosen_logps_change"]) < 1e-4
    assert all(math.isfinite(r["ches/mean"]) for r in records if "displacement/fraction_chosen_down" in r)
    probed = [r for r in records if "displacement/fraction_chosen_down" in r]
    assert [r["step"] for r in probed] == [0, 2, 4]
    assert all("eval/loss" in r for r in records if r["step"] in (2, 4))
    ledger = read_ledger(run / "ledger.zarr")
    assert list(ledger["step"]) == [0, 2, 4] and ledger["margin"].shape == (3, 4)
    np.testing.assert_allclose(ledger["margin"][0], 0.0, atol=1e-4)
    np.testing.assert_allclose(ledger["margin"], ledger["chosen_rewards"] - ledger["rejected_rewards"],
                               rtol=1e-6, atol=1e-6)
    last = probed[-1]
    change = ledger["chosen_logps"][-1] - ledger["chosen_logps"][0]
    np.testing.assert_allclose(last["displacement/chosen_logps_change"], change.mean(), rtol=1e-4, atol=1e-4)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) in ([2, 4], [4])
    # The export loads in transformers and reproduces jaxalign's final log-probs of the probe set.
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(run / "final")
    row = PAIRS[0]
    p = tok(row["prompt"])["input_ids"]
    full = tok(row["prompt"] + row["chosen"])["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        lsm = hf(torch.tensor([full])).logits.log_softmax(-1)[0]
    lp = sum(lsm[t - 1, full[t]].item() for t in range(len(p), len(full)))
    np.testing.assert_allclose(lp, ledger["chosen_logps"][-1][0], rtol=1e-4)


@pytest.mark.slow
def test_entanglement_metrics_match_the_analysis(tiny, tmp_path):
    """``entanglement/*`` after step 1 equal jaxalign.analysis.entanglement on the exported weights."""
    from jaxalign import models
    from jaxalign.analysis import entanglement as ent

    cfg = _cfg(tiny, tmp_path, train={"steps": 1}, intervals={"entanglement": 1},
               checkpoint={"export": True})
    summary = loop.train(cfg, progress=False)
    rec = [r for r in _metrics(Path(summary["output_dir"])) if "entanglement/grad_inner_mean" in r]
    assert [r["step"] for r in rec] == [1]
    assert abs(sum(rec[0][f"entanglement/fraction_{c}"] for c in ent.CASES) - 1.0) < 1e-9
    model, tok = models.load_pretrained(summary["exported"])
    tokens = loop.load_tokens(str(tiny["data"]), tok, config.DataConfig())
    probe = loop.subset(tokens, np.arange(4))
    b = loop.host_batch(probe, np.arange(4), loop.padded_lengths(probe), tok.pad_token_id)
    res = ent.entanglement(model, {k: b[k] for k in ent.BATCH_FIELDS}, loss="sigmoid", beta=0.1)
    np.testing.assert_allclose(rec[0]["entanglement/grad_inner_mean"], res.grad_inner.mean(), rtol=1e-3)
    np.testing.assert_allclose(rec[0]["entanglement/grad_cosine_mean"], res.grad_cosine.mean(), rtol=1e-3,
                               atol=1e-6)


def test_nan_guard_names_the_step(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, optim={"name": "sgd", "lr": 1e30}, train={"steps": 4},
               intervals={"checkpoint": 1})
    with pytest.raises(loop.TrainingDiverged, match=r"step [2-4]: the loss is nan.*last good checkpoint is step"):
        loop.train(cfg, progress=False)


def test_resume_refuses_config_change_and_existing_run(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, train={"steps": 2}, intervals={"checkpoint": 1})
    loop.train(cfg, progress=False, stop_after=1)
    with pytest.raises(CheckpointError, match="pass --resume"):
        loop.train(cfg, progress=False)
    changed = _cfg(tiny, tmp_path, ["optim.lr=0.1", "loss.beta=0.5"], train={"steps": 2},
                   intervals={"checkpoint": 1})
    with pytest.raises(CheckpointError, match=r"would change the run \(loss\.beta, optim\.lr\)"):
        loop.train(changed, resume=True, progress=False)
    # An allowed change (logging interval) resumes.
    ok = _cfg(tiny, tmp_path, ["intervals.log=2"], train={"steps": 2}, intervals={"checkpoint": 1})
    assert loop.train(ok, resume=True, progress=False)["steps"] == 2


def test_resume_onto_another_mesh_equals_uninterrupted(tiny, tmp_path):
    """Saved on 1 device, restored onto an fsdp=2 × data=2 mesh: the run continues with equal numbers."""
    base = dict(train={"steps": 2}, intervals={"checkpoint": 1}, output_dir=str(tmp_path / "a"))
    straight = loop.train(_cfg(tiny, tmp_path, **base), progress=False)
    loop.train(_cfg(tiny, tmp_path, **dict(base, output_dir=str(tmp_path / "b"))), progress=False, stop_after=1)
    moved = loop.train(_cfg(tiny, tmp_path, ["mesh.data=2", "mesh.fsdp=2"],
                            **dict(base, output_dir=str(tmp_path / "b"))), resume=True, progress=False)
    for k in ("loss", "logps/chosen", "rewards/margins"):
        np.testing.assert_allclose(moved["final_metrics"][k], straight["final_metrics"][k], rtol=1e-4, atol=1e-5)


# --- TRL parity ------------------------------------------------------------------------------------------------

TRL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")


def _trl_history(model_dir, rows, loss_type, lr, steps, output_dir):
    import datasets
    import torch
    import transformers
    import trl

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    args = trl.DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=len(rows), max_steps=steps, learning_rate=lr,
        optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0,
        logging_steps=1, report_to="none", beta=0.1, loss_type=[loss_type], use_cpu=True, bf16=False,
        save_strategy="no", max_length=None, seed=0, disable_tqdm=True, gradient_checkpointing=False)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def _check_trl_parity(tiny, tmp_path, kind, loss_type):
    # IPO's gradient is ~2·(1/(2β))/|y| ≫ DPO's: a smaller step keeps float32 rounding from being amplified.
    lr = 0.05 if loss_type == "ipo" else 0.5
    rows = PAIRS[:4]
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs = _trl_history(tiny[kind], rows, loss_type, lr, 3, tmp_path / "trl")
    cfg = _cfg(tiny, tmp_path, model={"path": str(tiny[kind])}, data={"train": str(data), "shuffle": False},
               loss={"name": loss_type, "beta": 0.1}, optim={"name": "sgd", "lr": lr},
               train={"batch_size": 4, "steps": 3})
    loop.train(cfg, progress=False)
    ours = [r for r in _metrics(tmp_path / "run") if "loss" in r]
    assert len(theirs) == len(ours) == 3
    for step, (t, o) in enumerate(zip(theirs, ours), 1):
        for key in TRL_KEYS:
            if key == "rewards/accuracies" and abs(t["rewards/margins"]) < 1e-4:
                continue  # step 1: policy == reference, the rewards are 0 up to rounding; > is a coin toss
            scale = max(1.0, abs(t[key]))
            assert abs(t[key] - o[key]) <= 2e-5 * scale + 2e-6, (kind, loss_type, step, key, t[key], o[key])
    # The policy moved: step 3 differs from step 1.
    assert abs(ours[2]["logps/chosen"] - ours[0]["logps/chosen"]) > 0.1


# In the default tier (also under --skip-slow): one case per model family.
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trl_parity_sigmoid(tiny, tmp_path, kind):
    _check_trl_parity(tiny, tmp_path, kind, "sigmoid")


@pytest.mark.slow
@pytest.mark.parametrize("kind,loss_type", [("llama", "ipo"), ("llama", "apo_zero"), ("gpt2", "ipo"),
                                            ("gpt2", "apo_zero")])
def test_trl_parity(tiny, tmp_path, kind, loss_type):
    _check_trl_parity(tiny, tmp_path, kind, loss_type)


# --- faults and scale (subprocesses) ---------------------------------------------------------------------------

def _write_config(tiny, tmp_path, name, **overrides) -> Path:
    raw = {"model": {"path": str(tiny["llama"])},
           "data": {"train": str(tiny["data"]), "probe_size": 4},
           "loss": {"name": "sigmoid", "beta": 0.1},
           "optim": {"name": "rmsprop", "lr": 1e-3},
           "train": {"batch_size": 4, "steps": 8, "seed": 3},
           "mesh": {"data": 1},
           "intervals": {"probe": 2, "ledger": 2, "checkpoint": 1},
           "checkpoint": {"export": True, "keep_last": 2},
           "output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "ref_cache")}
    for k, v in overrides.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env(devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if os.environ.get("JAXALIGN_TEST_COMPILE_CACHE"):
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAXALIGN_TEST_COMPILE_CACHE"]
    return env


def _cli(*args):
    return [sys.executable, "-m", "jaxalign.cli", "train", *map(str, args)]


def _final_tensors(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "final" / "model.safetensors"))


# default tier (also under --skip-slow): the only kill-and-resume / two-process check of train
def test_sigkill_resume_is_bit_identical(tiny, tmp_path):
    straight = _write_config(tiny, tmp_path, "straight")
    subprocess.run(_cli(straight), env=_env(), check=True, capture_output=True, timeout=600)
    killed = _write_config(tiny, tmp_path, "killed")
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # kill once step 4's checkpoint is being made
        if (run / "metrics.jsonl").exists() and sum(1 for line in open(run / "metrics.jsonl")
                                                    if '"loss"' in line) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    res = subprocess.run(_cli(killed, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _final_tensors(tmp_path / "straight"), _final_tensors(run)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    losses = lambda r: [(m["step"], m["loss"]) for m in _metrics(r) if "loss" in m]  # noqa: E731
    assert losses(run) == losses(tmp_path / "straight")
    from jaxalign.train.ledger import read_ledger

    la, lb = read_ledger(tmp_path / "straight" / "ledger.zarr"), read_ledger(run / "ledger.zarr")
    assert list(lb["step"]) == [0, 2, 4, 6, 8]
    assert la.keys() == lb.keys() and "pair_index" in la
    for k in la:  # bit-identical (a missing score is NaN in both: equal_nan)
        assert np.array_equal(la[k], lb[k], equal_nan=la[k].dtype.kind == "f"), k


# default tier (also under --skip-slow): the only kill-and-resume / two-process check of train
def test_two_processes_equal_one(tiny, tmp_path):
    import socket

    one = _write_config(tiny, tmp_path, "one", mesh={"data": 2}, train={"batch_size": 4, "steps": 4},
                        intervals={"probe": 2, "ledger": 2, "checkpoint": 2})
    subprocess.run(_cli(one), env=_env(devices=2), check=True, capture_output=True, timeout=600)
    two = _write_config(tiny, tmp_path, "two", mesh={"data": 2}, train={"batch_size": 4, "steps": 4},
                        intervals={"probe": 2, "ledger": 2, "checkpoint": 2})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_cli(two, "--no-progress", "--coordinator", f"127.0.0.1:{port}",
                                   "--num-processes", 2, "--process-id", i), env=_env(devices=1),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    curve = lambda r: [(m["step"], m["loss"]) for m in _metrics(r) if "loss" in m]  # noqa: E731
    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=1e-5, atol=1e-6)
    ta, tb = _final_tensors(tmp_path / "one"), _final_tensors(tmp_path / "two")
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=1e-4, atol=1e-6)


# --- read-only checkpoints, train_loaded ---------------------------------------------------------------------

def test_checkpointer_read_only_leaves_a_save_in_progress(tmp_path):
    """A reader opened read-only next to a writer deletes nothing and cannot save; a writer opening the
    folder removes the same planted temporary folder (so the plant is one Orbax would clean up)."""
    from jaxalign.train.checkpoint import Checkpointer

    state = {"w": jnp.arange(3.0)}
    writer = Checkpointer(tmp_path / "ckpt", async_save=False)
    writer.save(1, state, {"epoch": 0}, {"step": 1})
    writer.close()
    planted = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1234567"
    planted.mkdir()
    reader = Checkpointer.reader(tmp_path / "ckpt")
    assert planted.is_dir() and reader.latest_step() == 1
    restored, data_state, meta = reader.restore(1, state)
    np.testing.assert_array_equal(np.asarray(restored["w"]), [0.0, 1.0, 2.0])
    assert data_state == {"epoch": 0} and meta == {"step": 1}
    with pytest.raises(CheckpointError, match="read-only"):
        reader.save(2, state, {}, {})
    reader.close()
    assert planted.is_dir()
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Checkpointer.reader(tmp_path / "missing")
    # The control: a writer removes the same folder. Orbax cleans temporary folders up on a background
    # thread that close() does not join, so wait for it (bounded; this asserts the outcome, not a time).
    Checkpointer(tmp_path / "ckpt", async_save=False).close()
    for _ in range(600):
        if not planted.exists():
            break
        time.sleep(0.05)
    assert not planted.exists()


def _loaded_cfg(tiny, tmp_path, name, **data):
    return config.from_dict({
        "data": {"probe_size": 2, "shuffle": False, "prompt_length": 32, "response_length": 24, **data},
        "optim": {"name": "sgd", "lr": 0.5}, "train": {"batch_size": 2, "steps": 1}, "mesh": {"data": 1},
        "intervals": {"probe": None, "ledger": None, "checkpoint": None},
        "checkpoint": {"export": False, "async_save": False},
        "output_dir": str(tmp_path / name), "cache_dir": str(tiny["root"] / "ref_cache")})


def _count_traces(names):
    """A dict counting jit traces of the functions named ``names`` (jax.monitoring events)."""
    counts = dict.fromkeys(names, 0)

    def on_event(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_trace_duration" and kw.get("fun_name") in counts:
            counts[kw["fun_name"]] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)
    return counts, on_event


def test_train_loaded_reuses_the_compiled_step_and_equals_train(tiny, tmp_path):
    """Two pair sets of one fixed shape on one loaded model: the step and the log-prob functions are
    traced once; the first run's metrics equal ``train`` from the folder with the same settings."""
    from jaxalign import models

    model, tok = models.load_pretrained(tiny["llama"])
    before = jax.tree.map(np.asarray, step_lib.ModelParts.split(model)[1])
    counts, listener = _count_traces(("_train_step", "_pair_scores"))
    try:
        first = loop.train_loaded(model, tok, PAIRS[:2], _loaded_cfg(tiny, tmp_path, "a"))
        traced = dict(counts)
        second = loop.train_loaded(model, tok, PAIRS[2:4], _loaded_cfg(tiny, tmp_path, "b"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert traced["_train_step"] >= 1 and traced["_pair_scores"] >= 1
    assert counts == traced, "the second set of the same shape was traced again"
    # the second run scored its own pairs (the first step's loss is ln 2 for both: policy = reference)
    assert first["final_metrics"]["logps/chosen"] != second["final_metrics"]["logps/chosen"]
    # the caller's model is untouched (the step donates a copy)
    after = step_lib.ModelParts.split(model)[1]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS[:2]))
    raw = _loaded_cfg(tiny, tmp_path, "c").to_dict()
    raw["model"]["path"], raw["data"]["train"] = str(tiny["llama"]), str(data)
    from_folder = loop.train(config.from_dict(raw), progress=False)
    for k in step_lib.METRIC_NAMES + ("grad_norm",):  # the same program on the same weights and pairs
        np.testing.assert_allclose(first["final_metrics"][k], from_folder["final_metrics"][k], rtol=1e-6,
                                   atol=1e-7, err_msg=k)
    with pytest.raises(ConfigError, match=r"data\.response_length: 2 tokens, but the train set"):
        loop.train_loaded(model, tok, PAIRS[:2], _loaded_cfg(tiny, tmp_path, "d", response_length=2))


def _lp_by_hand(hf, ids_prompt, ids_response):
    """Σ log p(response token | prefix) with transformers (float64 sum)."""
    import torch

    full = ids_prompt + ids_response
    with torch.no_grad():
        lsm = hf(torch.tensor([full])).logits.log_softmax(-1)[0].double()
    return sum(lsm[t - 1, full[t]].item() for t in range(len(ids_prompt), len(full)))


def test_train_loaded_append_eos_and_chat(tiny, tmp_path):
    """``data.append_eos: false`` scores the response's own tokens, ``data.chat`` renders the tiny
    tokenizer's ChatML template: the step-1 ``logps/chosen`` (before the update) equals transformers'
    log-probs of exactly those tokens."""
    import torch
    import transformers

    from jaxalign import models

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32).eval()
    htok = transformers.AutoTokenizer.from_pretrained(tiny["llama"])
    model, tok = models.load_pretrained(tiny["llama"])
    rows = PAIRS[:2]

    def expected(prompts, chosen):
        return np.mean([_lp_by_hand(hf, p, c) for p, c in zip(prompts, chosen)])

    def split(prompt_text, full_text, add_special):
        p = htok(prompt_text, add_special_tokens=add_special)["input_ids"]
        return p, htok(full_text, add_special_tokens=add_special)["input_ids"][len(p):]

    for append_eos in (True, False):
        cfg = _loaded_cfg(tiny, tmp_path, f"eos{append_eos}", append_eos=append_eos)
        got = loop.train_loaded(model, tok, rows, cfg)["final_metrics"]["logps/chosen"]
        ps, cs = zip(*(split(r["prompt"], r["prompt"] + r["chosen"], True) for r in rows))
        cs = [c + [htok.eos_token_id] if append_eos else c for c in cs]
        # float32 sums of ~10 log-probs of magnitude ~5 (1e-5 relative ≈ 100 ulps)
        np.testing.assert_allclose(got, expected(ps, cs), rtol=1e-5, err_msg=f"append_eos={append_eos}")
    got = loop.train_loaded(model, tok, rows, _loaded_cfg(tiny, tmp_path, "chat", chat=True, prompt_length=64,
                                                            response_length=32))
    # ChatML written out by hand (one user turn, one assistant turn, contents stripped): the turn ends at
    # <|im_end|>, the tiny tokenizer's EOS, so the response is the assistant text plus that EOS (the
    # newline the template puts after it is not trained on)
    assert htok.eos_token == "<|im_end|>"
    rendered = [(f"<|im_start|>user\n{r['prompt'].strip()}<|im_end|>\n<|im_start|>assistant\n",
                 f"{r['chosen'].strip()}<|im_end|>") for r in rows]
    ps, cs = zip(*(split(p, p + c, False) for p, c in rendered))
    np.testing.assert_allclose(got["final_metrics"]["logps/chosen"], expected(ps, cs), rtol=1e-5)
