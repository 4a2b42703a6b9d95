"""`parallel.constrain`: activations stay on their rows (data × fsdp), heads/MLP width over tensor.

Checked on 8 simulated CPU devices against the layout written out here from the mesh rules, and as a
no-op without a mesh; the model's outputs keep the rows' sharding that the constraints ask for.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import parallel
from jaxalign.models.llama import Llama, LlamaConfig


def test_constrain_specs_and_no_mesh():
    mesh = parallel.make_mesh((2, 2, 2), jax.devices()[:8])
    x = jnp.arange(8 * 4 * 6, dtype=jnp.float32).reshape(8, 4, 6)
    assert parallel.constrain(x, parallel.ACT_BTD) is x  # no mesh set: identity
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: parallel.constrain(a, parallel.ACT_BTF))(x)
        odd = jax.jit(lambda a: parallel.constrain(a, parallel.ACT_BTD))(x[:3])  # 3 rows: not divisible
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")  # rows over data×fsdp, F over tensor
    assert all(d is None for d in odd.sharding.spec)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # a layout, not a change of values


def test_model_activations_sharded_by_rows():
    cfg = LlamaConfig("llama", 64, 32, 64, 2, 4, 2, 8)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    mesh = parallel.make_mesh((2, 4, 1), jax.devices()[:8])
    ids = jnp.tile(jnp.arange(6, dtype=jnp.int32), (8, 1))
    mask = jnp.ones_like(ids)

    def hidden(st, i, m):
        return nnx.merge(graphdef, st)(i, m, return_logits=False).hidden

    plain = jax.jit(hidden)(state, ids, mask)
    with jax.set_mesh(mesh):
        placed = jax.device_put(state, parallel.state_shardings(state, mesh))
        out = jax.jit(hidden)(placed, ids, mask)
    assert out.sharding.spec[0] == ("data", "fsdp")  # the final hidden states stay on their rows
    # Same function: only reduction order may differ across the sharded matmuls (float32, width 32).
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-5, atol=1e-5)


def _constraint_ops(fn, *args) -> int:
    text = jax.jit(fn).lower(*args).as_text()
    return text.count("sharding_constraint") + text.count("@Sharding")


def test_activation_constraints_switch():
    mesh = parallel.make_mesh((2, 4, 1), jax.devices()[:8])
    x = jnp.ones((8, 4, 6))
    fn = lambda a: parallel.constrain(a * 2, parallel.ACT_BTD)  # noqa: E731
    with jax.set_mesh(mesh):
        on = _constraint_ops(fn, x)
        with parallel.activation_constraints(False):
            off = _constraint_ops(lambda a: fn(a), x)  # a new function: JAX's trace cache ignores the flag
            assert parallel.constrain(x, parallel.ACT_BTD) is x
        again = _constraint_ops(lambda a: fn(a), x)  # the block restores the default
    assert (on, off, again) == (1, 0, 1)


def test_vocabulary_tables_split_by_rows_and_logits_by_vocab():
    """The tables [V, D] are split by rows over fsdp × tensor; the logits follow the vocabulary split with
    their rows over data only. A vocabulary that does not divide keeps the tables split by D and the
    logits on their rows (data × fsdp)."""
    mesh = parallel.make_mesh((2, 2, 2), jax.devices()[:8])
    assert parallel.logical_to_spec(("vocab", "embed"), (64, 32), mesh) == P(("fsdp", "tensor"), None)
    assert parallel.logical_to_spec(("vocab", "embed"), (63, 32), mesh) == P(None, "fsdp")
    x = jnp.arange(4 * 3 * 64, dtype=jnp.float32).reshape(4, 3, 64)
    with jax.set_mesh(mesh):
        split = jax.jit(parallel.constrain_logits)(x)
        odd = jax.jit(parallel.constrain_logits)(x[..., :63])
    assert split.sharding.spec == P("data", None, ("fsdp", "tensor"))
    assert odd.sharding.spec[0] == ("data", "fsdp") and all(a is None for a in odd.sharding.spec[1:])
    np.testing.assert_array_equal(np.asarray(split), np.asarray(x))
