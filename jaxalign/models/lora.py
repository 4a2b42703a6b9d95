"""LoRA adapters on the linear layers of a model, and PEFT adapter folders in and out.

Letters as in the models; ``r`` is the adapter rank.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, §4.1) adds a low-rank
update to a frozen linear map: ``y = x·W + s · (x·A)·B`` with ``A`` ``[in, r]``, ``B`` ``[r, out]`` and
``s = alpha / r``, or ``alpha / √r`` with rsLoRA (Kalajdzievski, "A Rank Stabilization Scaling Factor
for Fine-Tuning with LoRA", 2023, §3). Here each adapted :class:`jaxalign.models.base.Einsum` holds a
:class:`LoRA` module; its ``A`` keeps the kernel's input dims apart and its ``B`` the output dims
(``q_proj``: ``A`` ``[D, r]``, ``B`` ``[r, N, H]``), so the mesh rules shard them like the kernel.

* Init as PEFT: ``A`` Kaiming-uniform with ``a = √5`` (uniform in ``±1/√fan_in``), ``B`` zero, so a new
  adapter leaves the model unchanged.
* ``A`` and ``B`` are :class:`LoRAParam` variables (``nnx.LoRAParam``, a kind of ``nnx.Param``):
  ``nnx.split(model, LoRAParam, ...)`` takes the adapters only, everything else stays frozen.
* The switch is a static attribute: :func:`set_adapters` ``(model, False)`` inside a jitted function
  gives "the same model with the adapters off" without a second copy of the weights.
* :func:`save_peft` / :func:`load_peft` write and read PEFT's ``adapter_config.json`` +
  ``adapter_model.safetensors`` (keys ``base_model.model.<HF module>.lora_A.weight``), for the
  Llama-like families whose linear weights are not fused; :func:`merged` folds the adapters into the
  kernels (an ordinary model that ``save_pretrained`` writes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import parallel
from jaxalign.errors import ConfigError, ModelError
from jaxalign.models import base

LoRAParam = nnx.LoRAParam

#: Short names of the linear layers of a decoder block (our module names are ``<name>_proj``).
SHORT_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
#: Families whose adapters map to PEFT's keys one to one (no fused q/k/v or gate/up weights).
PEFT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")
_RANK = "r"


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """Where adapters go and how they scale.

    Attributes:
      target: ``"all"`` (the seven block projections), a list of :data:`SHORT_NAMES`, or a regular
        expression matched in full against our module paths (``layers.0.attn.q_proj``).
      r: rank; alpha: the scale's numerator; rslora: ``alpha / √r`` instead of ``alpha / r``.
    """

    target: Any = "all"
    r: int = 8
    alpha: float = 16.0
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def pattern(self) -> re.Pattern:
        """The regex over module paths that :attr:`target` stands for."""
        names = list(SHORT_NAMES) if self.target == "all" else self.target
        if isinstance(names, (list, tuple)):
            bad = [n for n in names if n not in SHORT_NAMES]
            if bad or not names:
                raise ModelError(f"lora target {bad[0] if bad else names!r} is not one of "
                                 f"{', '.join(SHORT_NAMES)} (or 'all', or a regex)")
            return re.compile(r"layers\.\d+\.(attn|mlp)\.(" + "|".join(f"{n}_proj" for n in names) + ")")
        try:
            return re.compile(str(names))
        except re.error as err:
            raise ModelError(f"lora target {names!r} is not a regular expression: {err}") from None


def _split_equation(equation: str) -> tuple[str, str, str, str]:
    """``(x, kernel_in, kernel_out, out)`` letters of ``"x,kernel->out"`` with kernel = in + out."""
    lhs, out = equation.split("->")
    x, kernel = lhs.split(",")
    k_in = "".join(c for c in kernel if c in x and c not in out)
    k_out = "".join(c for c in kernel if c in out and c not in x)
    if kernel != k_in + k_out or _RANK in equation:
        raise ModelError(f"LoRA needs a kernel of input dims then output dims; {equation!r} is not")
    return x, k_in, k_out, out


class LoRA(nnx.Module):
    """The adapter of one :class:`~jaxalign.models.base.Einsum`: ``s · einsum(einsum(x, A), B)``.

    Args:
      equation: the wrapped layer's einsum (e.g. ``"BTD,DNH->BTNH"``).
      kernel_shape, kernel_axes: the wrapped kernel's shape and logical axes.
      settings: rank, alpha, rsLoRA.
      rngs: the key of ``A``'s init. dtype: compute dtype; param_dtype: ``A``/``B`` storage (float32).
    """

    def __init__(self, equation: str, kernel_shape, kernel_axes, settings: LoRASettings, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        x, k_in, k_out, out = _split_equation(equation)
        n_in = len(k_in)
        in_shape, out_shape = tuple(kernel_shape[:n_in]), tuple(kernel_shape[n_in:])
        rest = "".join(c for c in x if c not in k_in)
        self.a_equation = f"{x},{k_in}{_RANK}->{rest}{_RANK}"
        self.b_equation = f"{rest}{_RANK},{_RANK}{k_out}->{out}"
        bound = 1.0 / math.sqrt(math.prod(in_shape))  # kaiming_uniform(a=√5) on fan_in = prod(in_shape)
        a = jax.random.uniform(rngs.params(), in_shape + (settings.r,), param_dtype, -bound, bound)
        self.lora_a = LoRAParam(a, logical_axes=tuple(kernel_axes[:n_in]) + ("lora_rank",))
        self.lora_b = LoRAParam(jnp.zeros((settings.r,) + out_shape, param_dtype),
                                logical_axes=("lora_rank",) + tuple(kernel_axes[n_in:]))
        self.scale = settings.scale
        self.dtype = dtype
        self.enabled = True

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum(self.a_equation, x.astype(self.dtype), self.lora_a[...].astype(self.dtype))
        y = jnp.einsum(self.b_equation, h, self.lora_b[...].astype(self.dtype))
        return y * jnp.asarray(self.scale, self.dtype)

    def delta(self) -> jax.Array:
        """``s · A·B`` in float32, shaped like the kernel (for merging)."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return jnp.tensordot(a, b, axes=1) * self.scale


