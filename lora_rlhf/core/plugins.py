"""User code named in a recipe as `module:function` (programmatic labelers, reward functions)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_rlhf.errors import RecipeError


def load_callable(spec: str, what: str = "function") -> Callable[..., Any]:
    """'pkg.module:function' or 'path/to/file.py:function' -> the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RecipeError([f"{what} '{spec}' must look like 'module:function' or 'file.py:function'"])
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise FileNotFoundError(path)
            spec_obj = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[path.stem] = module
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as e:
        raise RecipeError([f"{what} '{spec}': cannot import '{module_name}' ({e}); check the name and that it "
                           "is importable from the working directory"]) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RecipeError([f"{what} '{spec}': '{module_name}' has no function '{attr}'"])
    return fn
