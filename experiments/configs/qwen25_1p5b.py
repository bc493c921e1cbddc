r"""HM3 on the paper's Qwen2.5-1.5B setting: Instruct, Math and Coder experts of Qwen2.5-1.5B, the paper's budget.

    python -m experiments.plan --config=experiments/configs/qwen25_1p5b.py:SPEC.yaml --mesh=paths:8 \
        --device_memory_gb=32                                      # will it fit? (config.json + data only)
    python -m experiments.run_hm3 --config=experiments/configs/qwen25_1p5b.py:SPEC.yaml --workdir=runs/qwen25
    python -m experiments.plan --config=experiments/configs/qwen25_1p5b.py:shapes --mesh=paths:8 \
        --device_memory_gb=32                                      # plan before downloading anything

`SPEC.yaml[,smoke]` as experiments/configs/checkpoints.py (this config is its config plus the paper's budget,
`paper_tasks.add_paper_budget`: 15 preferences, 1000 episodes per preference, t_max = 2 L = 56); `shapes`
writes a spec of these checkpoints' config.json files and the tasks' token lengths (no weights; for
experiments.plan only) to $TMPDIR/hm3_jax_shapes/qwen25_1p5b.

The spec (the experts share Qwen2.5's 151,936-row vocabulary and tokenizer, so no `tokenizer_source`):

    base: qwen2.5-1.5b               # Qwen/Qwen2.5-1.5B
    experts:
      chat: qwen2.5-1.5b-instruct    # Qwen/Qwen2.5-1.5B-Instruct
      math: qwen2.5-math-1.5b        # Qwen/Qwen2.5-Math-1.5B (see below)
      code: qwen2.5-coder-1.5b       # Qwen/Qwen2.5-Coder-1.5B
    dtype: bfloat16
    eval_batch_size: 16
    tasks: ...                       # paper_tasks.py: the tasks, their data and the JSONL rows

Math expert: Qwen2.5-Math was trained further with a 4K context and RoPE base 1e4 (its config.json:
rope_theta 10000, 4096 positions; Qwen2.5-Math-7B's as read here), while Qwen2.5-1.5B uses 1e6; hm3_jax runs
every pool block with the shell's RoPE, so the spec refuses it ("expert 'math': rope_theta is 10000.0 but the
base's is 1000000.0") and so does the plan. Use a math fine-tune of Qwen2.5-1.5B that kept the base's RoPE, or
run the paper's expert once hm3_jax carries a RoPE table per source (not implemented). Qwen2 tokenizers add no
BOS; prompts are tokenised as the base's tokenizer does.

Checkpoints and data (copy them to every host at the same path):

    huggingface-cli download Qwen/Qwen2.5-1.5B --local-dir qwen2.5-1.5b        # and the experts
    # then paper_tasks.py's script writes data/*.jsonl next to spec.yaml

Launch. TPU v4-16 (8 chips of 32 GiB, 2 hosts; docs/scaling.md has the plans):

    launch/create_tpu_vm.sh --name=hm3 --zone=us-central2-b --accelerator_type=v4-16
    launch/setup_tpu_vm.sh --name=hm3 --zone=us-central2-b
    launch/run_tpu.sh --name=hm3 --zone=us-central2-b -- experiments.plan \
        --config=experiments/configs/qwen25_1p5b.py:/data/qwen25/spec.yaml --mesh=paths:8 --simulate=false
    launch/run_tpu.sh --name=hm3 --zone=us-central2-b -- experiments.run_hm3 \
        --config=experiments/configs/qwen25_1p5b.py:/data/qwen25/spec.yaml --workdir=gs://BUCKET/hm3_qwen25 \
        --mesh=paths:8

One GPU host with 8 x 80 GB:

    python -m experiments.plan --config=experiments/configs/qwen25_1p5b.py:/data/qwen25/spec.yaml --mesh=paths:8 \
        --simulate=false
    python -m experiments.run_hm3 --config=experiments/configs/qwen25_1p5b.py:/data/qwen25/spec.yaml \
        --workdir=runs/hm3_qwen25 --mesh=paths:8
"""

import ml_collections

from experiments.configs import paper_tasks

_QWEN25_1P5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "intermediate_size": 8960,
    "max_position_embeddings": 131072, "max_window_layers": 28, "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
_32K = {"max_position_embeddings": 32768, "sliding_window": 32768}
# config.json hyperparameters of the checkpoints (shapes only: the fields the spec requires equal are the base's;
# see the docstring for Qwen2.5-Math's RoPE).
HF_CONFIGS = {
    "base": _QWEN25_1P5B,
    "chat": {**_QWEN25_1P5B, **_32K, "eos_token_id": 151645, "max_window_layers": 21},
    "math": {
        **_QWEN25_1P5B,
        "max_position_embeddings": 4096,
        "sliding_window": 4096,
        "max_window_layers": 21,
    },
    "code": {**_QWEN25_1P5B, **_32K},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` = "SPEC.yaml", "SPEC.yaml,smoke" (checkpoints.py's quick check) or "shapes" (see the docstring)."""
    return paper_tasks.get_paper_config(arg, "qwen25_1p5b", HF_CONFIGS, add_bos=False)
