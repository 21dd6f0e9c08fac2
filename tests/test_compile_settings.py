"""torch.compile's settings without compiling (a 2-core CPU cannot compile SDXL in a test's time): where
inductor keeps its caches, and which tuning each compile mode turns on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch._inductor.config as inductor_config
from torch._inductor.runtime.cache_dir_utils import cache_dir

import imagen.generation.diffusers.engine  # noqa: F401  (imports diffusers, which asks inductor for its folder)
from imagen.generation.diffusers import acceleration


def test_inductor_writes_its_caches_under_the_compile_cache_dir_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])  # put back after the test
        else:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", inductor_config.fx_graph_cache)
    cache_dir()  # what importing diffusers does: inductor settles on its default folder first
    assert Path(cache_dir()) != tmp_path / "inductor"
    acceleration.configure_compile_cache(tmp_path)
    assert Path(cache_dir()) == tmp_path / "inductor"
    assert inductor_config.fx_graph_cache is True


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_the_quick_compile_modes_leave_out_coordinate_descent_tuning(mode: str) -> None:
    settings = acceleration.inductor_settings(mode)
    assert settings["coordinate_descent_tuning"] is False
    assert settings["coordinate_descent_check_all_directions"] is False
    assert settings["conv_1x1_as_mm"] is True and settings["epilogue_fusion"] is False


@pytest.mark.parametrize("mode", ["max-autotune", "max-autotune-no-cudagraphs"])
def test_the_max_autotune_modes_search_block_sizes(mode: str) -> None:
    settings = acceleration.inductor_settings(mode)
    assert settings["coordinate_descent_tuning"] is True
    assert settings["coordinate_descent_check_all_directions"] is True
    assert all(hasattr(inductor_config, name) for name in settings)
