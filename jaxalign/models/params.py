"""Hugging Face tensor names ⇄ our NNX parameters: one rule table per family.

A :class:`Rule` pairs an HF name template with one or more of our parameter paths (``{i}`` is the layer
index) and two transforms: HF array → our arrays, and back. Linear weights are ``[out, in]`` in HF
(``nn.Linear``) and ``[in, out]`` here with the head dims kept apart (``[D, N, H]``); GPT-2's
``Conv1D`` weights are already ``[in, out]``; fused q/k/v (GPT-2 ``c_attn``: ``[D, (3, N, H)]``;
GPT-NeoX ``query_key_value``: ``[(N, 3, H), D]``, interleaved per head; Phi-3 ``qkv_proj``:
``[(N·H | K·H | K·H), D]``) are split into ``q_proj``/``k_proj``/``v_proj``, and Phi-3's
``gate_up_proj`` ``[(F | F), D]`` into ``gate_proj``/``up_proj``.

:func:`from_hf_tensors` builds the model abstractly (``nnx.eval_shape``), fills every parameter (directly
in its sharding when a mesh is given) and raises one :class:`~jaxalign.errors.ModelError` listing every
unmapped tensor, missing parameter and shape mismatch. :func:`to_hf_tensors` is its inverse, with the names
``transformers`` writes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import parallel
from jaxalign.errors import ModelError


@dataclasses.dataclass(frozen=True)
class Rule:
    """``hf`` template ⇄ ``ours`` paths; ``to_ours(x, cfg) -> tuple``, ``to_hf(parts, cfg) -> array``."""

    hf: str
    ours: tuple[str, ...]
    to_ours: Callable[[np.ndarray, Any], tuple[np.ndarray, ...]]
    to_hf: Callable[[tuple[np.ndarray, ...], Any], np.ndarray]

    def hf_regex(self) -> re.Pattern:
        pattern = re.escape(self.hf).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        return re.compile(pattern + "$")

    @property
    def per_expert(self) -> bool:
        """One HF tensor per expert ``{e}``, each one slice ``[e]`` of our stacked ``[E, …]`` parameter."""
        return "{e}" in self.hf

    def ours_regex(self) -> re.Pattern:
        return re.compile(re.escape(self.ours[0]).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class Table:
    """The rules of one family, the HF buffers it ignores, and an HF-name normaliser."""

    rules: tuple[Rule, ...]
    ignored: tuple[str, ...] = ()  # regexes of HF buffers that carry no parameter
    prefix: str = ""  # added to names that lack it (GPT-2 checkpoints without "transformer.")
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement) applied to names before matching


# --- transforms ----------------------------------------------------------------------------------

def _same(x, cfg):
    return (x,)


def _same_back(parts, cfg):
    return parts[0]


def _transpose(x, cfg):
    return (x.T,)


def _transpose_back(parts, cfg):
    return parts[0].T


def _heads(attr: str):
    """``nn.Linear`` ``[n·H, D]`` → ``[D, n, H]`` (``n`` = cfg.<attr>), and back."""
    def to_ours(x, cfg):
        return (x.T.reshape(x.shape[1], getattr(cfg, attr), -1),)

    def to_hf(parts, cfg):
        y = parts[0]
        return y.reshape(y.shape[0], -1).T
    return to_ours, to_hf


def _bias_heads(attr: str):
    """Bias ``[n·H]`` → ``[n, H]``, and back."""
    def to_ours(x, cfg):
        return (x.reshape(getattr(cfg, attr), -1),)

    def to_hf(parts, cfg):
        return parts[0].reshape(-1)
    return to_ours, to_hf


def _out_heads(x, cfg):
    """``nn.Linear`` ``[D, N·H]`` → ``[N, H, D]``."""
    return (x.T.reshape(cfg.num_heads, -1, x.shape[0]),)


def _out_heads_back(parts, cfg):
    y = parts[0]
    return y.reshape(-1, y.shape[-1]).T


def _conv_out_heads(x, cfg):
    """GPT-2 ``Conv1D`` ``[N·H, D]`` → ``[N, H, D]``."""
    return (x.reshape(cfg.num_heads, -1, x.shape[-1]),)


def _conv_out_heads_back(parts, cfg):
    return parts[0].reshape(-1, parts[0].shape[-1])


def _gpt2_qkv(x, cfg):
    """``c_attn.weight`` ``[D, (3, N, H)]`` → q, k, v ``[D, N, H]``."""
    y = x.reshape(x.shape[0], 3, cfg.num_heads, -1)
    return y[:, 0], y[:, 1], y[:, 2]


def _gpt2_qkv_back(parts, cfg):
    y = np.stack(parts, axis=1)
    return y.reshape(y.shape[0], -1)


def _gpt2_qkv_bias(x, cfg):
    y = x.reshape(3, cfg.num_heads, -1)
    return y[0], y[1], y[2]


def _gpt2_qkv_bias_back(parts, cfg):
    return np.stack(parts, axis=0).reshape(-1)


def _neox_qkv(x, cfg):
    """``query_key_value.weight`` ``[(N, 3, H), D]`` → q, k, v ``[D, N, H]`` (interleaved per head)."""
    y = x.reshape(cfg.num_heads, 3, -1, x.shape[-1])  # [N, 3, H, D]
    return tuple(y[:, j].transpose(2, 0, 1) for j in range(3))


def _neox_qkv_back(parts, cfg):
    y = np.stack([p.transpose(1, 2, 0) for p in parts], axis=1)  # [N, 3, H, D]
    return y.reshape(-1, y.shape[-1])


def _neox_qkv_bias(x, cfg):
    y = x.reshape(cfg.num_heads, 3, -1)
    return y[:, 0], y[:, 1], y[:, 2]


def _neox_qkv_bias_back(parts, cfg):
    return np.stack(parts, axis=1).reshape(-1)


def _phi3_qkv(x, cfg):
    """``qkv_proj.weight`` ``[(N·H | K·H | K·H), D]`` → q ``[D, N, H]``, k, v ``[D, K, H]``."""
    H = cfg.head_dim
    q, k, v = np.split(x, [cfg.num_heads * H, (cfg.num_heads + cfg.num_kv_heads) * H])
    return tuple(w.T.reshape(x.shape[1], -1, H) for w in (q, k, v))


def _phi3_qkv_back(parts, cfg):
    return np.concatenate([p.reshape(p.shape[0], -1).T for p in parts], axis=0)


def _phi3_gate_up(x, cfg):
    """``gate_up_proj.weight`` ``[(F | F), D]`` → gate, up ``[D, F]``."""
    gate, up = np.split(x, 2)
    return gate.T, up.T


def _phi3_gate_up_back(parts, cfg):
    return np.concatenate([p.T for p in parts], axis=0)


def _rule(hf, ours, fwd=_same, back=_same_back):
    return Rule(hf, (ours,) if isinstance(ours, str) else tuple(ours), fwd, back)


# --- tables --------------------------------------------------------------------------------------

def _llama_table(placement: str) -> Table:
    """Llama-like. HF's ``post_attention_layernorm`` is the pre-MLP norm (our ``mlp_norm``) in the ``pre``
    placement and the norm of the attention output (``attn_out_norm``) in Gemma 2 (``sandwich``: its
    pre-MLP norm is ``pre_feedforward_layernorm``) and OLMo 2 (``post``)."""
    L, O = "model.layers.{i}.", "layers.{i}."
    a, m = L + "self_attn.", L + "mlp."
    norms = {"pre": [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")],
             "sandwich": [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_out_norm"),
                          ("pre_feedforward_layernorm", "mlp_norm"),
                          ("post_feedforward_layernorm", "mlp_out_norm")],
             "post": [("post_attention_layernorm", "attn_out_norm"),
                      ("post_feedforward_layernorm", "mlp_out_norm")]}[placement]
    rules = [
        _rule("model.embed_tokens.weight", "embed.embedding"),
        _rule("lm_head.weight", "lm_head"),
        _rule("model.norm.weight", "final_norm.scale"),
        *(_rule(L + hf + ".weight", O + ours + ".scale") for hf, ours in norms),
        _rule(a + "q_proj.weight", O + "attn.q_proj.kernel", *_heads("num_heads")),
        _rule(a + "k_proj.weight", O + "attn.k_proj.kernel", *_heads("num_kv_heads")),
        _rule(a + "v_proj.weight", O + "attn.v_proj.kernel", *_heads("num_kv_heads")),
        _rule(a + "q_proj.bias", O + "attn.q_proj.bias", *_bias_heads("num_heads")),
        _rule(a + "k_proj.bias", O + "attn.k_proj.bias", *_bias_heads("num_kv_heads")),
        _rule(a + "v_proj.bias", O + "attn.v_proj.bias", *_bias_heads("num_kv_heads")),
        _rule(a + "o_proj.weight", O + "attn.o_proj.kernel", _out_heads, _out_heads_back),
        _rule(a + "o_proj.bias", O + "attn.o_proj.bias"),
        _rule(a + "q_norm.weight", O + "attn.q_norm.scale"),
        _rule(a + "k_norm.weight", O + "attn.k_norm.scale"),
    ]
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules.append(_rule(m + name + ".weight", O + "mlp." + name + ".kernel", _transpose, _transpose_back))
        rules.append(_rule(m + name + ".bias", O + "mlp." + name + ".bias"))
    return Table(tuple(rules), ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))


def _phi3_table() -> Table:
    """Phi-3: Llama's names except the fused ``qkv_proj`` and ``gate_up_proj``."""
    L, O = "model.layers.{i}.", "layers.{i}."
    fused = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    rules = [r for r in _llama_table("pre").rules
             if not any(f".{name}." in r.hf for name in fused) and "_norm." not in r.hf]
    rules += [
        _rule(L + "self_attn.qkv_proj.weight", tuple(O + f"attn.{n}_proj.kernel" for n in "qkv"),
              _phi3_qkv, _phi3_qkv_back),
        _rule(L + "mlp.gate_up_proj.weight", (O + "mlp.gate_proj.kernel", O + "mlp.up_proj.kernel"),
              _phi3_gate_up, _phi3_gate_up_back),
    ]
    return Table(tuple(rules), ignored=_llama_table("pre").ignored)


