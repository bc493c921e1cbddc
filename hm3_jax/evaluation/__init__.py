"""Evaluation of hm3_jax models by other tools: lm-evaluation-harness (`lm_eval_model`, registered as
`--model hm3_jax`; needs the `lm-eval` package), on the batched token-request engine of `token_requests`.

Nothing is imported here, so `hm3_jax.evaluation.token_requests` works without lm-eval installed."""