def _path(path) -> str:
    return ".".join(str(p) for p in path)


def adapted_layers(model: nnx.Module) -> dict[str, base.Einsum]:
    """``{module path: Einsum}`` of the layers that hold an adapter."""
    return {_path(p): m for p, m in nnx.iter_graph(model)
            if isinstance(m, base.Einsum) and getattr(m, "lora", None) is not None}


def has_adapters(model: nnx.Module) -> bool:
    return bool(adapted_layers(model))


def apply(model: nnx.Module, settings: LoRASettings, *, seed: int = 0, mesh=None) -> nnx.Module:
    """Adds a fresh adapter to every linear layer whose path matches ``settings`` (in place); returns it.

    The adapters are float32 whatever the base weights' dtype, created in their sharding when ``mesh`` is
    given. ``ModelError`` when nothing matches, or a matched layer already has one.
    """
    if settings.r < 1:
        raise ModelError(f"lora r must be a positive rank, got {settings.r}")
    pattern = settings.pattern()
    rngs = nnx.Rngs(seed)
    matched = [(p, m) for p, m in ((_path(p), m) for p, m in nnx.iter_graph(model))
               if isinstance(m, base.Einsum) and pattern.fullmatch(p)]
    if not matched:
        raise ModelError(f"lora target {settings.target!r} matches no linear layer of the model "
                         f"(paths look like layers.0.attn.q_proj, layers.0.mlp.down_proj)")
    for path, layer in matched:
        if getattr(layer, "lora", None) is not None:
            raise ModelError(f"{path} has an adapter already")
        kernel = layer.kernel
        layer.lora = LoRA(layer.equation, kernel.shape, kernel.get_metadata()["logical_axes"], settings,
                          rngs=rngs, dtype=layer.dtype)
    if mesh is not None:
        state = nnx.state(model, LoRAParam)
        nnx.update(model, jax.device_put(state, parallel.state_shardings(state, mesh)))
    return model