def _moe_table(model_type: str) -> Table:
    """Mixtral / Qwen3-MoE: Llama's names (Qwen3-MoE's dense layers included) plus a router and per-expert
    MLP tensors, stacked into ``[E, …]`` kernels here."""
    L, O = "model.layers.{i}.", "layers.{i}.mlp."
    block, names = {"mixtral": ("block_sparse_moe.", ("w1", "w3", "w2")),
                    "qwen3_moe": ("mlp.", ("gate_proj", "up_proj", "down_proj"))}[model_type]
    rules = list(_llama_table("pre").rules) + [
        _rule(L + block + "gate.weight", O + "router.kernel", _transpose, _transpose_back)]
    for hf, ours in zip(names, ("expert_gate", "expert_up", "expert_down")):
        rules.append(_rule(L + block + "experts.{e}." + hf + ".weight", O + ours + ".kernel", _transpose,
                           _transpose_back))
    return Table(tuple(rules), ignored=_llama_table("pre").ignored)


def _gpt2_table() -> Table:
    H, O = "transformer.h.{i}.", "layers.{i}."
    qkv = tuple(O + f"attn.{n}_proj.kernel" for n in "qkv")
    qkv_b = tuple(O + f"attn.{n}_proj.bias" for n in "qkv")
    rules = [
        _rule("transformer.wte.weight", "wte.embedding"),
        _rule("transformer.wpe.weight", "wpe.embedding"),
        _rule("lm_head.weight", "lm_head"),
        _rule("transformer.ln_f.weight", "final_norm.scale"),
        _rule("transformer.ln_f.bias", "final_norm.bias"),
        _rule(H + "ln_1.weight", O + "attn_norm.scale"),
        _rule(H + "ln_1.bias", O + "attn_norm.bias"),
        _rule(H + "ln_2.weight", O + "mlp_norm.scale"),
        _rule(H + "ln_2.bias", O + "mlp_norm.bias"),
        _rule(H + "attn.c_attn.weight", qkv, _gpt2_qkv, _gpt2_qkv_back),
        _rule(H + "attn.c_attn.bias", qkv_b, _gpt2_qkv_bias, _gpt2_qkv_bias_back),
        _rule(H + "attn.c_proj.weight", O + "attn.o_proj.kernel", _conv_out_heads, _conv_out_heads_back),
        _rule(H + "attn.c_proj.bias", O + "attn.o_proj.bias"),
        _rule(H + "mlp.c_fc.weight", O + "mlp.up_proj.kernel"),
        _rule(H + "mlp.c_fc.bias", O + "mlp.up_proj.bias"),
        _rule(H + "mlp.c_proj.weight", O + "mlp.down_proj.kernel"),
        _rule(H + "mlp.c_proj.bias", O + "mlp.down_proj.bias"),
    ]
    return Table(tuple(rules), ignored=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",),
                 prefix="transformer.")


