import json

import keras
import numpy as np
import pytest

from kerasnuc.config import DataConfig, InferenceConfig, RunConfig
from kerasnuc.data.dataset import Dataset
from kerasnuc.fileutil import KerasnucError
from kerasnuc.inference.predictor import (
    Predictor,
    apply_transform,
    hed_rescale,
    invert_transform,
    passes_per_model,
    plan_passes,
)
from kerasnuc.layers.dropout import MCDropout, set_mc_dropout
from kerasnuc.models import maps as maps_lib
from kerasnuc.models.conic import ConicModelConfig
from kerasnuc.postprocess.common import PostprocResult
from kerasnuc.postprocess.conic import ConicPostprocConfig
from kerasnuc.registry import METHODS
from kerasnuc.runs import BEST_WEIGHTS, build_model, save_config

CONIC = METHODS["conic"]
CLASSES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle"}


def _equivariant_model(num_classes: int = 2) -> keras.Model:
    """Pointwise softmax heads plus the central-difference gradient of a pointwise scalar.

    1x1 convolutions commute with flips and rotations; the symmetric 3x3 difference stencil
    with zero padding makes ``(d/drow, d/dcol)`` of the scalar a vector field under the
    dihedral group, as the centre vectors should be.
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    semantic = keras.layers.Conv2D(num_classes + 1, 1, activation="softmax", name="semantic")(
        inputs
    )
    three_label = keras.layers.Conv2D(3, 1, activation="softmax", name="three_label")(inputs)
    scalar = keras.layers.Conv2D(1, 1, activation="tanh", name="scalar")(inputs)
    gradient = keras.layers.Conv2D(2, 3, padding="same", use_bias=False, name="vectors")
    vectors = gradient(scalar)
    kernel = np.zeros((3, 3, 1, 2), np.float32)
    kernel[2, 1, 0, 0], kernel[0, 1, 0, 0] = 0.5, -0.5  # dy = (s[r+1, c] - s[r-1, c]) / 2
    kernel[1, 2, 0, 1], kernel[1, 0, 0, 1] = 0.5, -0.5  # dx = (s[r, c+1] - s[r, c-1]) / 2
    gradient.set_weights([kernel])
    outputs = {"semantic": semantic, "three_label": three_label, "vectors": vectors}
    return keras.Model(inputs, outputs)


def _dropout_model(mc: bool = False) -> keras.Model:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 1, activation="relu")(inputs)
    x = MCDropout(0.5, seed=3, mc=mc)(x)
    out = keras.layers.Conv2D(3, 1, activation="softmax", name="three_label")(x)
    return keras.Model(inputs, {"three_label": out})


def _image(rng, shape=(64, 64)) -> np.ndarray:
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_transforms_are_the_dihedral_group(rng):
    img = rng.normal(size=(4, 6, 2))
    np.testing.assert_array_equal(apply_transform(img, 0), img)
    np.testing.assert_array_equal(apply_transform(img, 1), np.rot90(img))
    np.testing.assert_array_equal(apply_transform(img, 4), img[:, ::-1])
    np.testing.assert_array_equal(apply_transform(img, 6), img[::-1])
    np.testing.assert_array_equal(apply_transform(img, 5), img.transpose(1, 0, 2))
    np.testing.assert_array_equal(apply_transform(img, 7), img.transpose(1, 0, 2)[::-1, ::-1])
    seen = set()
    for t in range(8):
        seen.add(apply_transform(img, t).tobytes())
        back = invert_transform({"m": apply_transform(img, t)}, t, vector_outputs=())
        np.testing.assert_array_equal(back["m"], img)
        batch = apply_transform(img[None], t)
        np.testing.assert_array_equal(batch[0], apply_transform(img, t))
    assert len(seen) == 8
    with pytest.raises(ValueError, match="`transform` must be an int in"):
        apply_transform(img, 8)


@pytest.mark.parametrize("transform", range(8))
def test_inverted_centre_vectors_point_to_the_centre(transform):
    # Centre vectors by definition: (row, col) of the centre minus (row, col) of the pixel.
    h, w, centre = 5, 7, (1, 5)

    def vectors_to(point, shape):
        rows, cols = np.mgrid[: shape[0], : shape[1]]
        return np.stack([point[0] - rows, point[1] - cols], axis=-1).astype(np.float32)

    marker = np.zeros((h, w, 1))
    marker[centre] = 1
    moved = apply_transform(marker, transform)[..., 0]
    moved_centre = np.unravel_index(np.argmax(moved), moved.shape)
    predicted = vectors_to(moved_centre, moved.shape)  # what an exact model predicts there
    back = invert_transform({"vectors": predicted}, transform)["vectors"]
    np.testing.assert_array_equal(back, vectors_to(centre, (h, w)))


def test_passes_per_model_and_plan():
    assert passes_per_model(0, 2) == [1, 1]
    assert passes_per_model(16, 1) == [16]
    assert passes_per_model(16, 2) == [8, 8]
    assert passes_per_model(5, 2) == [3, 2]
    assert passes_per_model(2, 3) == [1, 1, 1]
    plan = plan_passes(16, 2, hed_intensity=0.1, seed=0)
    assert [len(p) for p in plan] == [8, 8]
    for model_plan in plan:
        assert [p.transform for p in model_plan] == list(range(8))
        assert all(p.mc_dropout for p in model_plan)
    scales = np.stack([p.hed_scale for model_plan in plan for p in model_plan])
    assert scales.shape == (16, 3) and (scales >= 0.9).all() and (scales <= 1.1).all()
    assert len(np.unique(scales)) == 48
    again = plan_passes(16, 2, hed_intensity=0.1, seed=0)
    np.testing.assert_array_equal(again[1][3].hed_scale, plan[1][3].hed_scale)
    single = plan_passes(1, 1)
    assert len(single[0]) == 1 and single[0][0].transform == 0
    assert single[0][0].hed_scale is None and not single[0][0].mc_dropout
    assert plan_passes(3, 1, hed_intensity=0)[0][2].hed_scale is None


def test_hed_rescale():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.9, (2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(hed_rescale(x, np.ones((2, 3))), x, atol=1e-5)
    # Scaling every stain amount by s scales the optical density -ln(rgb) by s.
    darker = hed_rescale(x, np.full((2, 3), 1.1))
    np.testing.assert_allclose(-np.log(darker), 1.1 * -np.log(x), rtol=1e-4)


@pytest.mark.parametrize("shape", [(64, 64), (64, 96)])
def test_tta_equals_plain_for_equivariant_model(rng, shape):
    model = _equivariant_model()
    img = _image(rng, shape)
    plain = maps_lib.predict_maps(model, img)
    assert np.abs(plain["vectors"]).max() > 1e-3  # a non-trivial vector field
    predictor = Predictor(model, CONIC, None, tta=16, mc_dropout=False, hed_intensity=0)
    mean, var = predictor.predict_maps(img, return_variance=True)
    assert set(mean) == set(plain)
    for name in plain:
        assert mean[name].shape == plain[name].shape and mean[name].dtype == np.float32
        np.testing.assert_allclose(mean[name], plain[name], atol=1e-5)
        assert var[name].max() < 1e-10
    hed = Predictor(model, CONIC, None, tta=16, mc_dropout=False, hed_intensity=0.1)
    assert np.abs(hed.predict_maps(img)["semantic"] - plain["semantic"]).max() > 1e-4


def test_each_inverted_pass_equals_plain_pass(rng):
    model = _equivariant_model()
    img = _image(rng, (64, 96))
    plain = maps_lib.predict_maps(model, img)
    for t in range(8):
        out = maps_lib.predict_maps(model, apply_transform(img, t))
        back = invert_transform(out, t)
        for name in plain:
            np.testing.assert_allclose(back[name], plain[name], atol=1e-5, err_msg=f"{name} {t}")
        if t in (1, 4):  # inverting the maps without rotating the vectors is wrong
            spatial_only = invert_transform(out, t, vector_outputs=())
            assert np.abs(spatial_only["vectors"] - plain["vectors"]).max() > 1e-3


def test_variance_and_mc_dropout_switch(rng):
    img = _image(rng)
    model = _dropout_model()
    layer = next(x for x in model.layers if isinstance(x, MCDropout))
    plain = maps_lib.predict_maps(model, img)
    mc = Predictor(model, CONIC, None, tta=4, mc_dropout=True, hed_intensity=0)
    mean, var = mc.predict_maps(img, return_variance=True)
    assert var["three_label"].max() > 1e-4
    assert np.abs(mean["three_label"] - plain["three_label"]).max() > 1e-4
    assert not layer.mc  # restored
    off = Predictor(model, CONIC, None, tta=4, mc_dropout=False, hed_intensity=0)
    mean, var = off.predict_maps(img, return_variance=True)
    assert var["three_label"].max() < 1e-10
    np.testing.assert_allclose(mean["three_label"], plain["three_label"], atol=1e-6)
    # A plain pass switches dropout off and restores a switch that was on.
    set_mc_dropout(model, True)
    single = Predictor(model, CONIC, None, tta=0).predict_maps(img)
    np.testing.assert_allclose(single["three_label"], plain["three_label"], atol=1e-6)
    assert layer.mc


def _local_model() -> keras.Model:
    """A 3x3 convolution with random weights: not equivariant, so its views differ."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    three = keras.layers.Conv2D(3, 3, padding="same", activation="softmax", name="three")(x)
    return keras.Model(inputs, {"three_label": three})


