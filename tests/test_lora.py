"""LoRA: adapters against ``peft`` on the same weights, PEFT folders in and out, and a LoRA DPO step
against a hand computation in torch (reference = the base model, i.e. the adapters off).

Models are tiny random ``transformers`` Llamas (``hf_tiny``) with the tiny byte-level tokenizer; nothing
is downloaded. Logit tolerances are 1e-4: float32 on both sides, summation order differs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from jaxalign import models  # noqa: E402
from jaxalign.errors import ConfigError, ModelError  # noqa: E402
from jaxalign.models import lora  # noqa: E402
from jaxalign.train import config, loop  # noqa: E402

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 272
PAIRS = [
    {"prompt": "hello there, how are you?\n", "chosen": "fine thanks", "rejected": "go away"},
    {"prompt": "what is 2+2?\n", "chosen": "4", "rejected": "five, I think"},
    {"prompt": "name a colour\n", "chosen": "blue", "rejected": "hello"},
    {"prompt": "say hi\n", "chosen": "hi!", "rejected": "no."},
]
IDS = np.array([[4, 50, 61, 70, 33, 90, 7, 120], [4, 9, 200, 13, 3, 3, 3, 3]])
MASK = np.array([[1] * 8, [1] * 4 + [0] * 4])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = make_tiny("llama", tmp_path_factory.mktemp("lora") / "llama", vocab_size=VOCAB, pad_token_id=3,
                  eos_token_id=2, bos_token_id=4, max_position_embeddings=128)
    make_tiny_tokenizer(f)
    return f


def _hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _torch_logits(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _logits(model, ids=IDS, mask=MASK):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)


def _valid(x):
    return x[MASK.astype(bool)]  # padding positions' logits are unspecified


def _peft_modules(pm):
    """``{HF module name: peft LoRA layer}`` of a PeftModel."""
    return {name[len("base_model.model."):]: m for name, m in pm.named_modules() if hasattr(m, "lora_A")
            and "default" in m.lora_A}


def _randomise_b(model, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)
    for layer in lora.adapted_layers(model).values():
        b = layer.lora.lora_b
        b.set_value(jnp.asarray(rng.normal(0, scale, b.shape).astype(np.float32)))


def test_init_and_update_match_peft(folder):
    """PEFT's init (A uniform in ±1/√fan_in, B = 0, so the model is unchanged); the same A and the same
    update of B in peft and here give the same logits, with rsLoRA's alpha/√r scaling."""
    model, _ = models.load_pretrained(folder)
    base_logits = _logits(model)
    lora.apply(model, lora.LoRASettings(target="all", r=4, alpha=8.0, rslora=True), seed=3)
    layers = lora.adapted_layers(model)
    assert len(layers) == 2 * 7
    for layer in layers.values():
        a = np.asarray(layer.lora.lora_a[...])
        fan_in = math.prod(a.shape[:-1])
        assert np.all(np.abs(a) <= 1 / math.sqrt(fan_in)) and np.abs(a).max() > 0.5 / math.sqrt(fan_in)
        assert not np.any(np.asarray(layer.lora.lora_b[...]))
        assert layer.lora.scale == pytest.approx(8.0 / 2.0)
    np.testing.assert_array_equal(_logits(model), base_logits)  # B = 0: exactly the base

    pm = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                           target_modules=ALL, lora_dropout=0.0))
    _randomise_b(model)
    mods = _peft_modules(pm)
    for path, layer in layers.items():
        i, kind, name = path.split(".")[1:]
        m = mods[f"model.layers.{i}.{'self_attn' if kind == 'attn' else 'mlp'}.{name}"]
        a, b = np.asarray(layer.lora.lora_a[...]), np.asarray(layer.lora.lora_b[...])
        with torch.no_grad():  # PEFT: A [r, in], B [out, r]; ours keep the head dims apart
            m.lora_A["default"].weight.copy_(torch.tensor(a.reshape(-1, 4).T))
            m.lora_B["default"].weight.copy_(torch.tensor(b.reshape(4, -1).T))
    np.testing.assert_allclose(_valid(_logits(model)), _valid(_torch_logits(pm)), atol=1e-4)
    with pm.disable_adapter():
        torch_base = _torch_logits(pm)
    off = lora.set_adapters(model, False)
    np.testing.assert_allclose(_valid(_logits(off)), _valid(torch_base), atol=1e-4)
    np.testing.assert_array_equal(_logits(off), base_logits)  # off is exactly the base model


