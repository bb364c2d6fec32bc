"""Data parallel evaluation: `simba eval` and `simba compare` under torchrun (two gloo processes) give the
results, measured FLOPs and keep ratios of one process; rank 0 alone prints and writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simba_cli.data.bpe import train_bpe
from simba_cli.distributed import Dist
from simba_cli.errors import UserError
from simba_cli.models.checkpoint import save_checkpoint
from tests.conftest import random_model, tiny_config
from tests.test_eval import TEXT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny random Mambas with one local tokenizer: a ladder for compare."""
    tmp = tmp_path_factory.mktemp("dp")
    tok = train_bpe(TEXT, 300)
    small = save_checkpoint(random_model(tiny_config(vocab_size=304, n_layer=3), 1), tmp / "s", fmt="hf",
                            tokenizer=tok)
    big = save_checkpoint(random_model(tiny_config(vocab_size=304, n_layer=4, d_model=48), 2), tmp / "b",
                          fmt="hf", tokenizer=tok)
    return small, big


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on a free port; one thread each, as `one_and_two` gives the one-process run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), "-m", "simba_cli.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True)


def assert_same(one, two, where="", skip=("provenance", "elapsed_s", "compute_s", "seconds", "part_seconds")):
    """Equal structures: integers (FLOPs, token counts) exactly, floats to rounding; times and provenance aside."""
    if isinstance(one, dict):
        assert set(one) == set(two), where
        for k in one:
            if k not in skip:
                assert_same(one[k], two[k], f"{where}.{k}", skip)
    elif isinstance(one, list):
        assert len(one) == len(two), where
        for i, (a, b) in enumerate(zip(one, two)):
            assert_same(a, b, f"{where}[{i}]", skip)
    elif isinstance(one, float):
        assert two == pytest.approx(one, rel=1e-6, abs=1e-9, nan_ok=True), where
    else:
        assert one == two, where


def test_spread_in_one_process_is_a_plain_map_in_order():
    assert list(Dist().spread([3, 1, 2], lambda x: 10 * x)) == [(3, 30), (1, 10), (2, 20)]


class _Pair(Dist):
    """Rank 0 of two, the other process simulated: it computes `other(item)` (or fails with `fails`)."""

    def __init__(self, other, fails=None):
        super().__init__(0, 2)
        self.other, self.fails, self.items = other, fails, []

    def all_gather(self, obj):
        item = self.items.pop(0)
        return [obj, (self.fails, None) if self.fails else (None, None if item is None else self.other(item))]


def test_spread_deals_items_in_turn_and_an_error_anywhere_ends_every_process():
    from simba_cli.distributed import RankFailed

    pair = _Pair(lambda x: -x)
    items = [1, 2, 3]
    pair.items = [2, None]  # what the other process takes in each round: item 2, then nothing (3 items)
    assert list(pair.spread(items, lambda x: 10 * x)) == [(1, 10), (2, -2), (3, 30)]
    failing = _Pair(lambda x: x, fails="RuntimeError: out of memory")
    failing.items = [2]
    with pytest.raises(RankFailed, match="process 1 of 2 failed: RuntimeError: out of memory"):
        list(failing.spread(items, lambda x: x))
    mine = _Pair(lambda x: x)
    mine.items = [2]
    with pytest.raises(ZeroDivisionError):  # this process's own error, as itself
        list(mine.spread(items, lambda x: 1 / 0))


