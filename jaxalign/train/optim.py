"""Optimisers and learning-rate schedules (optax), configured by :class:`config.OptimConfig`.

* ``adamw`` — ``optax.adamw``: decoupled weight decay, as ``torch.optim.AdamW`` (TRL's default).
* ``sgd`` — plain SGD (optional heavy-ball momentum, L2 weight decay added to the gradient as torch).
* ``rmsprop`` — ``torch.optim.RMSprop`` exactly, as Razin et al. trained (PAPERS §1.5, §5.5)::

      v ← α·v + (1 − α)·g²            (v₀ = 0, α = ``decay`` = 0.99)
      θ ← θ − lr · g / (√v + ε)       (ε = 1e-8 added *outside* the square root)

  ``optax.rmsprop``'s defaults differ (decay 0.9, ε inside the root); this builds the torch form from
  ``optax.scale_by_rms(eps_in_sqrt=False)`` and is tested against ``torch.optim.RMSprop``.

The schedule follows Hugging Face's: linear warmup from 0 over ``warmup_steps`` (the first step has
lr 0 when warming up), then constant, linear decay to 0 at the last step, or cosine decay to 0.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from jaxalign.train.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps:
        return cfg.warmup_steps
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the number of updates already applied (0 at the first step)."""
    lr, warm, total = cfg.lr, warmup_steps(cfg, total_steps), max(total_steps, 1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        if cfg.schedule == "constant":
            after = jnp.asarray(lr, jnp.float32)
        else:
            progress = jnp.clip((step - warm) / max(1, total - warm), 0.0, 1.0)
            if cfg.schedule == "linear":
                after = lr * (1.0 - progress)
            else:
                after = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        if warm == 0:
            return after
        return jnp.where(step < warm, lr * step / warm, after)

    return schedule


def torch_rmsprop(learning_rate, decay: float = 0.99, eps: float = 1e-8, momentum: float = 0.0,
                  weight_decay: float = 0.0) -> optax.GradientTransformation:
    """``torch.optim.RMSprop(lr, alpha=decay, eps, momentum, weight_decay)`` (not centred)."""
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))  # torch: g ← g + wd·θ
    parts.append(optax.scale_by_rms(decay=decay, eps=eps, initial_scale=0.0, eps_in_sqrt=False))
    if momentum:
        parts.append(optax.trace(decay=momentum))  # torch: b ← μ·b + g/(√v+ε); θ ← θ − lr·b
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimiser of ``cfg`` (with global-norm clipping first when ``max_grad_norm`` is set)."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "sgd":
        parts = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None))
        opt = optax.chain(*parts)
    elif cfg.name == "rmsprop":
        opt = torch_rmsprop(schedule, decay=cfg.decay, eps=cfg.eps, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
    else:  # config validation makes this unreachable
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    if cfg.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return opt
