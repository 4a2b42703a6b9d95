"""The DPO-family trainer (see docs/training.md).

* :func:`jaxalign.train.loop.train` — one run from a :class:`jaxalign.train.config.RunConfig`.
* :mod:`jaxalign.train.config` — ``load(path, overrides)``, ``from_dict``, the typed sections.
* :mod:`jaxalign.train.step` — ``train_step`` (pure, jitted with shardings), ``loss_fn``, ``pair_logps``.
* :mod:`jaxalign.train.optim` — ``make_optimizer`` (adamw, sgd, torch-exact rmsprop), ``make_schedule``.
* :mod:`jaxalign.train.checkpoint`, :mod:`jaxalign.train.ledger`, :mod:`jaxalign.train.ref_cache`.

Modules are imported on use (``from jaxalign.train import loop``) so that importing the package is cheap.
"""