def set_adapters(model: nnx.Module, enabled: bool) -> nnx.Module:
    """Switches every adapter on or off (in place; a static switch, usable on a model merged inside
    ``jit``); returns the model. Off, the model computes exactly its base."""
    for layer in adapted_layers(model).values():
        layer.lora.enabled = enabled
    return model


def merged(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` without adapters whose kernels are ``W + s·A·B`` (in ``W``'s dtype)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    for layer in adapted_layers(copy).values():
        kernel = layer.kernel[...]
        if layer.lora.enabled:
            kernel = (kernel.astype(jnp.float32) + layer.lora.delta()).astype(kernel.dtype)
        layer.kernel.set_value(kernel)
        layer.lora = None
    return copy


# --- PEFT folders -------------------------------------------------------------------------------------

def _hf_modules(model) -> dict[str, str]:
    """``{our module path: HF module name}`` of the model's Einsum kernels (from its parameter table)."""
    from jaxalign.models import params

    cfg = model.cfg
    if cfg.model_type not in PEFT_FAMILIES:
        raise ModelError(f"PEFT adapters are supported for {', '.join(PEFT_FAMILIES)}; {cfg.model_type} "
                         "has fused or differently laid-out linear weights")
    out = {}
    for path in (_path(p) for p, m in nnx.iter_graph(model) if isinstance(m, base.Einsum)):
        for rule in params.TABLES[cfg.model_type].rules:
            m = rule.ours_regex().match(path + ".kernel")
            if m and len(rule.ours) == 1 and rule.hf.endswith(".weight"):
                out[path] = rule.hf.replace("{i}", m.group("i") or "")[: -len(".weight")]
    return out


def _target_modules(hf_names: list[str], all_hf: dict[str, str]) -> list[str] | str:
    """PEFT ``target_modules``: leaf names when every layer's module of that name is adapted, else a
    regex of the full module names (PEFT matches a string in full)."""
    leaves = sorted({n.rsplit(".", 1)[1] for n in hf_names})
    if set(hf_names) == {n for n in all_hf.values() if n.rsplit(".", 1)[1] in leaves}:
        return leaves
    return "(" + "|".join(re.escape(n) for n in sorted(hf_names)) + ")"


def save_peft(model: nnx.Module, path: str | Path, *, base_model: str | None = None) -> Path:
    """Writes the adapters of ``model`` as a PEFT LoRA folder (``adapter_config.json`` and
    ``adapter_model.safetensors``, float32) that ``peft.PeftModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    layers = adapted_layers(model)
    if not layers:
        raise ModelError("the model has no LoRA adapters to save")
    hf = _hf_modules(model)
    tensors, settings = {}, set()
    for path_, layer in layers.items():
        lo = layer.lora
        a = np.asarray(jax.device_get(lo.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(lo.lora_b[...]), np.float32)
        r = a.shape[-1]
        key = f"base_model.model.{hf[path_]}"
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)  # [r, in]
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)  # [out, r]
        settings.add((r, lo.scale))
    if len(settings) > 1:
        raise ModelError(f"the adapters have different ranks or scales {sorted(settings)}; PEFT's "
                         "rank_pattern is not written")
    (r, scale), = settings
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": scale * r,
              "use_rslora": False, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": _target_modules([hf[p] for p in layers], hf), "base_model_name_or_path":
              base_model, "inference_mode": True, "init_lora_weights": True, "use_dora": False,
              "modules_to_save": None}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_peft_config(path: str | Path) -> tuple[dict, LoRASettings]:
    """``(adapter_config.json, settings)`` of a PEFT LoRA folder; ``ModelError`` naming what is refused."""
    p = Path(path)
    f = p / "adapter_config.json"
    if not f.is_file():
        raise ModelError(f"{p}: no adapter_config.json (not a PEFT adapter folder)")
    c = json.loads(f.read_text())
    refused = {"peft_type": c.get("peft_type", "LORA") != "LORA", "use_dora": bool(c.get("use_dora")),
               "fan_in_fan_out": bool(c.get("fan_in_fan_out")), "bias": c.get("bias", "none") != "none",
               "modules_to_save": bool(c.get("modules_to_save")), "rank_pattern": bool(c.get("rank_pattern")),
               "alpha_pattern": bool(c.get("alpha_pattern")), "layers_to_transform":
               c.get("layers_to_transform") is not None}
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise ModelError(f"{f}: {bad[0]}={c.get(bad[0])!r} is not supported (plain LoRA only)")
    settings = LoRASettings(target=None, r=int(c["r"]), alpha=float(c["lora_alpha"]),
                            rslora=bool(c.get("use_rslora", False)))
    return c, settings


def load_peft(model: nnx.Module, path: str | Path, *, mesh=None) -> nnx.Module:
    """Adds the adapters of the PEFT LoRA folder ``path`` to ``model`` (in place) and returns it.

    Every tensor must map to one of the model's linear layers with the right shape (one ``ModelError``
    lists what does not)."""
    from safetensors.numpy import load_file

    p = Path(path)
    _, settings = read_peft_config(p)
    f = p / "adapter_model.safetensors"
    if not f.is_file():
        raise ModelError(f"{p}: no adapter_model.safetensors")
    tensors = load_file(str(f))
    ours = {v: k for k, v in _hf_modules(model).items()}
    found: dict[str, dict[str, np.ndarray]] = {}
    errors = []
    for key, value in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m or m.group(1) not in ours:
            errors.append(f"{key}: no linear layer of the model takes it")
            continue
        found.setdefault(ours[m.group(1)], {})[m.group(2)] = value
    if not found:
        raise ModelError(f"{f}: no LoRA tensor maps to a linear layer of the model; " + "; ".join(errors[:3]))
    apply(model, dataclasses.replace(settings, target="(" + "|".join(re.escape(k) for k in found) + ")"))
    layers = adapted_layers(model)
    for path_, pair in found.items():
        lo = layers[path_].lora
        if set(pair) != {"A", "B"}:
            errors.append(f"{path_}: lora_A or lora_B missing")
            continue
        a_shape, b_shape = lo.lora_a.shape, lo.lora_b.shape
        r = a_shape[-1]
        a, b = pair["A"], pair["B"]
        if a.shape != (r, math.prod(a_shape[:-1])) or b.shape != (math.prod(b_shape[1:]), r):
            errors.append(f"{path_}: lora_A {a.shape} / lora_B {b.shape} do not fit rank {r} and the layer")
            continue
        lo.lora_a.set_value(jnp.asarray(a.astype(np.float32).T.reshape(a_shape)))
        lo.lora_b.set_value(jnp.asarray(b.astype(np.float32).T.reshape(b_shape)))
    if errors:
        raise ModelError(f"{f}: " + "; ".join(errors[:10]) + (f" (+{len(errors) - 10} more)" if len(errors) > 10
                                                             else ""))
    if mesh is not None:
        state = nnx.state(model, LoRAParam)
        nnx.update(model, jax.device_put(state, parallel.state_shardings(state, mesh)))
    return model


def load_adapter(model: nnx.Module, path: str | Path | None, *, option: str = "--adapter", mesh=None
                 ) -> nnx.Module:
    """:func:`load_peft` for a job's ``--adapter PATH`` option (``None``: the model unchanged); a bad
    folder is a ``ConfigError`` naming the option."""
    if path is None:
        return model
    try:
        return load_peft(model, path, mesh=mesh)
    except ModelError as err:
        raise ConfigError(f"{option} {path}: {err}") from None


def adapter_names(model: nnx.Module, name_of) -> frozenset[str]:
    """Names (``name_of(path)``, a pytree path of ``nnx.state``) of the model's :class:`LoRAParam` leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(nnx.state(model, LoRAParam))
    return frozenset(name_of(p) for p, _ in flat)
