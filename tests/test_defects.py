from typer.testing import CliRunner

from simba_cli.cli import app


def test_version_option_prints_the_version_and_exits_0():
    import simba_cli

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"simba {simba_cli.version()}"
    assert simba_cli.version()[0].isdigit()
    bare = CliRunner().invoke(app, [])  # no arguments still shows the help
    assert "Usage" in bare.output and "prune" in bare.output


def test_version_falls_back_to_the_source_tree(monkeypatch):
    import importlib.metadata

    import simba_cli

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert simba_cli.version() == simba_cli.__version__