def _gpt_neox_table() -> Table:
    L, O = "gpt_neox.layers.{i}.", "layers.{i}."
    qkv = tuple(O + f"attn.{n}_proj.kernel" for n in "qkv")
    qkv_b = tuple(O + f"attn.{n}_proj.bias" for n in "qkv")
    rules = [
        _rule("gpt_neox.embed_in.weight", "embed.embedding"),
        _rule("embed_out.weight", "lm_head"),
        _rule("gpt_neox.final_layer_norm.weight", "final_norm.scale"),
        _rule("gpt_neox.final_layer_norm.bias", "final_norm.bias"),
        _rule(L + "input_layernorm.weight", O + "attn_norm.scale"),
        _rule(L + "input_layernorm.bias", O + "attn_norm.bias"),
        _rule(L + "post_attention_layernorm.weight", O + "mlp_norm.scale"),
        _rule(L + "post_attention_layernorm.bias", O + "mlp_norm.bias"),
        _rule(L + "attention.query_key_value.weight", qkv, _neox_qkv, _neox_qkv_back),
        _rule(L + "attention.query_key_value.bias", qkv_b, _neox_qkv_bias, _neox_qkv_bias_back),
        _rule(L + "attention.dense.weight", O + "attn.o_proj.kernel", _out_heads, _out_heads_back),
        _rule(L + "attention.dense.bias", O + "attn.o_proj.bias"),
        _rule(L + "mlp.dense_h_to_4h.weight", O + "mlp.up_proj.kernel", _transpose, _transpose_back),
        _rule(L + "mlp.dense_h_to_4h.bias", O + "mlp.up_proj.bias"),
        _rule(L + "mlp.dense_4h_to_h.weight", O + "mlp.down_proj.kernel", _transpose, _transpose_back),
        _rule(L + "mlp.dense_4h_to_h.bias", O + "mlp.down_proj.bias"),
    ]
    return Table(tuple(rules), ignored=(
        r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",))


TABLES: dict[str, Table] = {
    "llama": _llama_table("pre"),
    "mistral": _llama_table("pre"),
    "qwen2": _llama_table("pre"),
    "qwen3": _llama_table("pre"),
    "gemma": _llama_table("pre"),
    "gemma2": _llama_table("sandwich"),
    "gemma3_text": _llama_table("sandwich"),
    "phi3": _phi3_table(),
    "mixtral": _moe_table("mixtral"),
    "qwen3_moe": _moe_table("qwen3_moe"),
    # Gemma 3 image-text checkpoints: the text decoder's tensors (transformers 5 and 4 names); the vision
    # tower and projector carry no parameter of the text model.
    "gemma3": Table(_llama_table("sandwich").rules, ignored=_llama_table("sandwich").ignored
                    + (r"(model\.)?(vision_tower|multi_modal_projector)\..*",),
                    renames=((r"^model\.language_model\.", "model."), (r"^language_model\.model\.", "model."),
                             (r"^language_model\.lm_head\.", "lm_head."))),
    "olmo": _llama_table("pre"),
    "olmo2": _llama_table("post"),
    "gpt2": _gpt2_table(),
    "gpt_neox": _gpt_neox_table(),
}


# --- loading and saving --------------------------------------------------------------------------

def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def _match(table: Table, name: str):
    """``(rule, layer index, expert index)`` of HF name ``name`` (``None``s when no rule takes it)."""
    for rule in table.rules:
        m = rule.hf_regex().match(name)
        if m:
            return rule, m.groupdict().get("i"), m.groupdict().get("e")
    return None, None, None


def abstract_model(model_type: str, cfg, *, dtype=jnp.float32, param_dtype=None, remat: str | None = None):
    """The model of ``cfg`` with shapes only (``nnx.eval_shape``); no memory is allocated."""
    from jaxalign.models import registry

    _, model_cls, _ = registry.get_family(model_type)
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                            param_dtype=param_dtype or dtype, remat=remat))


