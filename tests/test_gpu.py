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


def test_cuda_staging_in_overlapped_chunks_equals_the_host_normalisation() -> None:
    from livestain.inference.normalize import PercentileNorm
    from livestain.inference.staging import InputStaging

    stack = np.random.default_rng(1).integers(0, 65535, (21, 96, 80)).astype(np.uint16)
    staging = InputStaging("cuda", PercentileNorm(), chunk_bytes=3 * stack[0].nbytes)  # 7 chunks
    first = staging(stack)
    assert first.device.type == "cuda" and staging._buffers["pinned"].is_pinned()
    np.testing.assert_array_equal(first[0, 0].cpu().numpy(), PercentileNorm()(stack))
    again = staging(stack[::-1].copy())  # same buffers, new content
    np.testing.assert_array_equal(again[0, 0].cpu().numpy(), PercentileNorm()(stack[::-1]))
