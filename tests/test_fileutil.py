import os
import stat

import numpy as np
import pytest

from kerasnuc.fileutil import (
    KerasnucError,
    atomic_dir,
    atomic_path,
    read_image,
    write_json_atomic,
    write_png,
)


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


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    """Run the test under a given umask (restored afterwards)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_outputs_follow_the_umask(tmp_path, umask):
    """Files get 0o666 & ~umask and folders 0o777 & ~umask, as `touch` and `mkdir` would."""
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask
    write_png(tmp_path / "b.png", np.zeros((2, 2), np.uint8))
    assert stat.S_IMODE((tmp_path / "b.png").stat().st_mode) == 0o666 & ~umask
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "d" / "x.txt").stat().st_mode) == 0o666 & ~umask
    with atomic_dir(tmp_path / "d", overwrite=True) as tmp:  # replacing keeps the rule
        pass
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
