"""`kerasnuc predict --server` against a local stand-in of TF Serving's REST API.

The stand-in (``tests.serving.test_client._Handler``) runs the exported SavedModel; local and
server prediction of the same image must give the same nuclei.
"""

import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.data.dataset import Dataset
from kerasnuc.fileutil import read_image, write_png
from kerasnuc.runs import load_run
from kerasnuc.serving.export import export_metadata, save_serving_model
from tests.serving.test_client import _Handler
from tests.serving.test_export import make_tiny_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server_and_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    run_dir = make_tiny_run(root / "run")
    run = load_run(run_dir)
    path = save_serving_model(
        run.model, root / "tiny" / "1", export_metadata(run, "tiny", 1), warmup_shapes=None
    )
    served = {"loaded": tf.saved_model.load(str(path)), "lock": threading.Lock()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.served, server.requests, server.fail_next = served, [], 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", run_dir
    server.shutdown()
    server.server_close()


def test_local_and_server_prediction_agree(server_and_run, shared_data, tmp_path):
    url, run_dir = server_and_run
    ds = Dataset(shared_data / "consep")
    img = tmp_path / "in" / "tile.png"
    write_png(img, ds.image(ds.split("val")[0])[:128, :160])
    runner = CliRunner()
    local = runner.invoke(
        main,
        [
            "predict",
            str(img),
            "--model",
            str(run_dir),
            "--out",
            str(tmp_path / "local"),
            "--mpp",
            "0.5",
        ],
    )
    assert local.exit_code == 0, local.output
    remote = runner.invoke(
        main,
        [
            "predict",
            str(img),
            "--model",
            "tiny",
            "--server",
            url,
            "--out",
            str(tmp_path / "remote"),
            "--mpp",
            "0.5",
        ],
    )
    assert remote.exit_code == 0, remote.output
    a = read_image(tmp_path / "local" / "tile" / "tile.instances.ome.tif")
    b = read_image(tmp_path / "remote" / "tile" / "tile.instances.ome.tif")
    assert a.shape == (128, 160)
    np.testing.assert_array_equal(a, b)
    la = (tmp_path / "local" / "tile" / "tile.csv").read_text().splitlines()
    lb = (tmp_path / "remote" / "tile" / "tile.csv").read_text().splitlines()
    assert len(la) == len(lb)


def test_unreachable_server_is_one_line(tmp_path):
    img = tmp_path / "x.png"
    write_png(img, np.full((64, 64, 3), 200, np.uint8))
    res = CliRunner().invoke(
        main,
        [
            "predict",
            str(img),
            "--model",
            "tiny",
            "--server",
            "http://127.0.0.1:9",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 1
    assert "Error: TF Serving http://127.0.0.1:9" in res.output
    assert "Traceback" not in res.output
