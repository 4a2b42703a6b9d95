"""The ``expert`` mesh axis: a mixture-of-experts model's expert kernels ``[E, …]`` and router ``[D, E]``
split their experts over it, and the sharded forward pass gives the one-device logits (8 simulated CPU
devices, a tiny random ``qwen3_moe`` with 4 experts)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402

from jaxalign import parallel  # noqa: E402
from jaxalign.models import load_pretrained  # noqa: E402


def test_mesh_shapes():
    assert parallel.make_mesh((8, 1, 1)).shape == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
    assert parallel.make_mesh((2, 1, 1, -1)).shape["expert"] == 4
    with pytest.raises(ValueError, match="3 or 4 sizes"):
        parallel.make_mesh((8, 1))


def test_expert_sharded_logits_equal_one_device(tmp_path):
    folder = make_tiny("qwen3_moe", tmp_path / "moe")
    one, _ = load_pretrained(folder)
    mesh = parallel.make_mesh((2, 1, 1, 4))
    model, _ = load_pretrained(folder, mesh=mesh)
    mlp = model.layers[0].mlp
    assert mlp.expert_gate.kernel[...].sharding.spec == P("expert", None, None)
    assert mlp.expert_down.kernel[...].sharding.spec == P("expert", None, None)
    assert mlp.router.kernel[...].sharding.spec == P(None, "expert")
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, size=(4, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = mask[3, :5] = 0  # left padding
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask).logits

    with jax.set_mesh(mesh):
        data = parallel.batch_sharding(mesh, 2)
        got = np.asarray(forward(state, jax.device_put(jnp.asarray(ids), data),
                                 jax.device_put(jnp.asarray(mask), data)))
    want = np.asarray(one(jnp.asarray(ids), jnp.asarray(mask)).logits)
    valid = mask > 0
    # the same float32 maths with another reduction order (the expert sum is an all-reduce): 1e-5
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5)


# --- the train config's mesh.expert ------------------------------------------------------------------

PAIRS = [
    {"prompt": "hello there, how are you?\n", "chosen": "fine thanks", "rejected": "go away"},
    {"prompt": "name a colour\n", "chosen": "blue", "rejected": "hello"},
    {"prompt": "say hi\n", "chosen": "hi!", "rejected": "no."},
    {"prompt": "count to three\n", "chosen": "1 2 3", "rejected": "1 2"},
]


@pytest.fixture(scope="module")
def moe_run_inputs(tmp_path_factory):
    import json

    from tiny_tokenizer import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("moe_train")
    folder = make_tiny("qwen3_moe", root / "moe", vocab_size=272, pad_token_id=3, eos_token_id=2,
                       bos_token_id=4)
    make_tiny_tokenizer(folder)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return folder, data, root


def _moe_cfg(inputs, out: Path, mesh: dict):
    from jaxalign.train import config

    folder, data, root = inputs
    return config.from_dict({
        "model": {"path": str(folder)}, "data": {"train": str(data), "probe_size": 2},
        "optim": {"name": "sgd", "lr": 0.5}, "train": {"batch_size": 4, "steps": 2}, "mesh": mesh,
        "intervals": {"probe": None, "ledger": None, "checkpoint": None},
        "checkpoint": {"export": False, "async_save": False},
        "output_dir": str(out), "cache_dir": str(root / "ref_cache")}, [])


def test_train_mesh_expert_axis_equals_one_device(moe_run_inputs, tmp_path):
    """``mesh: {data: 2, expert: 4}`` on 8 simulated devices: each device holds one expert of the tiny
    ``qwen3_moe``, and two SGD steps give the one-device run's metrics."""
    from jaxalign.train import loop

    one = loop.train(_moe_cfg(moe_run_inputs, tmp_path / "one", {"data": 1}), progress=False)
    sharded = loop.train(_moe_cfg(moe_run_inputs, tmp_path / "ep", {"data": 2, "expert": 4}), progress=False)
    # float32, another reduction order (the expert sum is an all-reduce, the batch is split over data),
    # carried through one update at lr 0.5: 1e-4 relative
    for k in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        np.testing.assert_allclose(sharded["final_metrics"][k], one["final_metrics"][k], rtol=1e-4, atol=1e-5)


def test_train_mesh_expert_axis_refusals(moe_run_inputs, tmp_path):
    from jaxalign.errors import ConfigError
    from jaxalign.train import loop

    with pytest.raises(ConfigError, match=r"mesh.expert: must be a positive size or -1, got 0"):
        loop.train(_moe_cfg(moe_run_inputs, tmp_path / "a", {"data": 1, "expert": 0}), progress=False)
    with pytest.raises(ConfigError, match=r"mesh: .*needs 16 devices"):
        loop.train(_moe_cfg(moe_run_inputs, tmp_path / "b", {"data": 2, "expert": 8}), progress=False)
