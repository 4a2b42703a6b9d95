"""The DPO-family trainer (see docs/training.md).

* :func:`jaxalign.train.loop.train` — one run from a :class:`jaxalign.train.config.RunConfig`;
  :func:`jaxalign.train.loop.train_loaded` — one run on a model already in memory (fixed shapes, one
  compilation for many pair sets); :func:`jaxalign.train.loop.setup` builds the ``Run`` the loop needs.
* :mod:`jaxalign.train.config` — ``load(path, overrides)``, ``from_dict``, the typed sections.
* :mod:`jaxalign.train.step` — ``Objective``, ``weighted_objective``, ``train_step`` (pure, jitted with
  shardings), ``loss_fn``, ``pair_logps``.
* :mod:`jaxalign.train.measure` — reference log-probs, probe, ledger rows, eval and entanglement metrics.
* :mod:`jaxalign.train.optim` — ``make_optimizer`` (adamw, sgd, torch-exact rmsprop), ``make_schedule``.
* :mod:`jaxalign.train.telemetry` — the per-pair table (``read_table``), the displacement alarm and
  ``train.stop_on_displacement``.
* :mod:`jaxalign.train.checkpoint` (``Checkpointer``, ``Checkpointer.reader`` read-only),
  :mod:`jaxalign.train.ledger`, :mod:`jaxalign.train.ref_cache`.

Modules are imported on use (``from jaxalign.train import loop``) so that importing the package is cheap.
"""
