"""tf.data pipelines: shapes, keys, reproducibility, and targets that sit on the nuclei."""

import numpy as np
import pytest
import tensorflow as tf

from kerasnuc.data.augment import AugmentConfig
from kerasnuc.data.dataset import Dataset, DatasetWriter
from kerasnuc.data.pipeline import (
    PipelineConfig,
    conic_dataset,
    load_items,
    panoptic_dataset,
    unet_sharp_dataset,
    weak_dataset,
)
from kerasnuc.data.points import IGNORE
from kerasnuc.fileutil import KerasnucError

S = 64


@pytest.fixture(scope="module")
def consep_small(shared_data, tmp_path_factory):
    """Four CoNSeP val patches (with nuclei of several classes) as their own dataset."""
    src = Dataset(shared_data / "consep")
    ids = [i for i in src.split("val") if src.instances(i).max() > 20][:4]
    root = tmp_path_factory.mktemp("c") / "consep4"
    with DatasetWriter(root, {"name": "consep4", "mpp": 0.25, "classes": src.meta["classes"]}) as w:
        for i in ids:
            s = src.sample(i)
            w.add(i, s.image, s.instances, s.classes, split="train")
    return Dataset(root)


def _cfg(**kw):
    base = dict(crop_size=S, batch_size=2, deterministic=True, seed=1)
    base.update(kw)
    return PipelineConfig(**base)


def test_conic_batches_keys_shapes_and_consistency(consep_small):
    ds = conic_dataset(consep_small, "train", _cfg())
    for images, t in ds.take(3):
        assert images.shape == (2, S, S, 3) and images.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
        assert set(t) == {"semantic", "three_label", "vectors"}
        sem, three, vec = t["semantic"].numpy(), t["three_label"].numpy(), t["vectors"].numpy()
        assert sem.shape == (2, S, S) and three.shape == (2, S, S) and vec.shape == (2, S, S, 3)
        assert sem.max() <= 4
        # all three targets come from the same (augmented) label maps
        np.testing.assert_array_equal(three > 0, sem > 0)
        np.testing.assert_array_equal(vec[..., 2] > 0, sem > 0)
        assert np.abs(vec[..., :2][sem == 0]).max(initial=0) == 0


def test_validation_tiles_equal_ground_truth_crops(consep_small):
    """Without augmentation the first tile is the top-left S x S window of the first image."""
    ds = conic_dataset(consep_small, "train", _cfg(), training=False)
    images, t = next(iter(ds))
    first = consep_small.ids[0]
    img = consep_small.image(first)[:S, :S] / 255.0
    inst = consep_small.instances(first)[:S, :S]
    cls = consep_small.classes(first)[:S, :S]
    np.testing.assert_allclose(images[0].numpy(), img, atol=1e-6)
    np.testing.assert_array_equal(t["semantic"][0].numpy(), cls)
    np.testing.assert_array_equal(t["three_label"][0].numpy() > 0, inst > 0)
    # second tile of the same image: columns S..2S
    np.testing.assert_array_equal(
        t["semantic"][1].numpy(), consep_small.classes(first)[:S, S : 2 * S]
    )
    # 256x256 patches tiled by 64: 16 tiles per image, 4 images, batch 2
    assert sum(1 for _ in ds) == 4 * 16 // 2


