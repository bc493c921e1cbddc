r"""lm-evaluation-harness's own command line with hm3_jax registered as `--model hm3_jax`.

  python -m experiments.harness_eval --model hm3_jax --model_args pretrained=out/merged --tasks gsm8k
  python -m experiments.harness_eval --model hm3_jax --model_args run=runs/x,preference=0.6:0.3:0.1 \
      --tasks my_task --include_path my_tasks/ --batch_size 16 --output_path results/
  python -m experiments.harness_eval --model hm3_jax --tasks my_task --include_path my_tasks/ \
      --model_args "pretrained=out/merged,mesh='data:2,model:4'"     # 8 devices: quote the mesh's commas

Every flag is the harness's (`lm_eval --help`); `model_args` are `hm3_jax.evaluation.lm_eval_model`'s. A bad
`model_args` is one line `error: ...` naming the key or file, exit code 2 (as the harness's own usage errors).
"""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

from experiments import cli_errors
from hm3_jax.evaluation import lm_eval_model  # noqa: F401  (registers --model hm3_jax)
from hm3_jax.evaluation.sources import ModelArgsError


def main() -> None:
    with cli_errors.user_errors(ModelArgsError):
        cli_evaluate()


if __name__ == "__main__":
    main()