def test_two_views_average_the_image_and_its_flipped_back_mirror_image(rng):
    model = _local_model()
    img = _image(rng, (64, 96))
    plain = maps_lib.predict_maps(model, img)["three_label"]
    mirrored = maps_lib.predict_maps(model, img[:, ::-1])["three_label"][:, ::-1]
    assert np.abs(plain - mirrored).max() > 1e-3  # the views differ
    expected = (plain + mirrored) / 2
    got = Predictor(model, CONIC, None, views=2).predict_maps(img)["three_label"]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    direct = maps_lib.predict_maps(model, img, views=2)["three_label"]
    np.testing.assert_allclose(direct, expected, atol=1e-6)
    upside_down = maps_lib.predict_maps(model, img[::-1])["three_label"][::-1]
    half_turn = maps_lib.predict_maps(model, img[::-1, ::-1])["three_label"][::-1, ::-1]
    four = Predictor(model, CONIC, None, views=4, batch_size=3).predict_maps(img)["three_label"]
    np.testing.assert_allclose(four, (plain + mirrored + upside_down + half_turn) / 4, atol=1e-6)


def test_views_come_from_the_run_config(run_dirs, tmp_path):
    run = tmp_path / "views2"
    run.mkdir()
    config = RunConfig(
        "conic",
        ConicModelConfig(num_classes=4, decoder_filters=(16, 8, 8, 8, 8), dropout=0.2).to_dict(),
        DataConfig(mpp=0.25, class_names=CLASSES),
        inference=InferenceConfig(views=2),
    )
    save_config(config, run)
    (run / BEST_WEIGHTS).write_bytes((run_dirs["a"] / BEST_WEIGHTS).read_bytes())
    assert Predictor.from_run_dirs(run).views == 2
    assert Predictor.from_run_dirs(run, views=1).views == 1
    assert Predictor.from_run_dirs(run, tta=4).views == 1  # TTA passes bring their own flips
    assert Predictor.from_run_dirs(run_dirs["a"]).views == 1  # the default


