"""The demo model for the vLLM tests: prepared once (``kvmesh model prepare``'s checkpoint), shared by every module."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmesh.demo.model import default_model_dir, prepare_demo_model


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return prepare_demo_model(default_model_dir())


@pytest.fixture(scope="session")
def model(demo_model: Path) -> str:
    """The model a module's engines serve: the demo model, unless the module names another."""
    return str(demo_model)
