"""The ``panoptic`` model: Mask R-CNN + GCN semantic branch + feature fusion (Liu et al. 2019).

:class:`PanopticModel` owns every part (Figure 2 of the paper):

* backbone + FPN (:mod:`.backbone`), RPN (:class:`~.heads.RPNHead`) over ``P2 .. P6`` with the
  anchors of :mod:`.anchors`, proposals by NMS (:mod:`.nms`), ROI Align (:mod:`.roi_align`),
  box head and dual-modal mask generator (:mod:`.heads`);
* the feature fusion ``F_0 -> F_N`` (:mod:`.fusion`) and the GCN semantic branch (:mod:`.gcn`).

Training (:meth:`PanopticModel.train_step` via :meth:`PanopticModel.compute_loss`) computes the
seven terms of Eq. 4, summed without weights, each reported in the logs/history under its own
name (:data:`LOSS_NAMES`): RPN objectness CE and smooth-L1, detection CE and smooth-L1, mask
BCE, and the two semantic CEs (GCN branch ``semseg1``, fused map ``semseg2``). Targets come
from :func:`kerasnuc.data.pipeline.panoptic_dataset`.

Inference (``model(images)``, instance branch only; the GCN map is returned as an extra output):

* ``"boxes"``: ``(B, 1, 4, N)`` float32 ``(y1, x1, y2, x2)`` in input pixels;
* ``"scores"``: ``(B, 1, 1, N)`` float32 nucleus probability, ``0`` for empty slots;
* ``"classes"``: ``(B, 1, 1, N)`` float32 class index ``1 .. C`` (0 for empty slots);
* ``"masks"``: ``(B, 28, 28, N)`` float32 mask probabilities in the frame of each box;
* ``"semantic"``: ``(B, H, W, 2)`` softmax of the GCN branch (background, nucleus).

``N = max_detections`` slots sorted by decreasing score. The detection index is the **last**
axis so that the dense-map cropping of :func:`kerasnuc.models.maps.predict_maps_batch` and
of the SavedModel signatures (which cut axes 1 and 2 to the image size) leaves the detections
intact for images of at least 28 x 28 pixels; :func:`kerasnuc.postprocess.panoptic.
postprocess_panoptic` turns them into an instance map.

Choices where the paper is silent (all in :class:`PanopticModelConfig`): class-agnostic box
deltas and NMS; in training the mask head runs on (at most ``max_mask_rois``) positive ROIs;
the fused map ``F_N`` pastes those masks at their predicted boxes (box-head deltas decoded on
the ROI) in order of predicted nucleus probability; semantic targets are background /
nucleus.

One cohesive concept: the model class with its training step, which wires the heads of
:mod:`.heads`, :mod:`.gcn` and :mod:`.fusion` together and must stay in one place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import keras
from keras import ops

from kerasnuc.backbones.efficientnet_lite import FEATURE_KINDS
from kerasnuc.config import strict_from_dict
from kerasnuc.models.panoptic import losses as panoptic_losses
from kerasnuc.models.panoptic.anchors import AnchorConfig, anchors_per_location, generate_anchors
from kerasnuc.models.panoptic.backbone import (
    ENCODER_NAMES,
    FeaturePyramid,
    build_panoptic_encoder,
)
from kerasnuc.models.panoptic.boxes import clip_boxes, decode_boxes
from kerasnuc.models.panoptic.fusion import FeatureFusion
from kerasnuc.models.panoptic.gcn import GCNDecoder
from kerasnuc.models.panoptic.heads import BoxHead, DualModalMaskGenerator, RPNHead
from kerasnuc.models.panoptic.nms import batched_nms
from kerasnuc.models.panoptic.roi_align import MultiLevelROIAlign
from kerasnuc.models.panoptic.sampling import (
    ROI_BOX_WEIGHTS,
    mask_targets,
    rpn_targets,
    sample_proposals,
)

logger = logging.getLogger(__name__)

#: The seven loss terms of Eq. 4, in the paper's order (history/log keys).
LOSS_NAMES: tuple[str, ...] = (
    "rpn_obj_loss",
    "rpn_reg_loss",
    "det_cls_loss",
    "det_reg_loss",
    "det_mask_loss",
    "semseg1_loss",
    "semseg2_loss",
)

#: Sampling statistics logged beside the losses (mean per image over the epoch): positive anchors
#: of the RPN batch and positive ROIs of the box-head batch. The ROI losses depend on them (more
#: positives = harder negatives and more box targets), so they explain the loss curves.
STAT_NAMES: tuple[str, ...] = ("rpn_positives", "roi_positives")

#: Inference output names.
OUTPUT_NAMES: tuple[str, ...] = ("boxes", "scores", "classes", "masks", "semantic")


def _pos_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")


def _unit(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a float in [0, 1]. Received: {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class PanopticModelConfig:
    """Architecture and detection settings of a panoptic model; saved as JSON with the weights.

    Attributes:
        encoder: ``"resnet101"`` (paper), ``"resnet50"``, ``"efficientnet_lite0"`` (ImageNet
            weights offline, CPU recipes) or ``"tiny"`` (GroupNorm, tests/CPU).
        encoder_weights: local ImageNet ``*_notop.h5`` of the ResNet, ``"imagenet"`` for
            EfficientNet-Lite0, or None.
        tiny_widths: stage widths of the ``"tiny"`` encoder.
        encoder_freeze_levels: the encoder is not trained up to level ``P_k`` (0: all of it
            is trained; see :func:`~kerasnuc.models.panoptic.backbone.build_panoptic_encoder`).
        encoder_features: EfficientNet-Lite0 only: ``"blocks"`` (the blocks' linear outputs)
            or ``"expand"`` (the batch-normalised ReLU6 activations, which the FPN expects; see
            :func:`~kerasnuc.models.panoptic.backbone.build_panoptic_encoder`).
        num_classes: object classes ``C`` (1 for class-agnostic nuclei).
        fpn_filters: FPN channels (paper 256); also the RPN conv width.
        anchors: :class:`~kerasnuc.models.panoptic.anchors.AnchorConfig` as a dict.
        box_fc_units: width of the two FC layers of the box head (1024).
        mask_conv_filters, mask_fc_filters, mask_up_filters: widths of the mask generator
            (Table 1: 256, 128, 256).
        box_roi_size, mask_roi_size: ROI Align output sides (7; Table 1: 14).
        roi_sampling_ratio: ROI Align samples per bin and axis.
        gcn_kernel_size: large kernel ``k`` of the GCN branch (paper: 5).
        rpn_batch, rpn_positive_fraction, rpn_pos_iou, rpn_neg_iou: RPN anchor sampling.
        rpn_pre_nms, rpn_post_nms: proposals before / after the RPN NMS (per image, training).
        rpn_pre_nms_test, rpn_post_nms_test: the same at inference.
        rpn_nms_iou: IoU threshold of the RPN NMS.
        roi_batch, roi_positive_fraction, roi_fg_iou: ROI sampling of the box/mask heads.
        max_mask_rois: positive ROIs per image trained by the mask head and fused into ``F_N``.
        max_detections: detection slots per image at inference (nuclei-dense: hundreds per
            512 x 512 tile).
        detection_nms_iou: IoU threshold of the final class-agnostic NMS.
        detection_score_threshold: minimum nucleus probability of a detection.
        seed: seed of the anchor / ROI sampling.
    """

    encoder: str = "resnet101"
    encoder_weights: str | None = None
    tiny_widths: tuple[int, ...] = (16, 32, 64, 128)
    encoder_freeze_levels: int = 0
    encoder_features: str = "blocks"
    num_classes: int = 1
    fpn_filters: int = 256
    anchors: dict[str, Any] = dataclasses.field(default_factory=lambda: AnchorConfig().to_dict())
    box_fc_units: int = 1024
    mask_conv_filters: int = 256
    mask_fc_filters: int = 128
    mask_up_filters: int = 256
    box_roi_size: int = 7
    mask_roi_size: int = 14
    roi_sampling_ratio: int = 2
    gcn_kernel_size: int = 5
    rpn_batch: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pos_iou: float = 0.7
    rpn_neg_iou: float = 0.3
    rpn_pre_nms: int = 2000
    rpn_post_nms: int = 1000
    rpn_pre_nms_test: int = 2000
    rpn_post_nms_test: int = 1000
    rpn_nms_iou: float = 0.7
    roi_batch: int = 512
    roi_positive_fraction: float = 0.25
    roi_fg_iou: float = 0.5
    max_mask_rois: int = 128
    max_detections: int = 400
    detection_nms_iou: float = 0.5
    detection_score_threshold: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.encoder not in ENCODER_NAMES:
            raise ValueError(
                f"`encoder` must be one of {list(ENCODER_NAMES)}. "
                f"Received: encoder={self.encoder!r}"
            )
        object.__setattr__(self, "tiny_widths", tuple(self.tiny_widths))
        if isinstance(self.encoder_freeze_levels, bool) or self.encoder_freeze_levels not in range(
            6
        ):
            raise ValueError(
                "`encoder_freeze_levels` must be an int in 0..5. "
                f"Received: encoder_freeze_levels={self.encoder_freeze_levels!r}"
            )
        if self.encoder_features not in FEATURE_KINDS:
            raise ValueError(
                f"`encoder_features` must be one of {list(FEATURE_KINDS)}. "
                f"Received: encoder_features={self.encoder_features!r}"
            )
        if self.encoder_features != "blocks" and self.encoder != "efficientnet_lite0":
            raise ValueError(
                f"`encoder_features={self.encoder_features!r}` is for encoder "
                f"'efficientnet_lite0'. Received: encoder={self.encoder!r}"
            )
        if self.encoder_weights is not None:
            object.__setattr__(self, "encoder_weights", os.fspath(self.encoder_weights))
        anchors = self.anchors
        if isinstance(anchors, AnchorConfig):
            anchors = anchors.to_dict()
        object.__setattr__(self, "anchors", AnchorConfig.from_dict(dict(anchors)).to_dict())
        for name in (
            "num_classes",
            "fpn_filters",
            "box_fc_units",
            "mask_conv_filters",
            "mask_fc_filters",
            "mask_up_filters",
            "box_roi_size",
            "mask_roi_size",
            "roi_sampling_ratio",
            "gcn_kernel_size",
            "rpn_batch",
            "rpn_pre_nms",
            "rpn_post_nms",
            "rpn_pre_nms_test",
            "rpn_post_nms_test",
            "roi_batch",
            "max_mask_rois",
            "max_detections",
        ):
            _pos_int(name, getattr(self, name))
        for name in (
            "rpn_positive_fraction",
            "rpn_pos_iou",
            "rpn_neg_iou",
            "rpn_nms_iou",
            "roi_positive_fraction",
            "roi_fg_iou",
            "detection_nms_iou",
            "detection_score_threshold",
        ):
            _unit(name, getattr(self, name))
        if self.max_mask_rois > self.roi_batch:
            raise ValueError(
                "`max_mask_rois` must be <= `roi_batch`. "
                f"Received: max_mask_rois={self.max_mask_rois}, roi_batch={self.roi_batch}"
            )
        if AnchorConfig.from_dict(self.anchors).strides != (4, 8, 16, 32, 64):
            raise ValueError(
                "`anchors` must have strides (4, 8, 16, 32, 64) (the FPN levels P2..P6). "
                f"Received: strides={self.anchors['strides']}"
            )

    @property
    def anchor_config(self) -> AnchorConfig:
        return AnchorConfig.from_dict(self.anchors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["tiny_widths"] = list(self.tiny_widths)
        out["anchors"] = dict(self.anchors)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PanopticModelConfig:
        """Inverse of :meth:`to_dict`; missing keys take the defaults.

        Raises:
            ValueError: unknown keys or bad values.
        """
        return strict_from_dict(cls, data)


def _gather_rows(x, index):
    """``x (B, N, ...)`` at ``index (B, M)`` (clamped to ``>= 0``) -> ``(B, M, ...)``."""
    index = ops.maximum(ops.cast(index, "int32"), 0)
    extra = len(x.shape) - 2
    return ops.take_along_axis(x, ops.reshape(index, (*ops.shape(index), *([1] * extra))), axis=1)


def _flat_rois(x):
    """``(B, S, ...)`` -> ``(B * S, ...)``."""
    shape = ops.shape(x)
    return ops.reshape(x, (shape[0] * shape[1], *x.shape[2:]))


@keras.saving.register_keras_serializable(package="kerasnuc")
class PanopticModel(keras.Model):
    """Panoptic nuclei segmentation model (see the module docstring).

    Args:
        config: a :class:`PanopticModelConfig` (or its dict).
        **kwargs: base ``keras.Model`` arguments (``name``).

    Call:
        ``model(images, training=False)`` with ``(B, H, W, 3)`` float32 RGB in ``[0, 1]``,
        ``H, W`` multiples of 32 (may be unknown), returns the inference dict of the module
        docstring. Training uses ``fit`` with the targets of
        :func:`kerasnuc.data.pipeline.panoptic_dataset` and no ``loss`` in ``compile``.
    """

    def __init__(self, config: PanopticModelConfig | dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if config is None:
            config = PanopticModelConfig()
        elif isinstance(config, dict):
            config = PanopticModelConfig.from_dict(config)
        self.config = config
        c = config
        self.encoder = build_panoptic_encoder(
            c.encoder,
            c.encoder_weights,
            c.tiny_widths,
            model_name="encoder",
            freeze_levels=c.encoder_freeze_levels,
            features=c.encoder_features,
        )
        self.fpn = FeaturePyramid(c.fpn_filters, name="fpn")
        self.rpn = RPNHead(anchors_per_location(c.anchor_config), c.fpn_filters, name="rpn")
        self.box_align = MultiLevelROIAlign(
            c.box_roi_size, c.roi_sampling_ratio, name="box_roi_align"
        )
        self.mask_align = MultiLevelROIAlign(
            c.mask_roi_size, c.roi_sampling_ratio, name="mask_roi_align"
        )
        self.box_head = BoxHead(c.num_classes, c.box_fc_units, name="box_head")
        self.mask_head = DualModalMaskGenerator(
            c.mask_conv_filters,
            c.mask_fc_filters,
            c.mask_up_filters,
            c.mask_roi_size,
            name="mask_generator",
        )
        self.fusion = FeatureFusion(2, 4, name="feature_fusion")
        self.gcn = GCNDecoder(2, c.gcn_kernel_size, name="gcn")
        self.sample_seed = keras.random.SeedGenerator(c.seed, name="sample_seed")
        self.loss_trackers = {n: keras.metrics.Mean(name=n) for n in LOSS_NAMES}
        self.stat_trackers = {n: keras.metrics.Mean(name=n) for n in STAT_NAMES}
        self.total_tracker = keras.metrics.Mean(name="loss")

    # ------------------------------------------------------------------------ shared parts

    def _features(self, images, training):
        feats = self.encoder(images, training=training)
        pyramid = self.fpn(feats)
        levels = [pyramid[f"fpn{i}"] for i in range(2, 7)]
        return feats, levels

    def _anchors(self, images, levels):
        shape = ops.shape(images)
        sizes = [(ops.shape(p)[1], ops.shape(p)[2]) for p in levels]
        return generate_anchors(shape[1], shape[2], self.config.anchor_config, sizes)

    def _proposals(self, images, anchors, logits, deltas, pre_nms, post_nms):
        """Top RPN proposals ``(B, P, 4)`` (gradient-stopped) and their validity ``(B, P)``."""
        shape = ops.shape(images)
        boxes = decode_boxes(anchors[None], ops.stop_gradient(deltas))
        boxes = clip_boxes(boxes, shape[1], shape[2])
        scores = ops.stop_gradient(ops.cast(logits, "float32"))
        height = boxes[..., 2] - boxes[..., 0]
        width = boxes[..., 3] - boxes[..., 1]
        scores = ops.where(ops.logical_and(height > 1e-3, width > 1e-3), scores, -1e9)
        idx, _ = batched_nms(
            boxes,
            scores,
            post_nms,
            self.config.rpn_nms_iou,
            score_threshold=-1e8,
            pre_nms_top_k=pre_nms,
        )
        return ops.stop_gradient(_gather_rows(boxes, idx)), idx >= 0

    def _box_outputs(self, levels, rois):
        """Class logits ``(B, S, C + 1)`` and deltas ``(B, S, 4)`` of ROIs ``(B, S, 4)``."""
        feats = self.box_align(levels[:4], rois)
        logits, deltas = self.box_head(_flat_rois(feats))
        batch, n = ops.shape(rois)[0], ops.shape(rois)[1]
        return (
            ops.reshape(logits, (batch, n, self.config.num_classes + 1)),
            ops.reshape(deltas, (batch, n, 4)),
        )

    def _mask_logits(self, levels, rois):
        """Mask logits ``(B, S, 2 s, 2 s, 2)`` of ROIs ``(B, S, 4)``."""
        feats = self.mask_align(levels[:4], rois)
        logits = self.mask_head(_flat_rois(feats))
        batch, n = ops.shape(rois)[0], ops.shape(rois)[1]
        m = 2 * self.config.mask_roi_size
        return ops.reshape(logits, (batch, n, m, m, 2))

    def build(self, input_shape=None):
        """Create every weight by running the network once on a ``64 x 64`` zero image (with
        few proposals: the weights do not depend on the detection settings)."""
        if self.built:
            return
        self._inference(ops.zeros((1, 64, 64, 3)), False, 16, 8, 4)
        self.fusion(ops.zeros((1, 16, 16, self.config.fpn_filters)))  # used in training only
        self.built = True

    # ------------------------------------------------------------------------ inference

    def call(self, images, training=False):
        """Inference outputs (module docstring) of ``(B, H, W, 3)`` images in ``[0, 1]``.

        Called eagerly on the TensorFlow backend (``predict_maps``, validation), the graph runs
        as one ``tf.function`` with dynamic batch, height and width (the NMS loops would be
        Python loops otherwise); inside a traced function (export, ``predict``) it is inlined.
        """
        c = self.config
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if tf.executing_eagerly():
                if getattr(self, "_eager_inference", None) is None:
                    self._eager_inference = tf.function(
                        lambda x: self._inference(
                            x, False, c.rpn_pre_nms_test, c.rpn_post_nms_test, c.max_detections
                        ),
                        input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)],
                        autograph=False,
                    )
                return self._eager_inference(ops.cast(images, "float32"))
        return self._inference(
            images, training, c.rpn_pre_nms_test, c.rpn_post_nms_test, c.max_detections
        )

    def _inference(self, images, training, pre_nms, post_nms, max_detections):
        c = self.config
        images = ops.convert_to_tensor(images, "float32")
        feats, levels = self._features(images, training)
        shape = ops.shape(images)
        anchors = self._anchors(images, levels)
        logits, deltas = self.rpn(levels)
        rois, roi_valid = self._proposals(images, anchors, logits, deltas, pre_nms, post_nms)
        cls_logits, box_deltas = self._box_outputs(levels, rois)
        probs = ops.softmax(ops.cast(cls_logits, "float32"), axis=-1)
        fg = probs[..., 1:]
        scores = ops.max(fg, axis=-1)
        classes = ops.cast(ops.argmax(fg, axis=-1) + 1, "float32")
        boxes = decode_boxes(rois, box_deltas, ROI_BOX_WEIGHTS)
        boxes = clip_boxes(boxes, shape[1], shape[2])
        ok = ops.logical_and(roi_valid, (boxes[..., 2] - boxes[..., 0]) > 1e-3)
        ok = ops.logical_and(ok, (boxes[..., 3] - boxes[..., 1]) > 1e-3)
        scores = ops.where(ok, scores, -1.0)
        idx, _ = batched_nms(
            boxes,
            scores,
            max_detections,
            c.detection_nms_iou,
            score_threshold=c.detection_score_threshold,
            pre_nms_top_k=post_nms,
        )
        valid = idx >= 0
        det_boxes = ops.where(valid[..., None], _gather_rows(boxes, idx), 0.0)
        det_scores = ops.where(valid, _gather_rows(scores, idx), 0.0)
        det_classes = ops.where(valid, _gather_rows(classes, idx), 0.0)
        mask_logits = self._mask_logits(levels, det_boxes)
        masks = ops.sigmoid(ops.cast(mask_logits[..., 1], "float32"))  # (B, N, M, M)
        semantic = ops.softmax(ops.cast(self.gcn(feats), "float32"), axis=-1)
        return {
            "boxes": ops.transpose(det_boxes, (0, 2, 1))[:, None],
            "scores": det_scores[:, None, None, :],
            "classes": det_classes[:, None, None, :],
            "masks": ops.transpose(masks, (0, 2, 3, 1)),
            "semantic": semantic,
        }

    # ------------------------------------------------------------------------ training

    def _loss_terms(
        self, images, targets, training, proposals=None, seed=None, proposal_valid=None
    ):
        """The seven loss terms of Eq. 4 and the :data:`STAT_NAMES` statistics (dict of scalars).

        Args:
            images, targets: a batch of the panoptic pipeline.
            training: training mode of the layers.
            proposals: ``None`` (training: the RPN's proposals) or fixed ``(B, P, 4)`` boxes for
                the box and mask heads (:meth:`probe_losses`).
            seed: ``None`` (a new anchor/ROI sample per call) or an int (the same sample at
                every call).
            proposal_valid: with ``proposals``, optional ``(B, P)`` bool (``False``: padding).
        """
        c = self.config
        sample_seed = self.sample_seed if seed is None else seed
        images = ops.convert_to_tensor(images, "float32")
        shape = ops.shape(images)
        gt_boxes = ops.cast(targets["boxes"], "float32")
        gt_classes = ops.cast(targets["classes"], "int32")
        gt_valid = gt_classes > 0
        instances = ops.cast(targets["instances"], "int32")
        foreground = ops.cast(instances > 0, "int32")
        if "semantic" in targets:  # nuclei dropped from the box slots stay foreground
            foreground = ops.cast(
                ops.logical_or(instances > 0, ops.cast(targets["semantic"], "int32") != 0), "int32"
            )

        feats, levels = self._features(images, training)
        anchors = self._anchors(images, levels)

        # RPN
        rpn_logits, rpn_deltas = self.rpn(levels)
        rpn_labels, rpn_box_targets = rpn_targets(
            anchors,
            gt_boxes,
            gt_valid,
            c.rpn_batch,
            c.rpn_positive_fraction,
            c.rpn_pos_iou,
            c.rpn_neg_iou,
            seed=sample_seed,
        )
        out = {
            "rpn_obj_loss": panoptic_losses.rpn_objectness_loss(rpn_labels, rpn_logits),
            "rpn_reg_loss": panoptic_losses.rpn_box_loss(rpn_labels, rpn_deltas, rpn_box_targets),
        }

        # Box head on sampled proposals
        if proposals is None:
            proposals, proposal_valid = self._proposals(
                images, anchors, rpn_logits, rpn_deltas, c.rpn_pre_nms, c.rpn_post_nms
            )
        else:
            proposals = ops.convert_to_tensor(proposals, "float32")
        samples = sample_proposals(
            proposals,
            gt_boxes,
            gt_classes,
            gt_valid,
            c.roi_batch,
            c.roi_positive_fraction,
            c.roi_fg_iou,
            seed=sample_seed,
            proposal_valid=proposal_valid,
        )
        rois = samples["rois"]
        cls_logits, box_deltas = self._box_outputs(levels, rois)
        out["det_cls_loss"] = panoptic_losses.roi_class_loss(samples["class_targets"], cls_logits)
        out["det_reg_loss"] = panoptic_losses.roi_box_loss(
            samples["class_targets"], box_deltas, samples["box_targets"]
        )

        # Mask generator on the first max_mask_rois ROIs (positives come first)
        k = c.max_mask_rois
        mask_rois = rois[:, :k]
        positive = samples["positive"][:, :k]
        ids = ops.where(positive, samples["matched_gt_index"][:, :k] + 1, 0)
        mask_logits = self._mask_logits(levels, mask_rois)
        m = 2 * c.mask_roi_size
        targets_m = mask_targets(instances, mask_rois, ids, size=m)
        out["det_mask_loss"] = panoptic_losses.mask_loss(
            ops.cast(positive, "int32"), mask_logits, targets_m
        )

        # Semantic branch (GCN) and fused instance-branch map F_N
        out["semseg1_loss"] = panoptic_losses.semantic_loss(foreground, self.gcn(feats))
        pred_boxes = decode_boxes(mask_rois, box_deltas[:, :k], ROI_BOX_WEIGHTS)
        pred_boxes = clip_boxes(pred_boxes, shape[1], shape[2])
        order = ops.softmax(ops.cast(cls_logits[:, :k], "float32"), axis=-1)
        order = 1.0 - order[..., 0]
        fused = self.fusion(levels[0], mask_logits, pred_boxes, order, positive)
        out["semseg2_loss"] = panoptic_losses.semantic_loss(foreground, fused)
        terms = {name: ops.cast(out[name], "float32") for name in LOSS_NAMES}
        per_image = ops.cast(ops.shape(images)[0], "float32")
        terms["rpn_positives"] = ops.sum(ops.cast(rpn_labels == 1, "float32")) / per_image
        terms["roi_positives"] = ops.sum(ops.cast(samples["positive"], "float32")) / per_image
        return terms

    def propose(self, images, training_settings: bool = True):
        """The RPN's proposals of ``images``: ``(boxes (B, P, 4), valid (B, P))``.

        ``training_settings``: the pre/post-NMS counts used in training (else those of
        inference).
        """
        c = self.config
        images = ops.convert_to_tensor(images, "float32")
        _, levels = self._features(images, False)
        anchors = self._anchors(images, levels)
        logits, deltas = self.rpn(levels)
        pre, post = (
            (c.rpn_pre_nms, c.rpn_post_nms)
            if training_settings
            else (c.rpn_pre_nms_test, c.rpn_post_nms_test)
        )
        return self._proposals(images, anchors, logits, deltas, pre, post)

    def probe_losses(
        self, images, targets, proposals, seed: int = 0, proposal_valid=None
    ) -> dict[str, float]:
        """The seven loss terms on a fixed sample, to compare checkpoints of a run.

        During training the box and mask heads see the RPN's current proposals, so their losses
        are measured on a distribution that changes as the RPN learns (more positives, harder
        negatives). Here the heads see fixed ``proposals`` and the anchor/ROI samples are drawn
        with a fixed ``seed``, so that every checkpoint is scored on the same examples.

        Args:
            images: ``(B, H, W, 3)`` float images.
            targets: the panoptic pipeline's targets of ``images``.
            proposals: ``(B, P, 4)`` candidate ROIs ``(y1, x1, y2, x2)`` in pixels.
            seed: sampling seed.
            proposal_valid: optional ``(B, P)`` bool, ``False`` for padded proposals.

        Returns:
            ``{name: float}`` of :data:`LOSS_NAMES` and :data:`STAT_NAMES` (inference mode).
        """
        terms = self._loss_terms(
            images,
            targets,
            False,
            proposals=proposals,
            seed=int(seed),
            proposal_valid=proposal_valid,
        )
        return {k: float(ops.convert_to_numpy(v)) for k, v in terms.items()}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Sum of the seven terms of Eq. 4 (unweighted); updates the per-term trackers."""
        terms = self._loss_terms(x, y, training)
        total = sum(terms[name] for name in LOSS_NAMES)
        for name in LOSS_NAMES:
            self.loss_trackers[name].update_state(terms[name])
        for name in STAT_NAMES:
            self.stat_trackers[name].update_state(terms[name])
        self.total_tracker.update_state(total)
        if self.losses:
            total = total + ops.sum(self.losses)
        return total

    def train_step(self, data):
        import tensorflow as tf

        x, y = data[0], data[1]
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, training=True)
            if self.optimizer is not None and hasattr(self.optimizer, "scale_loss"):
                scaled = self.optimizer.scale_loss(loss)
            else:
                scaled = loss
        grads = tape.gradient(scaled, self.trainable_variables)
        pairs = [
            (g, v) for g, v in zip(grads, self.trainable_variables, strict=True) if g is not None
        ]
        self.optimizer.apply_gradients(pairs)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = data[0], data[1]
        self.compute_loss(x, y, training=False)
        return {m.name: m.result() for m in self.metrics}

    @property
    def output(self):
        """Symbolic inference outputs ``{name: KerasTensor}`` (batch, height, width unknown),
        like a functional model's ``output`` (read by the export metadata and the Predictor)."""
        n, m = self.config.max_detections, 2 * self.config.mask_roi_size
        shapes = {
            "boxes": (None, 1, 4, n),
            "scores": (None, 1, 1, n),
            "classes": (None, 1, 1, n),
            "masks": (None, m, m, n),
            "semantic": (None, None, None, 2),
        }
        return {k: keras.KerasTensor(shape, dtype="float32", name=k) for k, shape in shapes.items()}

    @property
    def metrics(self):
        return [self.total_tracker, *self.loss_trackers.values(), *self.stat_trackers.values()]

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_panoptic(config: PanopticModelConfig | None = None, **overrides) -> PanopticModel:
    """Build a :class:`PanopticModel` (weights created by one call on a 64 x 64 image).

    Args:
        config: the architecture (default :class:`PanopticModelConfig`).
        **overrides: fields replaced in ``config``.

    Returns:
        A built :class:`PanopticModel` named ``panoptic_<encoder>``.
    """
    config = config or PanopticModelConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    model = PanopticModel(config, name=f"panoptic_{config.encoder}")
    model.build((None, None, None, 3))
    logger.debug("built %s with %d parameters", model.name, model.count_params())
    return model


def build_panoptic_from_config(config: PanopticModelConfig) -> PanopticModel:
    """Registry builder: :func:`build_panoptic` of ``config``."""
    return build_panoptic(config)


__all__ = [
    "LOSS_NAMES",
    "STAT_NAMES",
    "OUTPUT_NAMES",
    "PanopticModel",
    "PanopticModelConfig",
    "build_panoptic",
    "build_panoptic_from_config",
]