def test_bad_arguments():
    model = _dropout_model()
    with pytest.raises(ValueError, match="`tta` must be an int >= 0"):
        Predictor(model, CONIC, None, tta=-1)
    with pytest.raises(ValueError, match="`hed_intensity` must be a float in"):
        Predictor(model, CONIC, None, hed_intensity=1.5)
    with pytest.raises(ValueError, match="`models` must be a keras.Model"):
        Predictor([], CONIC, None)
    with pytest.raises(ValueError, match=r"`image` must have shape \(H, W, 3\)"):
        Predictor(model, CONIC, None).predict_maps(np.zeros((8, 8), np.uint8))
    assert Predictor(model, CONIC, None, tta=True).tta == 16
    with pytest.raises(ValueError, match="`views` must be one of 1, 2, 4, 8"):
        Predictor(model, CONIC, None, views=3)
    with pytest.raises(ValueError, match="`views` must be 1 with test-time augmentation"):
        Predictor(model, CONIC, None, tta=4, views=2)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Two tiny conic runs with different weights and one with other cell types."""
    root = tmp_path_factory.mktemp("runs")
    model_cfg = ConicModelConfig(num_classes=4, decoder_filters=(16, 8, 8, 8, 8), dropout=0.2)
    config = RunConfig("conic", model_cfg.to_dict(), DataConfig(mpp=0.25, class_names=CLASSES))
    keras.utils.set_random_seed(0)
    model = build_model(config)
    rng = np.random.default_rng(5)
    dirs = {}
    for name in ("a", "b"):
        run = root / name
        run.mkdir()
        save_config(config, run)
        model.save_weights(run / BEST_WEIGHTS)
        model.set_weights([w + rng.normal(0, 0.05, w.shape) for w in model.get_weights()])
        dirs[name] = run
    other = root / "c"
    other.mkdir()
    save_config(
        RunConfig("conic", model_cfg.to_dict(), DataConfig(mpp=0.25, class_names={1: "x"})), other
    )
    (other / BEST_WEIGHTS).write_bytes((dirs["a"] / BEST_WEIGHTS).read_bytes())
    dirs["c"] = other
    ConicPostprocConfig().save(dirs["a"] / "postproc.json")
    return dirs


@pytest.fixture(scope="module")
def ensemble(run_dirs):
    return Predictor.from_run_dirs([run_dirs["a"], run_dirs["b"]], tta=0)


def test_ensemble_averages_plain_outputs(ensemble, rng):
    img = _image(rng)
    assert len(ensemble.models) == 2 and ensemble.mpp == 0.25
    assert ensemble.data_config.class_names == CLASSES
    first = maps_lib.predict_maps(ensemble.models[0], img)
    second = maps_lib.predict_maps(ensemble.models[1], img)
    assert np.abs(first["semantic"] - second["semantic"]).max() > 1e-4
    mean, var = ensemble.predict_maps(img, return_variance=True)
    for name in ("semantic", "three_label", "vectors"):
        np.testing.assert_allclose(mean[name], (first[name] + second[name]) / 2, atol=1e-6)
        # Two equally weighted values: variance = (difference / 2)^2.
        np.testing.assert_allclose(var[name], ((first[name] - second[name]) / 2) ** 2, atol=1e-6)


def test_predict_instances_on_consep_patch(ensemble, shared_data):
    data = Dataset(shared_data / "consep")
    img = data.image(data.ids[0])[:64, :64]
    tta = Predictor(
        ensemble.models, CONIC, ensemble.postproc, ensemble.data_config, tta=2, batch_size=2
    )
    result = tta.predict_instances(img)
    assert isinstance(result, PostprocResult)
    assert result.instances.shape == (64, 64) and result.instances.dtype == np.int32
    assert result.classes.shape == (64, 64)
    assert result.table["probabilities"].shape == (result.num_instances, 5)
    batch = ensemble.predict_instances_batch(np.stack([img, img[::-1]]))
    assert len(batch) == 2 and batch[1].instances.shape == (64, 64)


def test_mismatched_ensemble_raises(run_dirs, tmp_path):
    with pytest.raises(KerasnucError, match="cell types differ"):
        Predictor.from_run_dirs([run_dirs["a"], run_dirs["c"]])
    with pytest.raises(KerasnucError, match="missing"):
        Predictor.from_run_dirs([run_dirs["a"], tmp_path])


def test_fingerprint_names_the_weights_and_every_setting_that_changes_results():
    """``predict --resume`` reuses earlier outputs only for an equal fingerprint (issue 20)."""
    postproc = ConicPostprocConfig()
    data = DataConfig(mpp=0.5, class_names=CLASSES)
    model = _equivariant_model()
    base = Predictor(model, CONIC, postproc, data).fingerprint()
    # Equal for the same weights in another model object (a rerun loads the run again).
    twin = _equivariant_model()
    assert Predictor(twin, CONIC, postproc, data).fingerprint() == base
    assert json.loads(json.dumps(base)) == base  # stored in the summary as JSON
    # Other weights: one kernel value changed.
    kernel = twin.get_layer("semantic").kernel
    kernel.assign(kernel.numpy() + np.float32(1e-3))
    changed = {
        "weights": Predictor(twin, CONIC, postproc, data),
        "tta": Predictor(model, CONIC, postproc, data, tta=4),
        "mc_dropout": Predictor(model, CONIC, postproc, data, tta=4, mc_dropout=False),
        "postproc": Predictor(model, CONIC, ConicPostprocConfig(fg_threshold=0.4), data),
        "mpp": Predictor(model, CONIC, postproc, DataConfig(mpp=0.25, class_names=CLASSES)),
        "ensemble": Predictor([model, twin], CONIC, postproc, data),
        "views": Predictor(model, CONIC, postproc, data, views=2),
    }
    prints = {name: p.fingerprint() for name, p in changed.items()}
    for name, fp in prints.items():
        assert fp != base, name
    assert prints["tta"] != prints["mc_dropout"]
