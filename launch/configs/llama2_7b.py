"""Config proposal: HM3 on the paper's Llama-2-7B setting (three HF experts, the pool sharded over "model").

The end-to-end config fields are settled in experiments/configs (not here); this file fixes the scale-out part
and the zoo layout. Command line on a v4-32 slice (16 chips, 4 hosts; see docs/scaling.md):

  launch/run_tpu.sh --name=hm3 --zone=us-central2-b -- experiments.run_hm3 \
      --config=launch/configs/llama2_7b.py --workdir=gs://BUCKET/hm3_llama2_7b --mesh=paths:4,data:1,model:4

`get_config("smoke")` keeps every field but points at nothing large (used to check the config builds).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.zoo = ml_collections.ConfigDict()
    config.zoo.kind = "hf"
    config.zoo.base = "meta-llama/Llama-2-7b-hf"
    # The paper's three experts (each fine-tuned from Llama-2-7B; local paths or HF hub ids).
    config.zoo.experts = {
        "chat": "meta-llama/Llama-2-7b-chat-hf",
        "math": "WizardLMTeam/WizardMath-7B-V1.0",
        "code": "codellama/CodeLlama-7b-Python-hf",
    }
    config.zoo.dtype = "bfloat16"
    config.tasks = ("gsm8k", "humaneval", "mbpp")
    # Mesh on a v4-32 (16 chips of 32 GB): 4 chips hold one copy of the (3 + 1) x 32-block pool (51.8 GB bf16
    # -> 13.0 GB per chip + 0.5 GB shell); 4 such groups evaluate different paths. See docs/scaling.md.
    config.mesh = "paths:4,data:1,model:4"
    config.num_preferences = 15
    config.t_max = 48  # up to 1.5x the 32 layers of one model
    config.eval_batch_size = 16  # examples per path evaluation (per "data" shard)
    config.max_seq_len = 512
    config.rl = ml_collections.ConfigDict()
    config.rl.episodes_per_preference = 1000
    config.rl.num_envs = 16  # parallel episodes; their paths are evaluated together, split over "paths"
    config.seed = 0
    if arg == "smoke":
        config.zoo.kind = "tiny"
        config.zoo.base = ""
        config.zoo.experts = {}
        config.mesh = ""
        config.num_preferences = 2
        config.t_max = 4
        config.rl.episodes_per_preference = 2
        config.rl.num_envs = 2
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; use '' or 'smoke'")
    return config
