"""Every recipe in recipes/ validates and opens with the command that runs it, so none can rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_rlhf.recipe.config import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates_and_opens_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run:  lora-rlhf ") and path.name in first, first
    load_recipe(path)  # raises RecipeError listing every problem
