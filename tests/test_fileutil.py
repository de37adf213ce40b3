import numpy as np
import pytest

from kerasnuc.fileutil import KerasnucError, atomic_path, read_image, write_json_atomic, write_png


def test_atomic_path_commits_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("hello")
        assert not target.exists()
    assert target.read_text() == "hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert target.read_text().strip() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, np.iinfo(dtype).max, (5, 7)).astype(dtype)
    write_png(tmp_path / "g.png", grey)
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), grey)
    rgb = np.zeros((4, 4, 3), dtype)
    rgb[..., 0] = 9  # red channel stays red (no BGR swap leaks out)
    write_png(tmp_path / "c.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), rgb)


def test_read_image_errors(tmp_path):
    with pytest.raises(KerasnucError, match="x.png: file not found"):
        read_image(tmp_path / "x.png")
    (tmp_path / "y.tif").write_bytes(b"not a tiff")
    with pytest.raises(KerasnucError, match="y.tif: cannot read TIFF"):
        read_image(tmp_path / "y.tif")
