"""Building blocks of the ``panoptic`` method (Liu et al., IJCAI 2019): a Mask R-CNN instance
branch with semantic feature fusion, a dual-modal mask generator and a GCN semantic branch.

Conventions shared by every module of this package:

* **Boxes** are ``(y1, x1, y2, x2)`` float32 in **input-image pixels**: ``(0, 0)`` is the top-left
  corner of the top-left pixel, pixel ``(i, j)`` covers ``[i, i + 1) x [j, j + 1)`` and has its
  centre at ``(i + 0.5, j + 0.5)``. A box ``(0, 0, H, W)`` covers the whole ``H x W`` image. Height
  and width are ``y2 - y1`` and ``x2 - x1`` (no ``+ 1``). Feature maps of stride ``s`` put their
  pixel ``(i, j)`` at image position ``((i + 0.5) s, (j + 0.5) s)`` (Detectron2 "aligned").
* **Box deltas** are ``(dy, dx, dh, dw)`` of Faster R-CNN (Ren et al. 2015), see
  :func:`~kerasnuc.models.panoptic.boxes.encode_boxes`; the RPN uses weights ``(1, 1, 1, 1)``, the
  box head :data:`~kerasnuc.models.panoptic.sampling.ROI_BOX_WEIGHTS` = ``(10, 10, 5, 5)``.
* **Anchors** are concatenated over levels ``P2 .. P6``, row-major over the positions of each level
  and anchor-minor, the order of an RPN output ``(B, h, w, A * k)`` reshaped to ``(B, h w A, k)``
  and concatenated over levels (:mod:`~kerasnuc.models.panoptic.anchors`).
* **Padding**: every per-image set has a static size so batches keep static shapes. Ground truth is
  padded to ``max_gt`` boxes with a boolean ``gt_valid`` mask (padded boxes are ignored, their
  values do not matter); NMS outputs ``max_output`` indices padded with ``-1`` plus a valid count;
  sampled ROIs come with a boolean ``valid`` mask.
* **Labels**: anchor/ROI labels are ``1`` (positive), ``0`` (negative) and ``-1`` (ignored); class
  targets are ``0`` for background and ``1 .. C`` for the object classes (``1`` = nucleus).
* Ground-truth masks are given as a per-image **instance map** ``(B, H, W)`` int32 (0 =
  background, any positive id per nucleus) plus the id of each padded gt box; this keeps memory
  at one map per image with hundreds of nuclei (:func:`~kerasnuc.models.panoptic.sampling.
  mask_targets`).

Everything is written with ``keras.ops`` (backend-portable, traceable with dynamic image sizes).
"""