def test_reproducible_and_seed_dependent(consep_small):
    def first(seed):
        images, t = next(iter(conic_dataset(consep_small, "train", _cfg(seed=seed))))
        return images.numpy(), t["semantic"].numpy()

    a, b, c = first(3), first(3), first(4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_epochs_differ_and_resume_continues(consep_small):
    cfg = _cfg(batch_size=1, samples_per_epoch=3, augment=AugmentConfig.none())
    run = [x.numpy() for x, _ in conic_dataset(consep_small, "train", cfg).take(6)]
    resumed = [
        x.numpy() for x, _ in conic_dataset(consep_small, "train", cfg, start_epoch=1).take(3)
    ]
    for a, b in zip(run[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_unet_sharp_and_panoptic_keys(consep_small):
    images, t = next(iter(unet_sharp_dataset(consep_small, "train", _cfg())))
    assert set(t) == {"semantic"} and t["semantic"].shape == (2, S, S)
    images, t = next(iter(panoptic_dataset(consep_small, "train", _cfg(max_instances=300))))
    assert set(t) == {"instances", "semantic", "boxes", "classes"}
    np.testing.assert_array_equal(t["instances"].numpy() > 0, t["semantic"].numpy() > 0)
    assert t["boxes"].shape == (2, 300, 4) and t["classes"].shape == (2, 300)


def test_weak_targets_from_points_only(consep_small):
    cfg = _cfg(augment=AugmentConfig.none(), context=0.0)
    images, t = next(iter(weak_dataset(consep_small, "train", cfg, training=False)))
    assert set(t) == {"voronoi", "cluster", "repel"}
    vor, clu, rep = t["voronoi"].numpy(), t["cluster"].numpy(), t["repel"].numpy()
    assert set(np.unique(vor)) <= {0, 1, IGNORE} and set(np.unique(clu)) <= {0, 1}
    assert 0.0 <= rep.min() and rep.max() <= 1.0
    assert np.all(rep[clu == 0] == 0)  # filtered repel = repel x cluster mask
    # the Voronoi discs sit on nuclei: most of them lie inside ground-truth nuclei
    inst = consep_small.instances(consep_small.ids[0])[:S, :S]
    assert (inst[vor[0] == 1] > 0).mean() > 0.8


def test_weak_outside_pixels_are_ignored(consep_small):
    aug = AugmentConfig(
        **{**AugmentConfig.none().to_dict(), "rotate_prob": 1.0, "rotate": (45.0, 45.0)}
    )
    cfg = _cfg(augment=aug, context=0.0, batch_size=1)
    _, t = next(iter(weak_dataset(consep_small, "train", cfg)))
    vor = t["voronoi"].numpy()[0]
    # a 45 degree rotation of a square crop brings fill into all four corners
    for corner in (vor[0, 0], vor[0, -1], vor[-1, 0], vor[-1, -1]):
        assert corner == IGNORE


def test_resampling_to_target_mpp(consep_small):
    items, n_cls = load_items(consep_small, "train", target_mpp=0.5)
    assert n_cls == 4 and items[0].image.shape == (128, 128, 3)
    assert items[0].labels.shape == (128, 128, 2)
    # nearest resampling keeps only existing ids
    orig = set(np.unique(consep_small.instances(consep_small.ids[0])))
    assert set(np.unique(items[0].labels[..., 0])) <= orig


def test_errors_are_clear(consep_small, shared_data):
    with pytest.raises(KerasnucError, match="no mpp"):
        load_items(Dataset(shared_data / "dsb2018_histology"), "val", target_mpp=0.5)
    other = consep_small.root.parent / "other_types"
    img, inst = consep_small.image(consep_small.ids[0]), consep_small.instances(consep_small.ids[0])
    with DatasetWriter(other, {"name": "other", "classes": {"1": "tumour"}}) as w:
        w.add("a", img, inst, (inst > 0).astype(np.int32))
    with pytest.raises(KerasnucError, match="different cell types"):
        load_items([consep_small, Dataset(other)], None)
    with pytest.raises(ValueError, match="crop_size"):
        PipelineConfig(crop_size=4)


def test_config_round_trip():
    cfg = PipelineConfig(crop_size=128, augment=AugmentConfig.none(), batch_size=3)
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg


def test_typed_and_untyped_datasets_mix_with_unknown_class(consep_small, shared_data):
    from kerasnuc.data.pipeline import _sampling_frequencies
    from kerasnuc.data.targets import UNKNOWN_CLASS

    dsb = Dataset(shared_data / "dsb2018_histology")
    items, n_cls = load_items([consep_small, dsb], None)
    assert n_cls == 4
    typed, untyped = items[0].labels, items[-1].labels
    assert set(np.unique(typed[..., 1])) <= {0, 1, 2, 3, 4}
    inst, cls = untyped[..., 0], untyped[..., 1]
    np.testing.assert_array_equal(cls == UNKNOWN_CLASS, inst > 0)
    np.testing.assert_array_equal(cls == 0, inst == 0)
    # sampling: unknown nuclei get their own last column (bg, 4 types, unknown)
    f = _sampling_frequencies(cls, n_cls)
    assert f.shape == (6,)
    np.testing.assert_allclose(f, [(inst == 0).mean(), 0, 0, 0, 0, (inst > 0).mean()])
    ds = conic_dataset([consep_small, dsb], None, _cfg(batch_size=4))
    kinds = set()
    for _, t in ds.take(6):
        for sem, three in zip(t["semantic"].numpy(), t["three_label"].numpy(), strict=True):
            assert sem.min() >= UNKNOWN_CLASS and sem.max() <= 4
            # A crop with a nucleus of unknown type is unknown everywhere (background too), so
            # untyped data never reaches the semantic loss or its class prior; its nuclei still
            # train the three-label target.
            if (sem == UNKNOWN_CLASS).any():
                assert (sem == UNKNOWN_CLASS).all()
                kinds.add("untyped")
            else:
                kinds.add("typed" if (sem > 0).any() else "background")
            assert ((three > 0) == (sem != 0)).all() or (sem == UNKNOWN_CLASS).all()
    assert "untyped" in kinds and "typed" in kinds


def test_image_groups_balance_slides_in_the_pipeline_sampler():
    from kerasnuc.data.pipeline import _epoch_sampler, _Item, image_group

    assert image_group("consep/train_18_003", "^train_[0-9]+") == "consep/train_18"
    assert image_group("kumar/TCGA-21", "^train_[0-9]+") == "kumar/"  # no match: one group
    assert image_group("consep/train_18_003", None) == "consep/train_18_003"
    lab = np.zeros((4, 4, 2), np.int32)
    # slide 1: 8 patches; slide 2: 2 patches; the same class content everywhere
    ids = [f"train_1_{i:03d}" for i in range(8)] + ["train_2_000", "train_2_001"]
    items = [_Item(f"consep/{i}", np.zeros((4, 4, 3), np.uint8), lab) for i in ids]
    freqs = np.tile([0.75, 0.25], (len(items), 1))
    paper = _epoch_sampler(items, freqs, _cfg(samples_per_epoch=20000))(0)
    assert (paper >= 8).mean() == pytest.approx(2 / 10, abs=0.015)
    cfg = _cfg(samples_per_epoch=20000, image_groups="^train_[0-9]+", group_alpha=0.0)
    equal = _epoch_sampler(items, freqs, cfg)(0)
    assert (equal >= 8).mean() == pytest.approx(1 / 2, abs=0.015)
    sqrt = _cfg(samples_per_epoch=20000, image_groups="^train_[0-9]+")
    assert sqrt.group_alpha == 0.5  # sqrt(8) : sqrt(2) = 2 : 1
    assert (_epoch_sampler(items, freqs, sqrt)(0) >= 8).mean() == pytest.approx(1 / 3, abs=0.015)
    # ids that do not match form one group, inside which the paper's sampling holds
    plain = _cfg(samples_per_epoch=20000, image_groups="^slide_[0-9]+", group_alpha=0.0)
    np.testing.assert_array_equal(_epoch_sampler(items, freqs, plain)(0), paper)
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="regular expression"):
        PipelineConfig(image_groups="train_(")
    with pytest.raises(ValueError, match="group_alpha"):
        PipelineConfig(group_alpha=-0.1)


def test_dataset_weights_set_the_share_of_each_dataset():
    from kerasnuc.data.pipeline import _epoch_sampler, _Item

    lab = np.zeros((4, 4, 2), np.int32)
    lab[:2, :2] = (1, 1)
    items = [_Item(f"a{i}", np.zeros((4, 4, 3), np.uint8), lab, source=0) for i in range(30)]
    items += [_Item(f"b{i}", np.zeros((4, 4, 3), np.uint8), lab, source=1) for i in range(3)]
    freqs = np.tile([0.75, 0.25], (len(items), 1))
    cfg = _cfg(dataset_weights=(0.2, 0.8), samples_per_epoch=20000)
    idx = _epoch_sampler(items, freqs, cfg)(0)
    from_b = (idx >= 30).mean()
    assert from_b == pytest.approx(0.8, abs=0.015)
    # pooled (paper) sampling: images are equivalent, so b gets its 3/33 share
    pooled = _epoch_sampler(items, freqs, _cfg(samples_per_epoch=20000))(0)
    assert (pooled >= 30).mean() == pytest.approx(3 / 33, abs=0.01)
    np.testing.assert_array_equal(idx, _epoch_sampler(items, freqs, cfg)(0))
    with pytest.raises(ValueError, match="one weight per dataset"):
        _epoch_sampler(items, freqs, _cfg(dataset_weights=(1.0,)))(0)
    with pytest.raises(ValueError, match="non-negative"):
        PipelineConfig(dataset_weights=(-1.0, 2.0))
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
