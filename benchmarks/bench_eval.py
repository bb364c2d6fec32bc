"""`make bench-eval`: evaluation throughput of the `simba` model (schedule none) against lm-eval's `hf`
model on the same weights in float32 (the middle zoo model, Hugging Face format), task and batch size; medians
of rounds taken in turns. The simba model scores in protect mode (logits at the continuation only, as a pruned
run must); `hf` computes logits at every position: the figure measures the adapter as well as the model.

    eval_throughput_vs_hf   requests/s of simba / requests/s of hf        target >= 2
"""

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write  # noqa: E402


def main(model: str = "zoo-m", task: str = "simba_choice", limit: int = 60, batch_size: int = 16, rounds: int = 3):
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from simba_cli.eval.harness import flat_metrics, task_dict
    from simba_cli.eval.lm import SimbaLM
    from simba_cli.models import zoo

    tasks = task_dict([task])
    # the same weights in the same precision: the zoo stores bfloat16, which HFLM's dtype "auto" would keep
    models = {"simba": SimbaLM(pretrained=model, batch_size=batch_size, device="cpu"),
              "hf": HFLM(pretrained=str(zoo.path(model)), batch_size=batch_size, device="cpu", dtype="float32")}
    for lm in models.values():  # first calls (numba, lm-eval's task set-up) outside the timings
        evaluate(lm, tasks, limit=4, bootstrap_iters=0, verbosity="WARNING")
    times, metrics = {name: [] for name in models}, {}
    for _ in range(rounds):  # in turns, so that both see the same machine
        for name, lm in models.items():
            t = time.perf_counter()
            res = evaluate(lm, tasks, limit=limit, bootstrap_iters=0, verbosity="WARNING")
            times[name].append(time.perf_counter() - t)
            metrics[name] = flat_metrics(res)[task]
    n_requests = len(tasks["tasks"][task].instances)
    figures = {}
    for name in models:
        seconds = statistics.median(times[name])
        figures[f"{name}_s"] = seconds
        figures[f"{name}_requests_per_s"] = n_requests / seconds
        print(f"{name}: {n_requests} requests in {seconds:.2f} s (median of {rounds}; {n_requests / seconds:.1f}/s), "
              f"{metrics[name]}", flush=True)
    figures["eval_throughput_vs_hf"] = figures["simba_requests_per_s"] / figures["hf_requests_per_s"]
    figures["same_accuracy"] = metrics["simba"].get("acc") == metrics["hf"].get("acc")
    figures.update(model=model, task=task, limit=limit, batch_size=batch_size, rounds=rounds, dtype="float32",
                   metrics=metrics)
    write("eval", figures)


if __name__ == "__main__":
    main()