def one_and_two(args: list[str], tmp_path: Path, result: str) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """The command run by one process (out: tmp_path/one) and by two under torchrun (tmp_path/two): both
    `result` files, and the two-process run (for its printed output).

    The one process is a fresh one with one thread, as each rank is, so that the two runs differ in nothing but
    the sharing of work. (Inside the test process, with numba's cache empty, it once compiled the RMSNorm kernel
    afresh while the ranks loaded the cached build, which summed in another order: an ulp apart, which the
    equality below refuses. The kernel now sums in float64: tests/test_ops.py.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "simba_cli.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         cwd=ROOT, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    return tuple(json.loads((tmp_path / d / result).read_text()) for d in ("one", "two")) + (two,)


def test_eval_with_two_gloo_processes_equals_one(models, tmp_path):
    _, model = models
    # batches of 2: the ranks take turns, and the last round leaves one of them idle
    args = ["eval", str(model), "--tasks", "simba_choice", "--limit", "5", "--batch-size", "2",
            "--schedule", "linear", "--final-keep", "0.5", "--ppl-contexts", "48,64", "--ppl-score-last", "16",
            "--ppl-windows", "5", "--quiet"]
    a, b, two = one_and_two(args, tmp_path, "results.json")
    assert_same(a, b)  # metrics, stderrs, per-task and total measured FLOPs, keep ratios, perplexity windows
    assert b["tasks"]["simba_choice"]["measured"]["flops"] == a["tasks"]["simba_choice"]["measured"]["flops"] > 0
    assert b["measured"]["forwards"] == a["measured"]["forwards"]  # the batches of one process, shared out
    assert b["provenance"]["world_size"] == 2
    # rank 0 alone prints: each table once, and nothing on stderr but torchrun's own lines
    assert two.stdout.count("what ran (measured)") == 1 and two.stdout.count("results in") == 1, two.stdout
    assert "error" not in two.stderr.lower() and "warn" not in two.stderr.lower(), two.stderr[-2000:]


def test_compare_with_two_gloo_processes_equals_one(models, tmp_path):
    small, big = models
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"""models: [{small}, {big}]
tasks: [simba_choice, simba_passkey_exact]
limit: 2
final_keeps: [0.5]
criteria: [simba, recent]
truncate: false
match_flops: false
ppl_contexts: [48]
ppl_score_last: 16
ppl_windows: 3
ppl_criteria: [simba]
batch_size: 3
""")
    args = ["compare", "--recipe", str(recipe), "--quiet"]
    a, b, two = one_and_two(args, tmp_path, "summary.json")
    assert_same(a, b)  # rows (metrics, FLOPs, keep ratios), paired differences, perplexity, breakdowns
    assert all(row["flops_per_doc"] > 0 for row in b["rows"]) and b["breakdown"]  # the pass key by length, depth
    parts = sorted(p.name for p in (tmp_path / "one" / "parts").iterdir())
    assert sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) == parts
    for name in parts:
        assert_same(json.loads((tmp_path / "one" / "parts" / name).read_text()),
                    json.loads((tmp_path / "two" / "parts" / name).read_text()), name)
    assert two.stdout.count("summary.json in") == 1, two.stdout
    # an error every process meets is said once
    again = torchrun([*args, "--out", str(tmp_path / "two")])
    assert again.returncode != 0 and again.stderr.count("error: ") == 1, again.stderr[-2000:]
    assert "--overwrite" in again.stderr


def test_each_process_takes_its_own_gpu_whatever_index_was_asked(monkeypatch):
    """lm-eval hands every process device cuda:0: under torchrun each must still take cuda:LOCAL_RANK (two
    processes on one GPU make NCCL fail)."""
    import torch
    import torch.distributed as dist

    from simba_cli import distributed

    chosen = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for asked in (torch.device("cuda", 0), torch.device("cuda")):
        dd, device = distributed.setup(asked)
        assert device == torch.device("cuda", 1) and (dd.rank, dd.world) == (1, 2)
    assert chosen == [torch.device("cuda", 1)] * 2


def test_lm_eval_cache_is_refused_under_torchrun(monkeypatch):
    """lm-eval keeps one cache per process: the processes would find different work left and wait on each other."""
    from simba_cli import distributed
    from simba_cli.lm_eval import __main__ as entry

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(sys, "argv", ["simba-lm-eval", "run", "--model", "simba", "--use_cache", "c"])
    with pytest.raises(UserError, match="--use_cache does not work under torchrun"):
        entry.run()
