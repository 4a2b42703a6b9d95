"""jaxalign: margin-based preference optimisation in JAX and the diagnostics of how it fails.

Public API (each documented in its module):

* :mod:`jaxalign.losses` — every DPO-family loss as a pure per-example function; ``compute``,
  ``margin_weights``, ``NAMES``.
* :mod:`jaxalign.logprobs` — token and sequence log-probs, response masks (the sequence convention).
* :mod:`jaxalign.errors` — the ``JaxAlignError`` hierarchy.
"""

__version__ = "0.1.0"

from jaxalign.errors import JaxAlignError  # noqa: E402,F401
