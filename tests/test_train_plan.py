"""`jaxalign train --plan`: the run's own step compiled for the devices at hand before any weight is read.

The memory budget is forced with ``--hbm-gb`` on 8 simulated CPU devices (a CPU has no HBM of its own):
a budget of the AdamW state written out from the config (12 bytes per float32 parameter) cannot hold a
run that replicates it (``mesh.data=8``), and the overrides the refusal names must fit that budget when
planned again, with the parameters then sharded as the formula says.
"""

import json

import jax
import pytest
import yaml

from jaxalign import cli
from jaxalign.errors import ConfigError
from jaxalign.jobs import plan as P
from jaxalign.train import config as tcfg

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}


def _params(c) -> int:
    """Parameter count of a Llama config from the formula (q, o: D·N·H; k, v: D·K·H; 3 MLP; 2 norms per
    layer; final norm; untied embedding and unembedding)."""
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    N, K, H = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    return L * (2 * D * N * H + 2 * D * K * H + 3 * D * F + 2 * D) + D + 2 * V * D


@pytest.fixture()
def run_yaml(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY))  # no weights: --plan reads none
    cfg = {"model": {"path": str(tmp_path / "tiny"), "param_dtype": "float32"},
           "data": {"train": str(tmp_path / "never_read.jsonl"), "prompt_length": 8, "response_length": 8},
           "loss": {"name": "sigmoid", "reference": "cached"}, "optim": {"name": "adamw"},
           "train": {"batch_size": 8, "grad_accum": 1}, "mesh": {"data": 8, "fsdp": 1, "tensor": 1},
           "output_dir": str(tmp_path / "run")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_plan_refuses_and_names_overrides_that_fit(run_yaml, capsys):
    assert len(jax.devices()) >= 8  # conftest: 8 simulated CPU devices
    n = _params(TINY)
    # 18 bytes per parameter: data=8 keeps 12 (float32 params and AdamW's two moments) whole on every
    # device, plus a whole float32 gradient and the activations; fsdp=8 keeps an eighth of the state.
    budget_gb = 18 * n / 1e9
    code = cli.main(["train", str(run_yaml), "--plan", "--hbm-gb", f"{budget_gb}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train --plan" in err and "these overrides fit" in err, err
    overrides = err.split("these overrides fit (estimate): ")[1].split()
    assert "mesh.data=8" not in overrides
    # The named overrides, planned again on the same devices, fit the same budget.
    run = tcfg.load(str(run_yaml), overrides)
    p = P.plan(TINY, "tiny", "train", P.target(hbm_gb=budget_gb), P.train_shapes(run), run)
    assert p["memory"]["fits"] and p["memory"]["total_bytes"] <= budget_gb * 1e9
    shards = p["mesh"]["fsdp"] * p["mesh"]["tensor"]
    assert shards > 1 and p["memory"]["params_bytes"] < 4 * n  # sharded: less than a whole float32 copy


def test_train_plan_fits_and_without_budget(run_yaml):
    run = tcfg.load(str(run_yaml), ["mesh.data=1", "mesh.fsdp=8"])
    p = P.check_train(run, hbm_gb=1.0, log=lambda _: None)
    assert p["memory"]["fits"] and p["shapes"] == {"pairs": 8, "prompt_len": 8, "response_len": 8}
    # Float32 params over fsdp=8: every matrix has a dimension of 128 or 512 (divisible by 8); the 2·L + 1
    # norm vectors are replicated.
    norms = (2 * TINY["num_hidden_layers"] + 1) * TINY["hidden_size"]
    assert p["memory"]["params_bytes"] == 4 * ((_params(TINY) - norms) // 8 + norms)
    logged = []
    assert "fits" not in P.check_train(run, log=logged.append)["memory"]  # a CPU has no HBM: not checked
    assert "no memory budget" in logged[-1]


def test_train_plan_needs_the_padded_lengths(run_yaml):
    run = tcfg.load(str(run_yaml), ["data.prompt_length=null", "data.response_length=null"])
    with pytest.raises(ConfigError, match="data.prompt_length and data.response_length"):
        P.check_train(run, log=lambda _: None)
    with pytest.raises(ConfigError, match="--hbm-gb must be positive"):
        P.target(hbm_gb=0)


def test_lora_plan_trains_the_adapters_only():
    # LoRA r=4 on q, k, v: A [D, r] (D over fsdp=8, as the kernel's embed axis) and B [r, N|K, H]
    # (heads over tensor = 1: whole), float32; the base weights are frozen and reported apart.
    r, c = 4, TINY
    D, N, K, H, L = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], \
        c["num_hidden_layers"]
    per_device = L * sum(D * r // 8 + r * heads * H for heads in (N, K, K))
    run = P.run_config(None, ["mesh.data=1", "mesh.fsdp=8", "lora.target=[q,k,v]", f"lora.r={r}",
                              "loss.reference=adapter_off"])
    p = P.plan(TINY, "tiny", "train", P.target(hbm_gb=1.0), P.Shapes(8, 8, 8), run)
    m = p["memory"]
    assert m["params_bytes"] == 4 * per_device
    assert 0 <= m["optimizer_bytes"] - 2 * 4 * per_device <= 64  # two moments, plus AdamW's step counters
    norms = (2 * L + 1) * D
    assert m["frozen_base_bytes"] == 4 * ((_params(TINY) - norms) // 8 + norms)
    assert p["options"]["lora_r"] == r and p["options"]["reference"] == "adapter_off"


def test_plan_with_activation_constraints_off():
    run = P.run_config(None, ["mesh.data=2", "mesh.fsdp=4", "mesh.constrain_activations=false"])
    p = P.plan(TINY, "tiny", "train", P.target(cpu_devices=8), P.Shapes(8, 8, 8), run)
    assert p["options"]["constrain_activations"] is False
    assert "mesh.constrain_activations=false" in P.overrides_of(p)  # what train needs to reproduce it
    assert P.summary_row(p)["constrain"] is False


def test_plan_with_fused_pairs_carries_the_override():
    run = P.run_config(None, ["mesh.data=2", "mesh.fsdp=4", "data.fused_pairs=true"])
    p = P.plan(TINY, "tiny", "train", P.target(cpu_devices=8), P.Shapes(8, 8, 8), run)
    assert p["options"]["fused_pairs"] is True
    assert "data.fused_pairs=true" in P.overrides_of(p)  # what train needs to reproduce it
    with pytest.raises(ConfigError, match="data.fused_pairs: true needs data.shared_prompt: true"):
        P.run_config(None, ["data.fused_pairs=true", "data.shared_prompt=false"])
