"""Input staging: normalised stacks on the device from reused buffers, exactly as the
host normalisation computes them (the CUDA path is in tests/test_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest

from livestain.inference.checkpoint import bundled_model_path, load_checkpoint
from livestain.inference.normalize import PercentileNorm, integer_percentiles
from livestain.inference.predict import Predictor
from livestain.inference.staging import InputStaging


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
def test_chunked_staging_is_bit_identical_to_percentile_norm(dtype) -> None:
    rng = np.random.default_rng(0)
    top = 255 if dtype == np.uint8 else 65535
    stack = rng.integers(0, top, (17, 40, 48)).astype(dtype)  # uint16 values above 32767 too
    staging = InputStaging("cpu", PercentileNorm(), chunk_bytes=3 * stack[0].nbytes)  # 6 chunks
    out = staging(stack)
    assert out.shape == (1, 1, 17, 40, 48)
    np.testing.assert_array_equal(out[0, 0].numpy(), PercentileNorm()(stack))


def test_buffers_are_reused_for_same_shaped_stacks_and_read_only_input_is_fine() -> None:
    rng = np.random.default_rng(1)
    staging = InputStaging("cpu", PercentileNorm())
    a = rng.integers(0, 4000, (8, 32, 32)).astype(np.uint16)
    b = rng.integers(0, 4000, (8, 32, 32)).astype(np.uint16)
    b.flags.writeable = False  # as a ZeroMQ frame or a shared segment arrives
    first = staging(a).data_ptr()
    out_b = staging(b)
    assert out_b.data_ptr() == first  # no new allocation per stack
    np.testing.assert_array_equal(out_b[0, 0].numpy(), PercentileNorm()(b))
    assert staging(a[:4]).shape == (1, 1, 4, 32, 32)  # a new shape gets a new buffer
    with pytest.raises(ValueError, match="z, y, x"):
        staging(a[0])


def test_prediction_written_into_a_callers_array_equals_the_returned_one() -> None:
    predictor = Predictor(load_checkpoint(bundled_model_path()), "cpu", fast=True)
    stack = np.random.default_rng(2).integers(2900, 3300, (8, 64, 64)).astype(np.uint16)
    expected = predictor.predict(stack)
    out = np.full((3, 8, 64, 64), np.nan, np.float32)
    assert predictor.predict(stack, out=out) is out
    np.testing.assert_array_equal(out, expected)
    assert set(predictor.last_timing) == {"preprocess_s", "network_s", "postprocess_s"}
    with pytest.raises(ValueError, match="out must be float32"):
        predictor.predict(stack, out=np.zeros((3, 8, 64, 32), np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_histogram_percentiles_equal_numpys(dtype) -> None:
    rng = np.random.default_rng(3)
    top = np.iinfo(dtype).max
    cases = [rng.integers(0, top, n).astype(dtype) for n in (1, 2, 7, 1000, 4099)]
    cases += [np.full(50, 9, dtype), rng.normal(100, 2, 3000).clip(0, top).astype(dtype)]
    qs = (0.0, 0.5, 12.345, 50.0, 99.5, 100.0)
    for values in cases:
        assert integer_percentiles(values, qs) == list(np.percentile(values.astype(np.float64), qs))


def test_signed_16_bit_stacks_stay_signed() -> None:
    stack = np.random.default_rng(4).integers(-500, 500, (6, 16, 16)).astype(np.int16)
    np.testing.assert_array_equal(InputStaging("cpu", PercentileNorm())(stack)[0, 0].numpy(),
                                  PercentileNorm()(stack))


def test_staging_first_used_under_inference_mode_still_works_outside_it() -> None:
    import torch

    staging = InputStaging("cpu", PercentileNorm())
    stack = np.random.default_rng(5).integers(0, 4000, (4, 16, 16)).astype(np.uint16)
    with torch.inference_mode():
        staging(stack)
    np.testing.assert_array_equal(staging(stack)[0, 0].numpy(), PercentileNorm()(stack))
