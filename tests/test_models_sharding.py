"""Models loaded straight into a sharded mesh (8 simulated CPU devices) equal the 1-device result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny  # noqa: E402

from jaxalign import parallel  # noqa: E402
from jaxalign.models import params, registry  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _load(model_type, root, mesh=None):
    path = hf_tiny.make_tiny(model_type, root / model_type)
    cfg = registry.config_from_hf(json.loads((path / "config.json").read_text()))
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    return params.from_hf_tensors(None, cfg, tensors, mesh=mesh)


def _batch(B=4, T=8):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, hf_tiny.VOCAB, (B, T))
    mask = (np.arange(T)[None] >= np.array([0, 3, 1, 5])[:, None]).astype(np.int32)  # left padded
    return ids, mask


@pytest.mark.parametrize("model_type,shape", [("llama", (2, 2, 2)), ("llama", (1, 4, 2)),
                                              ("gpt2", (2, 2, 2)), ("gpt_neox", (1, 4, 2))])
def test_sharded_load_and_jitted_forward(model_type, shape, tmp_path):
    mesh = parallel.make_mesh(shape)
    model = _load(model_type, tmp_path, mesh=mesh)
    state = nnx.state(model, nnx.Param)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}

    # Every parameter sits in the sharding its logical axes ask for; the big ones are really split.
    for name, var in flat.items():
        value = var.get_value()
        want = parallel.logical_to_spec(var.get_metadata()["logical_axes"], value.shape, mesh)
        assert value.sharding.spec == want, name
    q = flat["layers.0.attn.q_proj.kernel"].get_value()  # [D, N, H]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (64 // shape[1], 4 // shape[2], 16)
    embed = "wte.embedding" if model_type == "gpt2" else "embed.embedding"
    assert flat[embed].get_value().sharding.spec == P(("fsdp", "tensor"), None)  # rows (vocabulary-parallel)

    ids, mask = _batch()
    reference = _load(model_type, tmp_path / "one")(jnp.asarray(ids), jnp.asarray(mask))
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    data = parallel.batch_sharding(mesh, 2)

    @jax.jit
    def forward(params_state, rest, ids, mask):
        out = nnx.merge(graphdef, params_state, rest)(ids, mask)
        return out.logits, out.hidden

    with jax.set_mesh(mesh):
        logits, hidden = forward(params_state, rest, jax.device_put(jnp.asarray(ids), data),
                                 jax.device_put(jnp.asarray(mask), data))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(reference.logits)[valid], atol=1e-5)
    np.testing.assert_allclose(np.asarray(hidden)[valid], np.asarray(reference.hidden)[valid], atol=1e-5)
