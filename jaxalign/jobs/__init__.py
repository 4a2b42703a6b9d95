"""One module per command: the jobs the CLI runs.

``ches``, ``entangle``, ``probe``, ``displacement``, ``filter``, ``select``, ``sample`` (with its judges,
:mod:`jaxalign.jobs.judges`), ``plot`` and ``plan``; what
they share (the model, the pairs, the one batch loop, the fingerprint's parts) is :mod:`jaxalign.jobs.common`
and how their settings become CLI options is :mod:`jaxalign.jobs.options`. Jobs sit above ``train/`` and
``analysis/`` (they may import both); ``analysis/`` is the maths, with no file I/O.
"""
