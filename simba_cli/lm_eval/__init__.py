"""lm-eval's own command line with the `simba` model registered.

    python -m simba_cli.lm_eval run --model simba --model_args pretrained=zoo-m,schedule=linear,final_keep=0.1 \\
        --tasks simba_choice --include_path "$(python -m simba_cli.lm_eval tasks-path)"
"""
