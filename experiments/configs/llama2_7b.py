r"""HM3 on the paper's Llama-2-7B setting: chat, math and code experts of Llama-2-7B, the paper's budget.

    python -m experiments.plan --config=experiments/configs/llama2_7b.py:SPEC.yaml --mesh=paths:2,model:4 \
        --device_memory_gb=32                                      # will it fit? (config.json + data only)
    python -m experiments.run_hm3 --config=experiments/configs/llama2_7b.py:SPEC.yaml --workdir=runs/llama2_7b
    python -m experiments.plan --config=experiments/configs/llama2_7b.py:shapes --mesh=paths:2,model:8 \
        --device_memory_gb=32                                      # plan before downloading anything

`SPEC.yaml[,smoke]` as experiments/configs/checkpoints.py (this config is its config plus the paper's budget,
`paper_tasks.add_paper_budget`: 15 preferences, 1000 episodes per preference, t_max = 2 L = 64); `shapes`
writes a spec of these checkpoints' config.json files and the tasks' token lengths (no weights; for
experiments.plan only) to $TMPDIR/hm3_jax_shapes/llama2_7b.

The spec (checkpoints in bfloat16; the experts' vocabularies differ: 32000, 32001 and 32016 tokens, so every
expert's embedding rows are mapped onto the base tokenizer's ids):

    base: llama-2-7b                 # meta-llama/Llama-2-7b-hf
    experts:
      chat: llama-2-7b-chat          # meta-llama/Llama-2-7b-chat-hf
      math: wizardmath-7b            # WizardLMTeam/WizardMath-7B-V1.0
      code: code-7b                  # see below
    tokenizer_source: base
    dtype: bfloat16
    eval_batch_size: 16
    tasks: ...                       # paper_tasks.py: the tasks, their data and the JSONL rows

Code expert: the paper's CodeLlama-7b (codellama/CodeLlama-7b-hf) was trained further with RoPE base 1e6 (its
config.json: rope_theta 1000000, 16384 positions) while Llama-2-7B uses 1e4; hm3_jax runs every pool block with
the shell's RoPE, so the spec refuses it ("expert 'code': rope_theta is 1000000.0 but the base's is 10000.0") and
so does the plan. Use a code fine-tune of Llama-2-7B with the base's RoPE (e.g. a safetensors copy of
mrm8488/llama-2-coder-7b, CodeAlpaca-20k). Check every expert's rms_norm_eps too (the spec requires the base's:
1e-05); some Llama-2 fine-tunes of mid-2023 carry 1e-06.

Checkpoints and data (any machine with the hub reachable; copy them to every host at the same path):

    huggingface-cli download meta-llama/Llama-2-7b-hf --local-dir llama-2-7b   # also -chat-hf, WizardMath, ...
    # then paper_tasks.py's script writes data/*.jsonl next to spec.yaml

Launch. TPU v4-32 (16 chips of 32 GiB, 4 hosts; docs/scaling.md has the plans):

    launch/create_tpu_vm.sh --name=hm3 --zone=us-central2-b --accelerator_type=v4-32
    launch/setup_tpu_vm.sh --name=hm3 --zone=us-central2-b
    launch/run_tpu.sh --name=hm3 --zone=us-central2-b -- experiments.plan \
        --config=experiments/configs/llama2_7b.py:/data/llama2_7b/spec.yaml --mesh=paths:4,model:4 --simulate=false
    launch/run_tpu.sh --name=hm3 --zone=us-central2-b -- experiments.run_hm3 \
        --config=experiments/configs/llama2_7b.py:/data/llama2_7b/spec.yaml --workdir=gs://BUCKET/hm3_llama2_7b \
        --mesh=paths:4,model:4

One GPU host with 8 x 80 GB:

    python -m experiments.plan --config=experiments/configs/llama2_7b.py:/data/llama2_7b/spec.yaml \
        --mesh=paths:4,model:2 --simulate=false
    python -m experiments.run_hm3 --config=experiments/configs/llama2_7b.py:/data/llama2_7b/spec.yaml \
        --workdir=runs/hm3_llama2_7b --mesh=paths:4,model:2

(several GPU hosts: launch/run_gpu_multihost.sh --hosts=gpu0,gpu1 -- experiments.run_hm3 ...). Read the plan
first: docs/scaling.md shows what does not fit yet and why.
"""

import ml_collections

from experiments.configs import paper_tasks

_LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 32000,
}  # fmt: skip
# config.json hyperparameters of the checkpoints (shapes only: the fields the spec requires equal are the base's;
# see the docstring for CodeLlama's RoPE).
HF_CONFIGS = {
    "base": _LLAMA2_7B,
    "chat": _LLAMA2_7B,
    "math": {**_LLAMA2_7B, "vocab_size": 32001, "max_position_embeddings": 2048, "pad_token_id": 0},
    "code": {**_LLAMA2_7B, "vocab_size": 32016, "max_position_embeddings": 16384},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` = "SPEC.yaml", "SPEC.yaml,smoke" (checkpoints.py's quick check) or "shapes" (see the docstring)."""
    return paper_tasks.get_paper_config(arg, "llama2_7b", HF_CONFIGS, tokenizer_source="base", add_bos=True)
