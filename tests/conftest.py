"""Fixtures: the tiny models, the recipe on them, and adapters standing in for finished stages. What tests import
(the recipe builder, datasets, helpers) is in tests/helpers.py, with what LORA_RLHF_TEST_DEVICE switches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import TEST_DEVICE, build_tiny_model, make_adapters, recipe_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory) -> Path:
    """A base of another shape: adapters trained on `tiny_model_dir` must be refused on it."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-wide"), hidden_size=96, intermediate_size=192,
                            num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def stage_adapters(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """OUT/sft and OUT/reward as steps 1 and 2 leave them (helpers.make_adapters), for the tests that only read them."""
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("stages"))


@pytest.fixture
def tiny_recipe(tiny_model_dir, tmp_path):
    """helpers.recipe_dict on the tiny model, writing to tmp_path/run; tests add data and stage sections."""

    def make(quantization: str = "4bit", **sections) -> dict:
        return recipe_dict(tiny_model_dir, sections.pop("output_dir", tmp_path / "run"), quantization, **sections)

    return make


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        for name, skipped in (("cpu_only", TEST_DEVICE != "cpu"), ("cuda_only", TEST_DEVICE != "cuda")):
            marker = item.get_closest_marker(name)
            if marker is not None and skipped:
                reason = marker.args[0] if marker.args else name
                item.add_marker(pytest.mark.skip(reason=f"{name} (LORA_RLHF_TEST_DEVICE={TEST_DEVICE}): {reason}"))
