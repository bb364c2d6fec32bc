"""Register the `simba` model, then hand the arguments to lm-eval's CLI unchanged.

`python -m simba_cli.lm_eval tasks-path` prints the directory of the offline tasks (an --include_path).
"""

import sys


def main():
    if sys.argv[1:2] == ["tasks-path"]:
        from simba_cli.eval.tasks import build_tasks

        print(build_tasks())
        return
    from lm_eval.__main__ import cli_evaluate

    import simba_cli.eval.lm  # noqa: F401  (registers the model "simba")

    cli_evaluate()


if __name__ == "__main__":
    main()
