"""On a CUDA GPU: the same predictions as on the CPU (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livestain.inference.checkpoint import bundled_model_path, load_checkpoint
from livestain.inference.predict import Predictor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _stack() -> np.ndarray:
    return np.random.default_rng(0).integers(2900, 3300, (16, 128, 128)).astype(np.uint16)


def test_cuda_prediction_matches_cpu() -> None:
    cpu = Predictor(load_checkpoint(bundled_model_path(), "cpu"), "cpu").predict(_stack())
    gpu = Predictor(load_checkpoint(bundled_model_path(), "cuda"), "cuda").predict(_stack())
    np.testing.assert_allclose(gpu, cpu, atol=1e-3 * float(np.abs(cpu).max()))


def test_cuda_fast_path_stays_close_to_fp32() -> None:
    exact = Predictor(load_checkpoint(bundled_model_path(), "cuda"), "cuda").predict(_stack())
    fast = Predictor(load_checkpoint(bundled_model_path(), "cuda"), "cuda", fast=True).predict(_stack())
    assert np.abs(fast - exact).max() < 0.05 * np.abs(exact).max()
