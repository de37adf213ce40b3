"""The whole panoptic chain learns: overfitting two real Kumar crops reaches AJI > 0.7.

Two centre 96 x 96 crops of ``monuseg_kumar`` train images (6 and 10 nuclei), a narrow model,
all seven losses of Eq. 4, Adam, 50 steps; then the real inference graph and post-processing,
scored against the ground truth with AJI (definition: Kumar et al. 2017,
:func:`kerasnuc.metrics.aji`). An untrained model scores below 0.3; 0.7 needs most nuclei found
and outlined.
The bigger version is ``benchmarks/panoptic_overfit.py`` (256 crops: AJI 0.93 at step 250).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.data.dataset import Dataset
from kerasnuc.data.targets import panoptic_targets
from kerasnuc.metrics import aji
from kerasnuc.models.maps import predict_maps
from kerasnuc.models.panoptic.model import PanopticModelConfig, build_panoptic
from kerasnuc.postprocess.panoptic import postprocess_panoptic

NARROW = PanopticModelConfig(
    encoder="tiny",
    tiny_widths=(16, 32, 48, 64),
    fpn_filters=32,
    box_fc_units=128,
    mask_conv_filters=32,
    mask_fc_filters=16,
    mask_up_filters=32,
    rpn_batch=128,
    rpn_pre_nms=400,
    rpn_post_nms=200,
    rpn_pre_nms_test=400,
    rpn_post_nms_test=200,
    roi_batch=64,
    max_mask_rois=32,
    max_detections=100,
    seed=0,
)


@pytest.mark.slow
def test_overfit_two_kumar_crops(shared_data):
    ds = Dataset(shared_data / "monuseg_kumar")
    images, instances = [], []
    for image_id in ds.split("train")[:2]:
        s = ds.sample(image_id)
        h, w = s.instances.shape
        y0, x0 = (h - 96) // 2, (w - 96) // 2
        images.append(s.image[y0 : y0 + 96, x0 : x0 + 96])
        instances.append(s.instances[y0 : y0 + 96, x0 : x0 + 96])
    images = np.stack(images)
    targets = panoptic_targets(np.stack(instances), 64)
    assert [int((c > 0).sum()) for c in targets["classes"]] == [6, 10]

    keras.utils.set_random_seed(0)
    model = build_panoptic(NARROW)
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    x = images.astype(np.float32) / 255.0
    before = [aji(t, postprocess_panoptic(predict_maps(model, im)).instances)
              for im, t in zip(images, targets["instances"], strict=True)]  # fmt: skip
    model.fit(x, targets, batch_size=2, epochs=50, verbose=0, shuffle=False)
    after = [aji(t, postprocess_panoptic(predict_maps(model, im)).instances)
             for im, t in zip(images, targets["instances"], strict=True)]  # fmt: skip
    assert np.mean(before) < 0.3
    assert np.mean(after) > 0.7, (before, after)
