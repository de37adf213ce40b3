"""GCN semantic branch of the ``panoptic`` method (Liu et al., IJCAI 2019, Sec. 3.2).

Global Convolutional Network decoder of Peng et al. 2017 ("Large Kernel Matters - Improve
Semantic Segmentation by Global Convolutional Network", Figure 2), with the large-kernel size
fixed at ``k = 5`` as in the panoptic paper ("for memory efficiency"):

* :class:`GlobalConvBlock` (GCN): two branches ``conv(k x 1) -> conv(1 x k)`` and
  ``conv(1 x k) -> conv(k x 1)`` summed, no non-linearity (Peng et al. Sec. 3.1).
* :class:`BoundaryRefinement` (BR): the residual block ``x + conv3x3(ReLU(conv3x3(x)))``.
* :class:`GCNDecoder`: on the backbone features ``P2 .. P5`` (the paper's res-2 .. res-5,
  strides 4 .. 32): per level GCN -> BR to ``num_classes`` score channels; from the coarsest
  level up, ``s = BR(s_l + deconv2x(s_{l+1}))``; then two more ``deconv2x -> BR`` steps to full
  resolution (Peng et al. Figure 2: the last two upsamplings refine the stride-4 map). Score maps
  have ``num_classes`` channels throughout, as in the original GCN.

"Deconv" is a learned ``Conv2DTranspose(num_classes, 4, strides=2, padding="same")``, which
works with unknown ``H``/``W`` (Peng et al. initialise theirs bilinearly; we use the default
initialiser).
"""

from __future__ import annotations

import keras

from kerasnuc.checks import check_positive_int


@keras.saving.register_keras_serializable(package="kerasnuc")
class GlobalConvBlock(keras.layers.Layer):
    """GCN block: ``conv(1xk)(conv(kx1)(x)) + conv(kx1)(conv(1xk)(x))`` (Peng et al. 2017).

    Args:
        filters: output channels (of every convolution).
        kernel_size: the large kernel ``k`` (panoptic paper: 5).

    Input shape: ``(B, H, W, C)``. Output shape: ``(B, H, W, filters)``.
    """

    def __init__(self, filters: int, kernel_size: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.filters = check_positive_int("filters", filters)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        k = kernel_size
        self.left1 = keras.layers.Conv2D(filters, (k, 1), padding="same", name="left_kx1")
        self.left2 = keras.layers.Conv2D(filters, (1, k), padding="same", name="left_1xk")
        self.right1 = keras.layers.Conv2D(filters, (1, k), padding="same", name="right_1xk")
        self.right2 = keras.layers.Conv2D(filters, (k, 1), padding="same", name="right_kx1")

    def build(self, input_shape):
        self.left1.build(input_shape)
        self.right1.build(input_shape)
        mid = (*tuple(input_shape)[:-1], self.filters)
        self.left2.build(mid)
        self.right2.build(mid)
        self.built = True

    def call(self, inputs):
        return self.left2(self.left1(inputs)) + self.right2(self.right1(inputs))

    def compute_output_shape(self, input_shape):
        return (*tuple(input_shape)[:-1], self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size)
        return config


@keras.saving.register_keras_serializable(package="kerasnuc")
class BoundaryRefinement(keras.layers.Layer):
    """Boundary refinement residual block ``x + conv3x3(ReLU(conv3x3(x)))`` (Peng et al. 2017).

    Input and output shape: ``(B, H, W, C)``.
    """

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.conv1 = keras.layers.Conv2D(c, 3, padding="same", activation="relu", name="conv1")
        self.conv2 = keras.layers.Conv2D(c, 3, padding="same", name="conv2")
        self.conv1.build(input_shape)
        self.conv2.build(input_shape)
        self.built = True

    def call(self, inputs):
        return inputs + self.conv2(self.conv1(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="kerasnuc")
class GCNDecoder(keras.layers.Layer):
    """GCN semantic decoder from ``P2 .. P5`` to full-resolution class logits (see module doc).

    Args:
        num_classes: score channels (panoptic: 2, background / nucleus).
        kernel_size: large kernel ``k`` of the GCN blocks (paper: 5).
        **kwargs: base ``Layer`` arguments.

    Call arguments:
        features: dict with ``"P2" .. "P5"`` at strides 4 .. 32 (sizes halving exactly).

    Returns:
        ``(B, 4 h_2, 4 w_2, num_classes)`` logits (full input resolution).
    """

    LEVELS = (2, 3, 4, 5)

    def __init__(self, num_classes: int = 2, kernel_size: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        c = num_classes
        self.gcn = [GlobalConvBlock(c, kernel_size, name=f"gcn{i}") for i in self.LEVELS]
        self.br = [BoundaryRefinement(name=f"br{i}") for i in self.LEVELS]
        # fuse[k]: BR after adding the upsampled coarser map to level LEVELS[k] (k = 0..2).
        self.up = [
            keras.layers.Conv2DTranspose(c, 4, strides=2, padding="same", name=f"deconv{i}")
            for i in self.LEVELS[:-1]
        ]
        self.fuse = [BoundaryRefinement(name=f"br_fuse{i}") for i in self.LEVELS[:-1]]
        self.final_up = [
            keras.layers.Conv2DTranspose(c, 4, strides=2, padding="same", name=f"deconv_out{i}")
            for i in (1, 2)
        ]
        self.final_br = [BoundaryRefinement(name=f"br_out{i}") for i in (1, 2)]

    def build(self, input_shape):
        c = self.num_classes
        for k, i in enumerate(self.LEVELS):
            shape = tuple(input_shape[f"P{i}"])
            self.gcn[k].build(shape)
            self.br[k].build((*shape[:-1], c))
        for k, i in enumerate(self.LEVELS[:-1]):
            coarse = tuple(input_shape[f"P{i + 1}"])
            self.up[k].build((*coarse[:-1], c))
            fine = tuple(input_shape[f"P{i}"])
            self.fuse[k].build((*fine[:-1], c))
        b = tuple(input_shape["P2"])[0]
        for layer in self.final_up + self.final_br:
            layer.build((b, None, None, c))
        self.built = True

    def call(self, features):
        scores = [self.br[k](self.gcn[k](features[f"P{i}"])) for k, i in enumerate(self.LEVELS)]
        s = scores[-1]
        for k in reversed(range(len(self.LEVELS) - 1)):
            s = self.fuse[k](scores[k] + self.up[k](s))
        for up, br in zip(self.final_up, self.final_br, strict=True):
            s = br(up(s))
        return s

    def compute_output_shape(self, input_shape):
        b, h, w, _ = tuple(input_shape["P2"])
        return (b, None if h is None else 4 * h, None if w is None else 4 * w, self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, kernel_size=self.kernel_size)
        return config


__all__ = ["BoundaryRefinement", "GCNDecoder", "GlobalConvBlock"]
