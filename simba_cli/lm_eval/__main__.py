"""Register the `simba` model, then hand the arguments to lm-eval's CLI unchanged.

`python -m simba_cli.lm_eval tasks-path` prints the directory of the offline tasks (an --include_path).
Bad input to the simba model (a missing model, a bad setting) ends as one line `error: ...` on stderr
with exit code 2, as in the `simba` command line. Under torchrun (data parallel, see `simba_cli.eval.lm`), rank 0
alone prints and writes lm-eval's results.
"""

import sys

from simba_cli.distributed import is_main_process
from simba_cli.errors import UserError


def run():
    if sys.argv[1:2] == ["tasks-path"]:
        from simba_cli.eval.tasks import build_tasks

        print(build_tasks())
        return
    from lm_eval.__main__ import cli_evaluate

    import simba_cli.eval.lm as simba_lm  # registers the model "simba"
    from simba_cli.distributed import world_size

    if world_size() > 1 and any(a == "--use_cache" or a.startswith("--use_cache=") for a in sys.argv[1:]):
        # lm-eval keeps a cache per process: ranks would find different requests left and wait on each other
        raise UserError("--use_cache does not work under torchrun (each process has its own cache and they would "
                        "wait on each other); leave it out or run one process")

    simba_lm.KEEP_INSTANCES = True
    cli_evaluate()
    if not is_main_process():  # under torchrun every process ran everything (see eval.lm); rank 0 reports
        return
    for lm in simba_lm.INSTANCES:  # what really ran: lm-eval's own results know nothing of FLOPs
        m = lm.measured()
        keep = f", mean keep {m['mean_keep']:.3f}" if "mean_keep" in m else ""
        print(f"simba {lm.config.label()}: {m.get('flops', 0):.4g} FLOPs measured in {m['forwards']} forwards{keep}")


def main():
    try:
        run()
    except UserError as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
