"""Capture of post-RoPE q/k: one forward of a tiny random Llama, and the on-disk cache of captures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_attn.evaluation.capture import capture_layers, load_or_capture


def test_capture_cache_round_trip(tiny_llama, tmp_path):
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    direct = capture_layers(tiny_llama, ids, [1], progress=False)
    first, seconds = load_or_capture(tiny_llama, ids, [0, 1], tmp_path, "tiny", progress=False)
    assert seconds is not None and first.q[1].shape == (4, 64, 16) and first.k[0].shape == (2, 64, 16)
    np.testing.assert_allclose(first.q[1], direct.q[1], rtol=1e-5, atol=1e-6)
    again, seconds = load_or_capture(None, ids[:, :40], [0, 1], tmp_path, "tiny", progress=False)  # a cached prefix
    assert seconds is None
    np.testing.assert_array_equal(again.k[1], first.k[1][:, :40])
    assert again.scale == pytest.approx(16**-0.5)
    with pytest.raises(ValueError, match="not cached"):
        load_or_capture(None, ids.flip(1), [0], tmp_path, "tiny", progress=False)  # other tokens: no match
