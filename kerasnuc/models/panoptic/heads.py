"""Heads of the ``panoptic`` instance branch (Liu et al., IJCAI 2019, Sec. 3.1, Figures 3-4).

* :class:`RPNHead`: the region proposal head of Faster R-CNN / FPN (Ren et al. 2015, Lin et al.
  2017), shared over the pyramid levels: conv3x3 + ReLU, then a 1x1 conv to ``A`` objectness
  logits and a 1x1 conv to ``4 A`` box deltas per position.
* :class:`BoxHead`: the two-FC box head of FPN Mask R-CNN: flatten the ``7x7`` ROI features ->
  FC(1024) + ReLU -> FC(1024) + ReLU -> class logits (background + ``C``) and box deltas.
  Our choice: class-agnostic deltas (4 per ROI; the paper is silent, nuclei have one class).
* :class:`DualModalMaskGenerator`: the paper's mask generator (Table 1 and Figure 4).
* :class:`PixelShuffle`: the sub-pixel rearrangement ("Reshape2" of Figure 4).

All heads work on channels-last tensors and use ``keras.ops`` only.
"""

from __future__ import annotations

import keras
from keras import ops

from kerasnuc.checks import check_positive_int


@keras.saving.register_keras_serializable(package="kerasnuc")
class PixelShuffle(keras.layers.Layer):
    """Sub-pixel rearrangement of Shi et al. 2016, in PyTorch's ``nn.PixelShuffle`` order.

    Input channel ``k = c r^2 + i r + j`` at position ``(y, x)`` moves to channel ``c`` at
    ``(y r + i, x r + j)``.

    Args:
        factor: upscaling factor ``r``.

    Input shape: ``(B, H, W, C r^2)``. Output shape: ``(B, H r, W r, C)``.
    """

    def __init__(self, factor: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.factor = check_positive_int("factor", factor)

    def call(self, inputs):
        r = self.factor
        shape = ops.shape(inputs)
        c = inputs.shape[-1] // (r * r)
        x = ops.reshape(inputs, (-1, shape[1], shape[2], c, r, r))
        x = ops.transpose(x, (0, 1, 4, 2, 5, 3))
        return ops.reshape(x, (-1, shape[1] * r, shape[2] * r, c))

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        r = self.factor
        return (b, None if h is None else h * r, None if w is None else w * r, c // (r * r))

    def get_config(self):
        config = super().get_config()
        config["factor"] = self.factor
        return config


@keras.saving.register_keras_serializable(package="kerasnuc")
class DualModalMaskGenerator(keras.layers.Layer):
    """The dual-modal mask generator of Liu et al. 2019 (Table 1, Figure 4).

    On ROI features ``(N, S, S, C)`` (paper: ``S = 14``, ``C = 256``)::

        x = 3 x [conv3x3(conv_filters) + ReLU]                       # "Conv x 3"
        FC mode:  conv3x3(conv_filters) + ReLU                       # Conv1
                  conv3x3(fc_filters) + ReLU                         # Conv2 (paper 128)
                  FC((2S)^2) -> reshape (2S, 2S, 1) -> duplicated to 2 channels   # Reshape1
        up mode:  conv3x3(conv_filters) + ReLU                       # Conv3
                  conv3x3(4 up_filters) + ReLU                       # Conv4 (paper 1024)
                  pixel shuffle x2 -> (2S, 2S, up_filters)           # Reshape2 (paper 256)
                  conv1x1(2)                                         # Conv5
        output = FC mode + up mode                                   # (N, 2S, 2S, 2)

    The two output channels (the ``2 x 28 x 28`` output of Table 1) are the per-class mask
    logits of maskrcnn-benchmark's predictor, one per class including background: the mask BCE
    of Eq. 4 trains the nucleus channel (1); both channels are pasted into the two-channel
    (background, nucleus) semantic map of the feature fusion, whose CE trains them together.
    The paper omits the
    ReLUs "after each convolutional block" from its figure; we apply them after every 3x3
    convolution, not after the FC and ``Conv5`` whose outputs are summed logits. The FC layer
    sees the flattened ``S x S x fc_filters`` features (row-major, channels last).

    Args:
        conv_filters: channels of the four shared/first convolutions and of ``Conv1`` and
            ``Conv3`` (paper: 256).
        fc_filters: channels of ``Conv2`` (paper: 128).
        up_filters: channels after the pixel shuffle (paper: 256; ``Conv4`` has 4x as many).
        roi_size: side ``S`` of the ROI features (paper: 14); the masks are ``2 S`` square.
        **kwargs: base ``Layer`` arguments.

    Input shape: ``(N, roi_size, roi_size, C)``. Output shape: ``(N, 2 roi_size, 2 roi_size, 2)``
    float logits.
    """

    def __init__(
        self,
        conv_filters: int = 256,
        fc_filters: int = 128,
        up_filters: int = 256,
        roi_size: int = 14,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.conv_filters = check_positive_int("conv_filters", conv_filters)
        self.fc_filters = check_positive_int("fc_filters", fc_filters)
        self.up_filters = check_positive_int("up_filters", up_filters)
        self.roi_size = check_positive_int("roi_size", roi_size)
        self.mask_size = 2 * self.roi_size

        def conv(filters, name, kernel=3, activation="relu"):
            return keras.layers.Conv2D(
                filters, kernel, padding="same", activation=activation, name=name
            )

        self.shared = [conv(self.conv_filters, f"conv_shared{i}") for i in range(1, 4)]
        self.conv1 = conv(self.conv_filters, "conv1")
        self.conv2 = conv(self.fc_filters, "conv2")
        self.fc = keras.layers.Dense(self.mask_size * self.mask_size, name="fc")
        self.conv3 = conv(self.conv_filters, "conv3")
        self.conv4 = conv(4 * self.up_filters, "conv4")
        self.shuffle = PixelShuffle(2, name="pixel_shuffle")
        self.conv5 = conv(2, "conv5", kernel=1, activation=None)

    def build(self, input_shape):
        n, s, _, c = input_shape
        if s is not None and s != self.roi_size:
            raise ValueError(
                f"input ROI features must be {self.roi_size}x{self.roi_size}. "
                f"Received: input_shape={input_shape}"
            )
        shape = (n, self.roi_size, self.roi_size, c)
        for layer in self.shared:
            layer.build(shape)
            shape = (n, self.roi_size, self.roi_size, self.conv_filters)
        self.conv1.build(shape)
        self.conv2.build(shape)
        self.fc.build((n, self.roi_size * self.roi_size * self.fc_filters))
        self.conv3.build(shape)
        self.conv4.build(shape)
        self.conv5.build((n, self.mask_size, self.mask_size, self.up_filters))
        self.built = True

    def call(self, inputs):
        x = inputs
        for layer in self.shared:
            x = layer(x)
        # FC mode
        f = self.conv2(self.conv1(x))
        f = ops.reshape(f, (-1, self.roi_size * self.roi_size * self.fc_filters))
        f = ops.reshape(self.fc(f), (-1, self.mask_size, self.mask_size, 1))
        f = ops.concatenate([f, f], axis=-1)
        # Upscaling mode
        u = self.conv5(self.shuffle(self.conv4(self.conv3(x))))
        return f + u

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.mask_size, self.mask_size, 2)

    def get_config(self):
        config = super().get_config()
        config.update(
            conv_filters=self.conv_filters,
            fc_filters=self.fc_filters,
            up_filters=self.up_filters,
            roi_size=self.roi_size,
        )
        return config


@keras.saving.register_keras_serializable(package="kerasnuc")
class RPNHead(keras.layers.Layer):
    """Region proposal head shared over the pyramid levels (Ren et al. 2015; Lin et al. 2017).

    Per level: ``h = ReLU(conv3x3(filters))``, ``objectness = conv1x1(A)(h)``,
    ``deltas = conv1x1(4 A)(h)``; the outputs of all levels are flattened row-major over
    positions, anchor-minor, and concatenated in level order (the anchor order of
    :mod:`~kerasnuc.models.panoptic.anchors`).

    Args:
        num_anchors: anchors per position ``A``.
        filters: channels of the shared 3x3 conv (paper/FPN: 256).
        **kwargs: base ``Layer`` arguments.

    Call arguments:
        features: list of ``(B, h_l, w_l, C)`` pyramid levels (``P2 .. P6``).

    Returns:
        ``(objectness, deltas)``: ``(B, K)`` logits and ``(B, K, 4)`` ``(dy, dx, dh, dw)`` with
        ``K = A sum_l h_l w_l``.
    """

    def __init__(self, num_anchors: int = 3, filters: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = check_positive_int("num_anchors", num_anchors)
        self.filters = check_positive_int("filters", filters)
        init = keras.initializers.RandomNormal(stddev=0.01, seed=0)
        self.conv = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu", kernel_initializer=init, name="conv"
        )
        self.objectness = keras.layers.Conv2D(
            num_anchors, 1, kernel_initializer=init, name="objectness"
        )
        self.box_deltas = keras.layers.Conv2D(
            4 * num_anchors, 1, kernel_initializer=init, name="deltas"
        )

    def build(self, input_shape):
        shape = tuple(input_shape[0])
        self.conv.build(shape)
        self.objectness.build((*shape[:-1], self.filters))
        self.box_deltas.build((*shape[:-1], self.filters))
        self.built = True

    def call(self, features):
        logits, deltas = [], []
        batch = ops.shape(features[0])[0]
        for x in features:
            h = self.conv(x)
            logits.append(ops.reshape(self.objectness(h), (batch, -1)))
            deltas.append(ops.reshape(self.box_deltas(h), (batch, -1, 4)))
        return ops.concatenate(logits, axis=1), ops.concatenate(deltas, axis=1)

    def compute_output_shape(self, input_shape):
        b = input_shape[0][0]
        return (b, None), (b, None, 4)

    def get_config(self):
        config = super().get_config()
        config.update(num_anchors=self.num_anchors, filters=self.filters)
        return config


@keras.saving.register_keras_serializable(package="kerasnuc")
class BoxHead(keras.layers.Layer):
    """Two-FC box head of FPN Mask R-CNN with class-agnostic box deltas.

    ``h = ReLU(FC_2(ReLU(FC_1(flatten(roi)))))``, ``class_logits = FC(C + 1)(h)`` (index 0 is
    background), ``deltas = FC(4)(h)`` (``(dy, dx, dh, dw)``, to be decoded with the ROI box
    weights).

    Args:
        num_classes: object classes ``C`` (nuclei: 1).
        fc_units: width of the two hidden FC layers (paper/FPN: 1024).
        **kwargs: base ``Layer`` arguments.

    Input shape: ``(N, S, S, C_in)`` ROI features (FPN: ``S = 7``).

    Returns:
        ``(class_logits (N, C + 1), deltas (N, 4))``.
    """

    def __init__(self, num_classes: int = 1, fc_units: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.fc_units = check_positive_int("fc_units", fc_units)
        self.fc1 = keras.layers.Dense(fc_units, activation="relu", name="fc1")
        self.fc2 = keras.layers.Dense(fc_units, activation="relu", name="fc2")
        self.cls = keras.layers.Dense(
            num_classes + 1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=0),
            name="class_logits",
        )
        self.box = keras.layers.Dense(
            4,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001, seed=0),
            name="deltas",
        )

    def build(self, input_shape):
        n = input_shape[0]
        flat = 1
        for d in input_shape[1:]:
            flat *= int(d)
        self.fc1.build((n, flat))
        self.fc2.build((n, self.fc_units))
        self.cls.build((n, self.fc_units))
        self.box.build((n, self.fc_units))
        self.built = True

    def call(self, inputs):
        flat = 1
        for d in inputs.shape[1:]:
            flat *= int(d)
        h = self.fc2(self.fc1(ops.reshape(inputs, (-1, flat))))
        return self.cls(h), self.box(h)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes + 1), (input_shape[0], 4)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, fc_units=self.fc_units)
        return config


__all__ = ["BoxHead", "DualModalMaskGenerator", "PixelShuffle", "RPNHead"]
