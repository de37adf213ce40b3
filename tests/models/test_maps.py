import numpy as np

from kerasnuc.models.maps import crop_maps, pad_to_multiple, predict_maps, predict_maps_batch


def test_pad_to_multiple_and_crop():
    img = np.arange(5 * 7 * 3).reshape(5, 7, 3)
    padded, size = pad_to_multiple(img, 4)
    assert padded.shape == (8, 8, 3) and size == (5, 7)
    np.testing.assert_array_equal(padded[:5, :7], img)
    np.testing.assert_array_equal(padded[5, :7], img[3])  # reflect: row 5 mirrors row 3
    same, size = pad_to_multiple(np.zeros((8, 4, 3)), 4)
    assert same.shape == (8, 4, 3) and size == (8, 4)
    tiny, _ = pad_to_multiple(np.ones((2, 2, 3)), 32)  # shorter than the pad: edge mode
    assert tiny.shape == (32, 32, 3) and (tiny == 1).all()
    out = crop_maps({"a": np.zeros((2, 8, 8, 1))}, (5, 7))
    assert out["a"].shape == (2, 5, 7, 1)


def test_predict_maps_with_a_model():
    import keras

    inputs = keras.Input((None, None, 3))
    outputs = {
        "mean": keras.layers.Lambda(lambda x: keras.ops.mean(x, axis=-1, keepdims=True))(inputs),
        "red": keras.layers.Lambda(lambda x: x[..., :1])(inputs),
    }
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    maps = predict_maps(model, img)
    assert maps["mean"].shape == (50, 70, 1) and maps["mean"].dtype == np.float32
    np.testing.assert_allclose(maps["mean"][..., 0], img.mean(-1) / 255.0, atol=1e-6)
    batch = predict_maps_batch(model, np.stack([img, img[::-1]]), batch_size=1)
    np.testing.assert_allclose(batch["red"][1, ..., 0], img[::-1, :, 0] / 255.0, atol=1e-6)


def test_forward_function_traces_once_and_equals_the_eager_model():
    import keras

    from kerasnuc.layers.dropout import MCDropout
    from kerasnuc.models.maps import forward_function

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = MCDropout(0.5)(x)
    model = keras.Model(inputs, {"out": keras.layers.Conv2D(2, 1)(x)})
    rng = np.random.default_rng(1)
    fn = forward_function(model)
    assert forward_function(model) is fn  # cached per model
    for shape in [(1, 32, 32, 3), (3, 64, 96, 3), (2, 32, 64, 3)]:
        batch = rng.random(shape, dtype=np.float32)
        np.testing.assert_allclose(
            np.asarray(fn(batch)["out"]),
            np.asarray(model(batch, training=False)["out"]),
            rtol=1e-5,
            atol=1e-6,
        )
    # one trace serves every batch size and tile shape (no retracing per tile)
    assert fn.experimental_get_tracing_count() == 1
