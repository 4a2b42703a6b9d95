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
