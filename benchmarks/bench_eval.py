"""`make bench-eval`: evaluation throughput of the `simba` model (schedule none) against lm-eval's `hf`
model on the same weights (the middle zoo model, Hugging Face format), task and batch size.

    eval_throughput_vs_hf   requests/s of simba / requests/s of hf        target >= 2
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write  # noqa: E402


def main(model: str = "zoo-m", task: str = "simba_choice", limit: int = 60, batch_size: int = 16):
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from simba_cli.eval.harness import flat_metrics, task_dict
    from simba_cli.eval.lm import SimbaLM
    from simba_cli.models import zoo

    tasks = task_dict([task])
    models = {"simba": SimbaLM(pretrained=model, batch_size=batch_size, device="cpu"),
              "hf": HFLM(pretrained=str(zoo.path(model)), batch_size=batch_size, device="cpu")}
    figures, metrics = {}, {}
    for name, lm in models.items():
        t = time.perf_counter()
        res = evaluate(lm, tasks, limit=limit, bootstrap_iters=0, verbosity="WARNING")
        seconds = time.perf_counter() - t
        n_requests = len(tasks["tasks"][task].instances)
        figures[f"{name}_s"] = seconds
        figures[f"{name}_requests_per_s"] = n_requests / seconds
        metrics[name] = flat_metrics(res)[task]
        print(f"{name}: {n_requests} requests in {seconds:.1f} s ({n_requests / seconds:.1f}/s), {metrics[name]}",
              flush=True)
    figures["eval_throughput_vs_hf"] = figures["simba_requests_per_s"] / figures["hf_requests_per_s"]
    figures["same_accuracy"] = metrics["simba"].get("acc") == metrics["hf"].get("acc")
    figures.update(model=model, task=task, limit=limit, batch_size=batch_size, metrics=metrics)
    write("eval", figures)


if __name__ == "__main__":
    main()
