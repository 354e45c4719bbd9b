"""kvmesh's vLLM plugin (entry point ``vllm.general_plugins``): the ``kvmesh`` load format.

vLLM loads general plugins in every one of its processes, with or without kvmesh's connector, so this does
nothing but register a load format; the loader is vLLM's default one that also remembers the model it built
(``blend_model.remember_model``), for blending.
"""

from __future__ import annotations

from typing import Any

_registered = False


def register() -> None:
    """Register the ``kvmesh`` load format (once per process)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from kvmesh.integrations.vllm.blend_model import LOAD_FORMAT, remember_model

    class KVMeshModelLoader(DefaultModelLoader):
        """vLLM's default loader (weights found as for ``--load-format auto``), remembering the model it built."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.load_config = _as_auto(load_config)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
            model = super().load_model(vllm_config, model_config, prefix)
            remember_model(model)
            return model

    register_model_loader(LOAD_FORMAT)(KVMeshModelLoader)
    _registered = True


def _as_auto(load_config: Any) -> Any:
    """The same load config with format ``auto``: the default loader picks weight files by the format's name."""
    import copy

    auto = copy.copy(load_config)
    object.__setattr__(auto, "load_format", "auto")
    return auto
