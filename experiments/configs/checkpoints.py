"""HM3 on your own Hugging Face checkpoints and evaluation data, described by one spec file.

    python -m experiments.run_hm3 --config=experiments/configs/checkpoints.py:my_spec.yaml --workdir=runs/mine
    python -m experiments.run_hm3 --config=experiments/configs/checkpoints.py:my_spec.yaml,smoke --workdir=/tmp/s

The spec (base, one expert per objective, tasks with data and metric) is documented in hm3_jax/tasks/spec.py and
README ("HM3 on your own models"). Every other setting is the built-in benchmarks' (experiments/configs/
hm3_common.py) and can be overridden with `--config.X=...`; `,smoke` gives the quick-check budget of tiny3's
smoke variant with two preferences and one baseline of each kind (task arithmetic, EA): every stage runs. The path length limits come from the base's depth L (read from its config.json): t_max = 2 L
(blocks may repeat), t_min = ceil(3 L / 4); t_max < L is refused by the run (Theta(lambda)'s own path would
be cut).
"""

import ml_collections

from experiments.configs import hm3_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` = "SPEC.yaml" or "SPEC.yaml,smoke" (the spec path, relative to the working directory)."""
    from hm3_jax.io import hf_config
    from hm3_jax.tasks import spec as spec_lib

    parts = [p.strip() for p in (arg or "").split(",")]
    if not parts[0]:
        raise ValueError(
            "checkpoints.py needs the spec file: --config=experiments/configs/checkpoints.py:SPEC.yaml[,smoke]"
        )
    if len(parts) > 2 or (len(parts) == 2 and parts[1] != "smoke"):
        raise ValueError(f"checkpoints.py takes 'SPEC.yaml' or 'SPEC.yaml,smoke', got {arg!r}")
    smoke = len(parts) == 2
    spec = spec_lib.load_spec(parts[0])
    num_layers = hf_config.read_hf_config(spec.base)[0].num_layers
    config = ml_collections.ConfigDict()
    config.spec = spec.path
    config.spec_split_seed = 0  # the seeded 70 / 30 split of rows without a "split" field
    config = hm3_common.add_hm3(config, smoke=smoke)
    config.engine.search_examples = 0  # searches score the whole search split (set N to cap it per task)
    config.arch.rl.t_max = 2 * num_layers
    config.arch.rl.t_min = -(-3 * num_layers // 4)
    if smoke:  # a quick check that a spec runs end to end: every stage, one method of each kind
        config.preferences.num = 2
        config.baselines.param_methods = ("task_arithmetic",)
        config.baselines.path_methods = ("ea",)
    return config
