"""The TiC matrix heatmap is sized from its content: with 2 steps the title is not cut (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from curate.evaluate.matrix import plot_matrix


@pytest.mark.parametrize("n", [1, 2, 7])
def test_title_and_labels_fit_inside_the_png(tmp_path, n):
    steps = [str(2014 + i) for i in range(n)]
    result = {"matrix": np.eye(n).tolist(), "steps": steps, "kind": "retrieval", "id": 0.123456,
              "backward": 0.654321, "forward": None}
    out = plot_matrix(result, tmp_path / "m.png")
    img = np.asarray(Image.open(out).convert("L"), dtype=np.int32)
    h, w = img.shape
    assert w >= 400 and h >= 350  # the old 2-step figure was 288 x 240 with its title cut
    # nothing drawn touches the image border: a cut title or label would (white is 255)
    border = np.concatenate([img[:4].ravel(), img[-4:].ravel(), img[:, :4].ravel(), img[:, -4:].ravel()])
    assert border.min() > 240
    # the title is there: dark pixels in the top band
    assert (img[: h // 10] < 128).any()
