import subprocess
import sys

from click.testing import CliRunner

from kerasnuc import __version__
from kerasnuc.cli import main


def test_version_and_help():
    runner = CliRunner()
    res = runner.invoke(main, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0 and "data" in res.output


def test_help_does_not_import_tensorflow():
    code = (
        "import sys; from click.testing import CliRunner; from kerasnuc.cli import main; "
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0; "
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