def test_adapter_switch_inside_jit(folder):
    """``set_adapters(…, False)`` on a model merged inside ``jit``: the base logits, one set of weights."""
    from jaxalign.models.parts import ModelParts

    model, _ = models.load_pretrained(folder)
    base_logits = _logits(model)
    lora.apply(model, lora.LoRASettings(target=["q", "down"], r=2), seed=0)
    _randomise_b(model)
    parts, adapters = ModelParts.split(model, lora.LoRAParam)
    assert all("lora_" in str(p[-1]) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0])

    @jax.jit
    def both(params, rest):
        on = parts.merge(params, rest)(jnp.asarray(IDS), jnp.asarray(MASK)).logits
        off = lora.set_adapters(parts.merge(params, rest), False)(jnp.asarray(IDS), jnp.asarray(MASK)).logits
        return on, off

    on, off = both(adapters, parts.rest)
    np.testing.assert_allclose(np.asarray(off), base_logits, atol=1e-5)  # jit vs eager: XLA fuses differently
    np.testing.assert_allclose(np.asarray(on), _logits(model), atol=1e-5)
    assert np.abs(np.asarray(on) - np.asarray(off)).max() > 1e-2


def test_export_peft_folder_and_merged_weights(folder, tmp_path):
    """jaxalign's PEFT folder loads in ``peft`` with the same logits (a regex target on some layers
    only); the merged HF folder loads in ``transformers`` with the same logits; bfloat16 base weights."""
    model, tok = models.load_pretrained(folder)
    lora.apply(model, lora.LoRASettings(target=r"layers\.1\.attn\.(q|o)_proj|layers\.0\.mlp\.up_proj", r=3,
                                        alpha=5.0), seed=1)
    _randomise_b(model, seed=2)
    ours = _logits(model)
    out = lora.save_peft(model, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == pytest.approx(5.0) and isinstance(cfg["target_modules"], str)
    pm = peft.PeftModel.from_pretrained(_hf(folder), str(out))
    assert sorted(_peft_modules(pm)) == ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj",
                                         "model.layers.1.self_attn.q_proj"]
    np.testing.assert_allclose(_valid(ours), _valid(_torch_logits(pm)), atol=1e-4)

    merged = lora.merged(model)
    assert not lora.has_adapters(merged) and lora.has_adapters(model)
    models.save_pretrained(merged, tok, tmp_path / "merged")
    np.testing.assert_allclose(_valid(ours), _valid(_torch_logits(_hf(tmp_path / "merged"))), atol=1e-4)

    half, _ = models.load_pretrained(folder, dtype=jnp.bfloat16)  # adapters stay float32 on bf16 weights
    lora.load_peft(half, out)
    layer = next(iter(lora.adapted_layers(half).values()))
    assert layer.kernel[...].dtype == jnp.bfloat16 and layer.lora.lora_a[...].dtype == jnp.float32


def test_peft_adapter_loads_here(folder, tmp_path):
    """An adapter made by ``peft`` (B non-zero) loads here with the same logits; refused settings name
    themselves."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=2, lora_alpha=7, target_modules=["k_proj", "up_proj"],
                                                           lora_dropout=0.0))
    with torch.no_grad():
        for m in _peft_modules(pm).values():
            m.lora_B["default"].weight.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    model, _ = models.load_pretrained(folder)
    lora.load_peft(model, tmp_path / "adapter")
    assert sorted(lora.adapted_layers(model)) == [f"layers.{i}.{p}" for i in (0, 1)
                                                 for p in ("attn.k_proj", "mlp.up_proj")]
    np.testing.assert_allclose(_valid(_logits(model)), _valid(_torch_logits(pm)), atol=1e-4)

    bad = tmp_path / "dora"
    bad.mkdir()
    c = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(dict(c, use_dora=True)))
    with pytest.raises(ModelError, match="use_dora"):
        lora.load_peft(models.load_pretrained(folder)[0], bad)


def _run_cfg(folder, tmp_path, name, **sections):
    raw = {"model": {"path": str(folder)},
           "lora": {"target": ["q", "v"], "r": 2, "alpha": 4.0},
           "data": {"probe_size": 2, "shuffle": False, "prompt_length": 32, "response_length": 24},
           "loss": {"name": "sigmoid", "beta": 0.5, "reference": "adapter_off"},
           "optim": {"name": "sgd", "lr": 2.0}, "train": {"batch_size": 4, "steps": 1}, "mesh": {"data": 1},
           "intervals": {"probe": None, "ledger": None, "checkpoint": None},
           "checkpoint": {"export": False, "async_save": False},
           "output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "ref_cache")}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config.from_dict(raw)


def nnx_params(model):
    """The model's ``nnx.Param`` state (base weights, and adapters when it has them)."""
    from flax import nnx

    return nnx.state(model, nnx.Param)


