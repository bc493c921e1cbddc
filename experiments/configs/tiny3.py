"""The built-in tiny3 benchmark: a Llama base model and three experts (translation, math, code).

Build the zoo (about 8-15 minutes on 2 CPU cores):

    python -m experiments.build_zoo --config=experiments/configs/tiny3.py --workdir=runs/tiny3/zoo

Deep variant (issue 20, docs/headroom.md: 16 blocks of width 64 at tiny3's FLOPs; about 15 minutes here):

    python -m experiments.build_zoo --config=experiments/configs/tiny3.py:deep --workdir=/tmp/deep3/zoo

Smoke variant (tests; well under a minute):

    python -m experiments.build_zoo --config=experiments/configs/tiny3.py:smoke --workdir=/tmp/tiny3_smoke

`config.zoo` is what `hm3_jax.tasks.zoo.build_or_load(config.zoo, workdir)` reads; its fingerprint decides
whether an existing zoo directory is reused. Other sections (search, RL, baselines) belong to the binaries
that use them.
"""

import ml_collections

from experiments.configs import hm3_common


def zoo_config(smoke: bool = False, far: bool = False, deep: bool = False) -> ml_collections.ConfigDict:
    """The zoo section: data sizes, tokenizer, model size, base pretraining and expert fine-tuning.

    `far`: the first tiny3 design (experts far from a weak base); `smoke`: tiny shapes for tests (unchanged
    since the first design, so its zoo fingerprint, and the tests' cached zoo, stay the same); `deep`: the same
    tasks, data and recipe with 16 blocks of width 64 (issue 20, docs/headroom.md).
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.tasks = ("translation", "math", "code")
    # The paper's regime: experts are light fine-tunes of one capable base (Llama-2-chat -> WizardMath, ...).
    # The base sees 30% task-formatted text (formats and some skill), then each expert fine-tunes 150 steps at
    # lr 3e-4: task vectors are 5-8% of the base's norm (the first tiny3, 5% task text and 200 steps at 1e-3,
    # had 25-32% and experts that scored ~0 off their task; `tiny3.py:far` keeps it).
    c.num_eval = 1000  # per task: 700 search + 300 heldout
    c.num_train = 4000  # per task, disjoint from search/heldout; fine-tunes the expert
    c.vocab_size = 1024
    c.task_share = 0.3  # share of task-formatted text in the base corpus
    c.max_prose_chars = None  # all of pydoc_data.topics' prose
    c.seq_len = 64
    c.eval_batch_size = 100  # the held-out 300 rows = 3 batches, no padding

    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = 128
    c.model.intermediate_size = 336
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.max_position_embeddings = 256

    c.base = ml_collections.ConfigDict()
    c.base.num_steps = 600
    c.base.batch_size = 32
    c.base.learning_rate = 3e-3
    c.base.warmup_steps = 30
    c.base.weight_decay = 0.01

    c.expert = ml_collections.ConfigDict()
    c.expert.num_steps = 150
    c.expert.batch_size = 32
    c.expert.learning_rate = 3e-4
    c.expert.warmup_steps = 20
    c.expert.weight_decay = 0.0

    if deep:
        # 16 blocks of width 64 (MLP 168, 2 heads of 32 as tiny3's 4 of 32): per token the same block FLOPs
        # (2 x 4 x 194560 = 2 x 16 x 48640 multiply-adds), half the head and twice the attention scores; a
        # forward pass of 64 tokens is 124.78 MFLOPs in both (`models.flops.forward_flops`), so the zoo's
        # training and an L-block path's evaluation cost what tiny3's do.
        c.model.hidden_size = 64
        c.model.intermediate_size = 168
        c.model.num_layers = 16
        c.model.num_heads = 2
    if far:
        c.num_eval = 300  # 210 search + 90 heldout
        c.task_share = 0.05
        c.eval_batch_size = 105
        c.base.num_steps = 300
        c.expert.num_steps = 200
        c.expert.learning_rate = 1e-3
    if smoke:
        c.num_eval = 30
        c.task_share = 0.05
        c.expert.learning_rate = 1e-3
        c.num_train = 200
        c.vocab_size = 600
        c.max_prose_chars = 20000
        c.seq_len = 96
        c.eval_batch_size = 32
        c.model.hidden_size = 32
        c.model.intermediate_size = 64
        c.model.num_layers = 2
        c.model.num_heads = 2
        c.model.max_position_embeddings = 128
        c.base.num_steps = 20
        c.base.batch_size = 8
        c.base.warmup_steps = 2
        c.expert.num_steps = 10
        c.expert.batch_size = 8
        c.expert.warmup_steps = 2
    return c


def demo_budget(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`make demo`'s budget (`tiny3.py:demo`): the README results config's zoo, methods and ablations, with fewer
    preferences and smaller searches, so a fresh clone reaches its report in about 15 minutes on 2 CPU cores
    (zoo included). Every method, both ablations, the bootstrap intervals and the exports are kept; the path
    baselines still get HM3's own path-evaluation count. The README results use the full config (`make
    demo-full`)."""
    config.preferences.num = 5
    config.param_level.scale_grid = (1.0, 2.0)
    config.param_level.cmaes.population_size = 4
    config.param_level.cmaes.num_generations = 1
    config.arch.rl.num_iterations = 4
    config.arch.rl.num_envs = 16
    config.arch.rl.warm_start_steps = 200
    config.arch.neighbourhood_evaluations = 4
    config.arch.confirm_top = 2
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """tiny3 config; ``arg="smoke"`` gives the small variant used by tests; ``arg="smoke_mesh"`` is smoke cut
    further (2 preferences, no CMA-ES, 1 PPO iteration in the split loop, no baselines, no exports, no
    no-parameter-level ablation):
    tests/test_hm3_distributed.py runs it on 1 device, on 8 devices and in 2 processes.

    python -m experiments.build_zoo --config=experiments/configs/tiny3.py --workdir=runs/tiny3/zoo
    python -m experiments.build_zoo --config=experiments/configs/tiny3.py:smoke --workdir=/tmp/tiny3_smoke
    """
    if arg not in (None, "", "demo", "smoke", "smoke_mesh", "far", "deep"):
        raise ValueError(
            f"unknown tiny3 variant {arg!r}; use no argument, 'demo', 'deep', 'far', 'smoke' or 'smoke_mesh'"
        )
    smoke = arg in ("smoke", "smoke_mesh")
    config = ml_collections.ConfigDict()
    config.zoo = zoo_config(
        smoke=smoke, far=arg == "far", deep=arg == "deep"
    )  # smoke_mesh shares the smoke zoo (same zoo fingerprint)
    config = hm3_common.add_hm3(config, smoke=smoke)
    if not smoke:
        # Searches score the first 100 (light design; one evaluation batch) or 105 (far design) search examples.
        config.engine.search_examples = 105 if arg == "far" else 100
    if arg == "demo":
        demo_budget(config)
    if arg == "deep":
        # paths of 3/4 L to 2 L blocks, as tiny3's 3 to 8 of L = 4
        config.arch.rl.t_min = 12
        config.arch.rl.t_max = 32
        # The refinement's budget grows with the depth (`neighbourhood.neighbourhood_budget`): 5 x L = 80 new path
        # evaluations per preference, about L per move kind, so every deletion and repeat of the start path is
        # scored (16 reached 10% of the ~158 one-edit moves; docs/headroom.md). The path baselines' equal budget
        # grows with it.
        config.arch.neighbourhood_evaluations_per_layer = 5
        # The climb starts from Theta(lambda)'s identity path (the upper level's answer) and its 8 best other scored
        # paths are re-scored on the whole search split with the shortlist: the 100-example subset's SE of a reward
        # difference (~0.06) is the size of the gains, so fewer confirmed paths missed most of them (session 14,
        # docs/headroom.md: 6 of 15 answers differ from Theta, all better held-out, against 3 with the defaults).
        config.arch.neighbourhood_start = "theta"
        config.arch.confirm_neighbours = 8
        # The trained policy is then fitted onto those answers (`warm_start.distill`), so `suggest(search=True)`
        # decodes new preferences from what the search found (benchmarks/distilled_suggestions.py on session 14's
        # run D: 1 of 15 new preferences answered with a confirmed path, +0.070 held-out reward, none worse; the
        # trained policy's decodes: 0 of 15 answered).
        config.arch.distill_steps = 500
    if arg == "smoke_mesh":
        config.preferences.num = 2
        config.param_level.cmaes.enabled = False  # the paper's DARE-TIES model per preference
        config.arch.rl.num_iterations = 1
        # The split PPO loop on one device too (bit-identical to the callback loop, tests/test_distributed_loop.py):
        # programs with host callbacks never enter the persistent compilation cache; these do, and the 1-device
        # reference, the 8-device run and process 0 of the 2-process run share them.
        config.arch.score_mode = "split"
        config.arch.rl.num_envs = 4
        config.arch.rl.num_minibatches = 1
        # No baselines: they run on the same engines as HM3's levels (score_params, path evaluation), and in the
        # 2-process test every program process 1 runs is compiled afresh (jax writes its persistent cache from
        # process 0 only), so each baseline costs ~20-40 s there.
        config.baselines.param_methods = ()
        config.baselines.path_methods = ()
        config.baselines.budget = 4
        config.export = False
        # The held-out bootstrap and the neighbourhood refinement are tested by the smoke run
        # (tests/test_hm3_run.py) and tests/test_hm3_units.py; here they would only add compilations x 4 processes.
        config.report.bootstrap_samples = 0
        config.arch.neighbourhood_evaluations = 0
        config.arch.distill_steps = 0  # not tested on several processes
        # No no-parameter-level ablation (a second architecture level with one source less: every PPO and engine
        # program compiled again, about a quarter of each run, x 4 processes); the smoke run reports it.
        config.ablations = ("no_arch_level",)
    return config
