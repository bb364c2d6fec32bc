import gzip
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simba_cli.cli import app
from simba_cli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


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


# --- binary data files ---

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


def random_bytes(n: int = 20000) -> bytes:
    return random.Random(0).randbytes(n)


@pytest.mark.parametrize("name, payload", [
    ("noise.txt", random_bytes()),
    ("noise", random_bytes()),
    ("noise.md", random_bytes().replace(b"\0", b"")),  # no NUL: most of it is not UTF-8
    ("book.txt", gzip.compress(TEXT.encode() * 5, mtime=0)),
])
def test_a_binary_file_is_not_training_text(tmp_path, name, payload):
    from simba_cli.data.corpus import load_texts

    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(UserError) as e:
        load_texts(str(path))
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "text file" in message


def test_a_binary_file_in_a_directory_is_named(tmp_path):
    from simba_cli.data.corpus import load_texts

    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_bytes(gzip.compress(TEXT.encode(), mtime=0))
    with pytest.raises(UserError) as e:
        load_texts(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "sub" / "b.md") in message and "text file" in message


def test_text_with_a_few_bad_bytes_still_loads(tmp_path):
    from simba_cli.data.corpus import load_texts

    path = tmp_path / "latin.txt"
    path.write_bytes(TEXT.replace("question", "qu\xe9stion").encode("latin-1"))
    docs = load_texts(str(path))
    assert docs and "qu\ufffdstion" in docs[0]


# --- lm-eval's own command line ---

def test_lm_eval_command_line_reports_a_user_error_in_one_line():
    from simba_cli.eval.tasks import build_tasks

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "simba_cli.lm_eval", "run", "--model", "simba", "--model_args",
                        "pretrained=/nonexistent", "--tasks", "simba_choice", "--include_path", str(build_tasks())],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "/nonexistent" in errors[0], r.stderr[-2000:]


# --- lm-eval hub tasks without the hub ---

_UNREACHABLE = """
import time
import lm_eval.tasks
from simba_cli.errors import UserError
from simba_cli.eval import harness

harness.hub_reachable = lambda: False
indexing = []

class TimedManager(lm_eval.tasks.TaskManager):  # indexing lm-eval's tasks is slow on a busy machine
    def __init__(self, *args, **kwargs):
        t = time.monotonic()
        super().__init__(*args, **kwargs)
        indexing.append(time.monotonic() - t)

lm_eval.tasks.TaskManager = TimedManager
t = time.monotonic()
try:
    harness.task_dict(["piqa"])
    print("loaded")
except UserError as e:
    print(f"{time.monotonic() - t - sum(indexing):.2f}")
    print(e)
"""


def test_hub_task_without_the_hub_fails_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(ROOT), TQDM_DISABLE="1", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    r = subprocess.run([sys.executable, "-c", _UNREACHABLE], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, r.stdout + r.stderr[-2000:]
    seconds, message = float(lines[0]), lines[1]
    assert seconds < 10, r.stdout + r.stderr[-2000:]
    assert message.startswith("cannot load lm-eval task(s) piqa") and "simba_choice" in message
    assert "Retrying" not in r.stderr


def test_hub_reachable_is_false_in_offline_mode(monkeypatch):
    from simba_cli.eval import harness

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert harness.hub_reachable() is False


def test_offline_tasks_never_ask_for_the_hub(monkeypatch):
    from simba_cli.eval import harness

    def no_hub():
        raise AssertionError("the offline tasks asked whether the hub is reachable")

    monkeypatch.setattr(harness, "hub_reachable", no_hub)
    loaded = harness.task_dict(["simba_choice"])
    assert list(loaded["tasks"]) == ["simba_choice"]