def from_hf_tensors(family: str | None, cfg, tensors: Mapping[str, Any], *, dtype=jnp.float32,
                    param_dtype=None, mesh: jax.sharding.Mesh | None = None, remat: str | None = None):
    """Builds the model of ``cfg`` from Hugging Face tensors.

    Args:
      family: HF ``model_type`` (``None``: ``cfg.model_type``).
      cfg: the family's config (``Config.from_hf(config_json)``).
      tensors: HF name → array-like (NumPy, or lazy: ``np.asarray`` is called once per tensor).
      dtype: activation dtype of the model.
      param_dtype: parameter dtype (default ``dtype``); tensors are cast on the host.
      mesh: when given, each parameter is created directly in its sharding (logical axes through
        :data:`jaxalign.parallel.RULES`), never whole on one device.
      remat: per-block remat policy name passed to the model.

    Returns:
      The filled ``nnx.Module``.

    Raises:
      ModelError: listing every tensor no rule takes, every parameter no tensor filled, and every shape
        mismatch (ignored HF buffers, e.g. ``rotary_emb.inv_freq``, and a tied ``lm_head.weight`` are not
        errors).
    """
    model_type = family or cfg.model_type
    table = TABLES[model_type]
    param_dtype = np.dtype(param_dtype or dtype)
    abstract = abstract_model(model_type, cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)
    graphdef, state = nnx.split(abstract)
    params = {_path_str(p): v for p, v in nnx.to_flat_state(state)}
    ignored = [re.compile(r + "$") for r in table.ignored]
    tied = getattr(cfg, "tie_word_embeddings", False)
    errors: list[str] = []
    filled: set[str] = set()
    stacks: dict[str, dict[int, np.ndarray]] = {}  # stacked expert parameter -> expert index -> slice
    for name in sorted(tensors):
        hf_name = name
        if table.prefix and not name.startswith(table.prefix) and not name.startswith("lm_head."):
            hf_name = table.prefix + name
        for pattern, replacement in table.renames:
            hf_name = re.sub(pattern, replacement, hf_name)
        if any(r.match(hf_name) for r in ignored) or (tied and hf_name == "lm_head.weight"):
            continue
        rule, i, e = _match(table, hf_name)
        if rule is None:
            errors.append(f"{name}: no {model_type} parameter takes this tensor")
            continue
        targets = [t.replace("{i}", i or "") for t in rule.ours]
        absent = [t for t in targets if t not in params]
        if absent:
            errors.append(f"{name}: this {model_type} config has no parameter {absent[0]} "
                          f"(a switch in config.json disagrees with the weights)")
            continue
        host = np.asarray(tensors[name])
        want = [tuple(params[t].get_value().shape) for t in targets]
        if rule.per_expert:
            want = [w[1:] for w in want]
        try:
            parts = rule.to_ours(host, cfg)
            bad = [(t, p.shape, w) for t, p, w in zip(targets, parts, want) if tuple(p.shape) != w]
        except ValueError:
            bad = [(targets[0], None, want[0])]
        if bad:
            errors.append(f"{name}: shape {tuple(host.shape)} does not fit {bad[0][0]} {bad[0][2]}")
            filled.update(targets)  # reported here, not again as missing
            continue
        if rule.per_expert:
            experts = stacks.setdefault(targets[0], {})
            experts[int(e)] = parts[0]
            continue
        for t, part in zip(targets, parts):
            var = params[t]
            _fill(var, np.array(part, dtype=param_dtype, order="C"), mesh)  # our own copy: no aliasing
            filled.add(t)
    errors += _fill_stacks(stacks, params, param_dtype, mesh)
    filled.update(stacks)
    for t in sorted(set(params) - filled):
        errors.append(f"missing tensor for parameter {t} {tuple(params[t].get_value().shape)}")
    if errors:
        raise ModelError(f"cannot load the {model_type} weights ({len(errors)} problem"
                         f"{'s' if len(errors) > 1 else ''}):\n  " + "\n  ".join(errors))
    return nnx.merge(graphdef, state)


