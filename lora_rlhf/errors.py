"""One exception family for everything a user can get wrong.

Each message says what is wrong, why it matters and how to fix it; the CLI prints it and exits non-zero.
"""

from __future__ import annotations


class LoraRlhfError(Exception):
    """A problem the user can fix (bad recipe, bad data, missing model...)."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if fix is None else f"{what}\n  fix: {fix}")


class RecipeError(LoraRlhfError):
    """The recipe YAML or a --set override is invalid. Holds every problem found, not only the first."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}:\n{lines}")


class DataError(LoraRlhfError):
    """A dataset is missing, empty, or lacks the columns its stage needs."""


class ModelError(LoraRlhfError):
    """A model or adapter cannot be found, loaded, or does not belong to the loaded base."""


class StorageError(LoraRlhfError):
    """The disk refused a write (full, over quota): the stage stopped and says what it left behind."""