def _torch_pair_logps(pm, tokens):
    """Summed response log-probs ``[N]`` of chosen and rejected under a torch model (full rows)."""
    out = {}
    for side in ("chosen", "rejected"):
        vals = []
        for i in range(len(tokens.index)):
            p, r = list(tokens.prompt[i]), list(getattr(tokens, side)[i])
            logits = pm(input_ids=torch.tensor([p + r])).logits[0].log_softmax(-1)
            vals.append(sum(logits[len(p) - 1 + t, tok] for t, tok in enumerate(r)))
        out[side] = torch.stack(vals)
    return out


def test_lora_dpo_step_equals_hand_computation(folder, tmp_path):
    """One SGD step of LoRA DPO with ``reference: adapter_off``: the reference log-probs are the base
    model's, the new A/B are torch's (peft model, autograd on the DPO loss), the base weights are
    bit-identical, and the optimiser state and trained parameters are the adapters only."""
    model, tok = models.load_pretrained(folder)
    before = [np.asarray(x) for x in jax.tree.leaves(nnx_params(model))]
    run = loop.setup_loaded(model, tok, PAIRS, _run_cfg(folder, tmp_path, "step", optim={"name": "adamw",
                                                                                         "lr": 1.0}))
    opt_sizes = sum(x.size for x in jax.tree.leaves(run.state.opt_state))
    lora_sizes = sum(x.size for x in jax.tree.leaves(run.state.params))
    assert opt_sizes <= 2 * lora_sizes + 8  # Adam's two moments of the adapters (and its counters)

    run = loop.setup_loaded(model, tok, PAIRS, _run_cfg(folder, tmp_path, "step2"))
    init = jax.tree.map(np.asarray, run.state.params)
    tokens = run.sets["train"].tokens
    ref = run.sets["train"].ref
    loop.run_loop(run, progress=False)
    new = jax.tree.map(np.asarray, run.state.params)

    pm = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0))
    mods = _peft_modules(pm)
    for i in (0, 1):
        for name in ("q_proj", "v_proj"):
            a = init["layers"][i]["attn"][name]["lora"]["lora_a"]
            with torch.no_grad():
                mods[f"model.layers.{i}.self_attn.{name}"].lora_A["default"].weight.copy_(
                    torch.tensor(a.reshape(-1, 2).T))
    with torch.no_grad(), pm.disable_adapter():
        base = _torch_pair_logps(pm, tokens)
    np.testing.assert_allclose(ref["ref_chosen_logps"], base["chosen"].numpy(), atol=1e-4)
    np.testing.assert_allclose(ref["ref_rejected_logps"], base["rejected"].numpy(), atol=1e-4)
    lp = _torch_pair_logps(pm, tokens)
    margin = 0.5 * ((lp["chosen"] - base["chosen"]) - (lp["rejected"] - base["rejected"]))
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    loss.backward()
    for i in (0, 1):
        for name in ("q_proj", "v_proj"):
            m = mods[f"model.layers.{i}.self_attn.{name}"]
            got = new["layers"][i]["attn"][name]["lora"]
            want_a = (m.lora_A["default"].weight - 2.0 * m.lora_A["default"].weight.grad).detach().numpy()
            want_b = (m.lora_B["default"].weight - 2.0 * m.lora_B["default"].weight.grad).detach().numpy()
            np.testing.assert_allclose(got["lora_a"].reshape(-1, 2).T, want_a, atol=1e-6)  # grad A = 0 (B = 0)
            assert np.abs(want_b).max() > 1e-3
            # float32 sums over tokens and heads: an element's error scales with the array's largest terms,
            # not with the element (an AVX2-only EPYC put 1.3e-6 on one of 1.6e-4 where the largest is 0.23)
            np.testing.assert_allclose(got["lora_b"].reshape(2, -1).T, want_b, rtol=1e-3,
                                       atol=2e-5 * np.abs(want_b).max())
    after = [np.asarray(x) for x in jax.tree.leaves(nnx_params(model))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    rest_kernels = [np.asarray(x) for x in jax.tree.leaves(run.rest)]
    assert all(any(np.array_equal(r, b) for b in before) for r in rest_kernels if r.ndim)  # base untouched


def test_lora_run_checkpoint_resume_export_and_adapter_import(folder, tmp_path):
    """A LoRA run from the config: Orbax checkpoints of the adapters resume bit-identically, the final
    adapter folder loads in peft and the merged folder in transformers with equal logits, and the
    exported adapter starts a new run (``lora.adapter``) whose cached reference is that policy."""
    sections = dict(lora={"target": "all", "r": 2}, optim={"name": "adamw", "lr": 0.05},
                    train={"steps": 2}, data={"train": str(_pairs_file(tmp_path))},
                    checkpoint={"export": True}, intervals={"checkpoint": 1})
    whole = loop.train(_run_cfg(folder, tmp_path, "whole", **sections), progress=False)
    loop.train(_run_cfg(folder, tmp_path, "cut", **sections), progress=False, stop_after=1)
    resumed = loop.train(_run_cfg(folder, tmp_path, "cut", **sections), progress=False, resume=True)
    assert whole["final_metrics"] == resumed["final_metrics"]
    a = (tmp_path / "whole" / "final_adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "cut" / "final_adapter" / "adapter_model.safetensors").read_bytes()

    pm = peft.PeftModel.from_pretrained(_hf(folder), str(tmp_path / "whole" / "final_adapter"))
    merged = _hf(tmp_path / "whole" / "final")
    np.testing.assert_allclose(_valid(_torch_logits(pm)), _valid(_torch_logits(merged)), atol=1e-4)
    with pm.disable_adapter():
        assert np.abs(_torch_logits(pm) - _torch_logits(merged)).max() > 1e-4  # training changed the model

    start = dict(sections, lora={"target": None, "adapter": str(tmp_path / "whole" / "final_adapter")},
                 train={"steps": 1},
                 loss={"reference": "cached"}, checkpoint={"export": False})
    run = loop.setup(_run_cfg(folder, tmp_path, "again", **start))
    with torch.no_grad():
        want = _torch_pair_logps(pm, run.sets["train"].tokens)
    np.testing.assert_allclose(run.sets["train"].ref["ref_chosen_logps"], want["chosen"].numpy(), atol=1e-4)


def _pairs_file(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return f


def test_config_errors(folder, tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.dropout: 0\.1 is not supported"):
        _run_cfg(folder, tmp_path, "x", lora={"dropout": 0.1})
    with pytest.raises(ConfigError, match=r"loss\.reference: adapter_off needs LoRA"):
        config.from_dict({"loss": {"reference": "adapter_off"}})
    model, tok = models.load_pretrained(folder)
    with pytest.raises(ConfigError, match=r"lora\.target: lora target 'nothing' matches no linear layer"):
        loop.setup_loaded(model, tok, PAIRS, _run_cfg(folder, tmp_path, "y", lora={"target": "nothing"}))
    with pytest.raises(ConfigError, match=r"lora\.target: lora target 'qq' is not one of q, k, v"):
        loop.setup_loaded(model, tok, PAIRS, _run_cfg(folder, tmp_path, "z", lora={"target": ["qq"]}))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_adapters_follow_the_mesh_rules(folder):
    """On a (data 2, fsdp 2, tensor 2) mesh A and B take the kernel's axes (embed → fsdp, heads → tensor,
    lora_rank replicated), and the sharded model computes the unsharded logits."""
    from jax.sharding import PartitionSpec as P

    from jaxalign import parallel

    mesh = parallel.make_mesh((2, 2, 2))
    plain, _ = models.load_pretrained(folder)
    lora.apply(plain, lora.LoRASettings(target=["q", "o", "down"], r=2), seed=5)
    _randomise_b(plain, seed=1)
    sharded, _ = models.load_pretrained(folder, mesh=mesh)
    lora.apply(sharded, lora.LoRASettings(target=["q", "o", "down"], r=2), seed=5, mesh=mesh)
    for (path, want), (_, got) in zip(lora.adapted_layers(plain).items(), lora.adapted_layers(sharded).items()):
        got.lora.lora_b.set_value(jax.device_put(want.lora.lora_b[...], got.lora.lora_b[...].sharding))
    q = lora.adapted_layers(sharded)["layers.0.attn.q_proj"].lora
    o = lora.adapted_layers(sharded)["layers.0.attn.o_proj"].lora
    assert q.lora_a[...].sharding.spec == P("fsdp", None) and q.lora_b[...].sharding.spec == P(None, "tensor", None)
    assert o.lora_a[...].sharding.spec == P("tensor", None, None) and o.lora_b[...].sharding.spec == P(None, "fsdp")
    np.testing.assert_allclose(_logits(sharded), _logits(plain), atol=1e-5)  # sharded sums reorder float32