def _fill_stacks(stacks: dict[str, dict[int, np.ndarray]], params: dict, param_dtype, mesh) -> list[str]:
    """Fills each stacked ``[E, …]`` expert parameter from its per-expert slices; returns the errors
    (experts without a tensor, or tensors for experts the config does not have)."""
    errors = []
    for t, experts in stacks.items():
        var = params[t]
        count = var.get_value().shape[0]
        absent = sorted(set(range(count)) - set(experts))
        extra = sorted(set(experts) - set(range(count)))
        if absent:
            errors.append(f"{t}: no tensor for expert(s) {', '.join(map(str, absent[:10]))}")
        if extra:
            errors.append(f"{t}: tensor(s) for expert(s) {', '.join(map(str, extra[:10]))} but the config "
                          f"has {count} experts")
        if not absent and not extra:
            _fill(var, np.stack([experts[x] for x in range(count)]).astype(param_dtype), mesh)
    return errors


def _fill(var: nnx.Variable, host: np.ndarray, mesh) -> None:
    if mesh is None:
        var.set_value(jnp.asarray(host))
        return
    sharding = parallel.named_sharding(var.get_metadata().get("logical_axes"), host.shape, mesh)
    var.set_value(jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx]))


_SCANNED = "layers.block."


def _per_layer_params(model: nnx.Module) -> dict[str, Any]:
    """Our path → value of every parameter, a scanned model's stacked ``layers.block.X`` ``[L, …]`` given
    back as ``layers.{i}.X`` (``model.scan_layers``; the same names as the unstacked model's)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, value = _path_str(path), var.get_value()
        if name.startswith(_SCANNED):
            for i in range(value.shape[0]):
                out[f"layers.{i}.{name[len(_SCANNED):]}"] = value[i]
        else:
            out[name] = value
    return out


def to_hf_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """HF name → NumPy array of every parameter of ``model``, as ``transformers`` saves them.

    A tied unembedding is not written (``transformers`` re-ties it from ``tie_word_embeddings``).
    Arrays keep their dtype (bfloat16 parameters give ``ml_dtypes.bfloat16`` arrays).
    """
    cfg = model.cfg
    table = TABLES[cfg.model_type]
    flat = _per_layer_params(model)
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for rule in table.rules:
        regex = rule.ours_regex()
        for path in sorted(flat):
            m = regex.match(path)
            if not m:
                continue
            i = m.groupdict().get("i") or ""
            targets = [t.replace("{i}", i) for t in rule.ours]
            if used.intersection(targets):
                raise ValueError(f"{cfg.model_type} table maps {targets} twice")
            parts = tuple(np.asarray(jax.device_get(flat[t])) for t in targets)
            hf_name = rule.hf.replace("{i}", i)
            if rule.per_expert:
                for e, part in enumerate(parts[0]):
                    out[hf_name.replace("{e}", str(e))] = np.ascontiguousarray(rule.to_hf((part,), cfg))
            else:
                out[hf_name] = np.ascontiguousarray(rule.to_hf(parts, cfg))
            used.update(targets)
    unused = sorted(set(flat) - used)
    if unused:
        raise ModelError(f"no {cfg.model_type} HF name for parameters: {', '.join(unused)}")
    return out
