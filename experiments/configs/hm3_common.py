"""Settings of the end-to-end HM3 run shared by every benchmark config (tiny3, ...).

`add_hm3(config, smoke)` adds the sections `experiments.run_hm3` reads; the numbers are our choices where the
paper gives none (docs/arch.md explains the RL ones).
"""

import ml_collections


def add_hm3(config: ml_collections.ConfigDict, smoke: bool = False) -> ml_collections.ConfigDict:
    c = config
    c.seed = 0

    c.preferences = ml_collections.ConfigDict()
    c.preferences.num = 15  # the paper uses about 15 for three tasks; row 0 is always the balanced preference
    c.preferences.kind = "dirichlet"  # or "das_dennis" (then `divisions` sets the grid)
    c.preferences.divisions = 4

    c.engine = ml_collections.ConfigDict()
    c.engine.strategy = "map"  # measured fastest on CPU (benchmarks/path_eval.py); "auto" re-measures
    c.engine.chunk_size = 8
    c.engine.prefix_sharing = True
    # Examples per task that searches score on (the first ones of the search split; 0 = all of it). Path
    # evaluation cost is linear in it; fewer examples make the search scores noisier (tiny3 has 210 per task;
    # 105 = one evaluation batch).
    c.engine.search_examples = 105

    c.param_level = ml_collections.ConfigDict()
    c.param_level.density = 0.7  # TIES trim (fraction kept)
    c.param_level.drop_rate = 0.3  # DARE drop probability
    c.param_level.pool_model = (
        "tuned"  # which Theta(lambda) joins the pool: "paper" or "tuned" (grid + CMA-ES)
    )
    # Tuned variant, step 1: global scales tried (x the paper's weights lambda) at (density, drop_rate) and at
    # (1, 0) before CMA-ES; () skips the grid. On tiny3 the best scale moves from 1.0 to 2.0 with lambda.
    c.param_level.scale_grid = (1.0, 1.5, 2.0, 2.5)
    # The grid also runs at (1, 0) without TIES sign election, i.e. task arithmetic: the upper level picks the
    # merging method too (the best tuned parameter baseline on tiny3 was task arithmetic).
    c.param_level.task_arithmetic_grid = True
    # With a capped search split (engine.search_examples): the tuned variant's M best candidates are re-scored on
    # the whole search split and the best there is Theta(lambda) (param_level.py; the winner's curse, as
    # arch.confirm_top), charged to the budget; the parameter baselines confirm their grids the same way. 0 = off.
    c.param_level.confirm_top = 3
    c.param_level.cmaes = ml_collections.ConfigDict()
    c.param_level.cmaes.enabled = True  # the tuned variant (grid + CMA-ES); False = the paper's merge only
    c.param_level.cmaes.population_size = 6
    c.param_level.cmaes.num_generations = 2
    c.param_level.cmaes.sigma = 0.3  # initial step size in gene space, around the best grid point
    # The tuned variant's menu also holds the data-aware merges and TSV-M (issue 19; param_level.py,
    # data_aware_menu.py), fitted on prompts of the search split only and scored like every other candidate.
    # Off by default: it holds K experts' input Grams (RegMean; [in, in] per linear layer, too much for 7B-scale
    # models) and needs token prompts (not the ViT zoos); docs/merging.md has its measured effect on tiny3.
    c.param_level.data_aware = ml_collections.ConfigDict()
    c.param_level.data_aware.enabled = False
    c.param_level.data_aware.methods = ("regmean", "fisher", "tsv", "adamerging", "regmean_plusplus")
    c.param_level.data_aware.calibration_rows = 32  # search examples per task (prompts, no targets)
    # Each expert's own greedy answer (this many tokens, weighted up to its first EOS) continues its task's
    # prompts (merging/continuation.py; label-free; 0 = prompts only). tiny3, RegMean at the balanced preference:
    # 90.7 / 78.3 / 71.4% of the experts with prompts only, 95.1 / 78.3 / 79.4% with 8 tokens (docs/merging.md).
    c.param_level.data_aware.continuation_tokens = 8
    # RegMean's off-diagonal scale: the RegMean baseline's grid (baseline_runs.PARAM_GRIDS), so the menu holds every
    # merge the tuned baseline can pick (tiny8, session 12: the menu's (0.5, 0.9) gave HM3 65.7 against the
    # baseline's alpha 0.3 at 66.5); each extra alpha costs one merge and one search scoring per preference.
    c.param_level.data_aware.regmean_alphas = (0.3, 0.5, 0.7, 0.9)
    c.param_level.data_aware.tsv_scales = (1.0, 1.5)  # x the expert weights K * lambda_k
    c.param_level.data_aware.fisher_seed = 0  # the Fishers' label draws (one Fisher per expert per run)
    c.param_level.data_aware.fisher_num_samples = 1
    c.param_level.data_aware.adamerging = ml_collections.ConfigDict()
    c.param_level.data_aware.adamerging.num_steps = 20  # layer-wise, from init with Adam, projected to [0, 1]
    c.param_level.data_aware.adamerging.learning_rate = 1e-2
    c.param_level.data_aware.adamerging.init = 0.3
    c.param_level.data_aware.adamerging.batch_size = 16

    c.arch = ml_collections.ConfigDict()
    c.arch.alignment = "none"  # "none" | "moment"
    c.arch.checkpoint_every = 5
    c.arch.rl = ml_collections.ConfigDict()
    c.arch.rl.t_min = 3
    c.arch.rl.t_max = 8
    c.arch.rl.beta1 = 0.05
    c.arch.rl.num_envs = 32
    c.arch.rl.num_iterations = 20
    # Behaviour cloning onto Theta(lambda)'s identity path before PPO (arch.warm_start): the lower level starts
    # from the upper level's answer and explores its neighbourhood. 0 = start from a random policy.
    c.arch.rl.warm_start_steps = 300
    c.arch.rl.init_log_std = -0.5  # exploration noise of the Gaussian proto-action (std ~0.6 per dimension)
    c.arch.rl.k_nearest = (
        1  # M'; critic re-ranking (M' > 1) slowed learning on the planted problem (docs/arch.md)
    )
    c.arch.rl.explore_eps = 0.1
    c.arch.rl.update_epochs = 4
    c.arch.rl.num_minibatches = 4
    c.arch.rl.learning_rate = 3e-3  # PPO from scratch (no parameter level) and the warm start's cloning
    # PPO after the warm start: at 3e-3 PPO undid the warm start on tiny3 (episode return 0.70 at iteration 0,
    # 0.29-0.44 after; greedy decodes of length T_max scoring 0.34 vs Theta's ~0.8); at 3e-4 the return stays
    # 0.70-0.82, the greedy decode is Theta's identity path, and the answers are the same with 32% fewer path
    # evaluations (docs/arch.md).
    c.arch.rl.warm_started_learning_rate = 3e-4
    c.arch.rl.ent_coef = 0.0
    c.arch.rl.hidden_size = 64
    c.arch.rl.embed_size = 16
    # After PPO: best-improvement hill climbing from the best path over single-step edits, at most this many new
    # path evaluations per preference, counted in HM3's budget (and so in every path baseline's). 0 = off.
    c.arch.neighbourhood_evaluations = 16
    # Its moves (neighbourhood.neighbour_moves): source swaps, deletions, repeats, insertions of another source's
    # block (paths longer than L, as depth up-scaling makes), neighbouring layers; scored with the kinds taking
    # turns, each kind spread over the depth ("round_robin"), or kind by kind, swaps first ("by_kind": before
    # issue 20, where 16 evaluations at L = 16 never left the swaps; docs/headroom.md).
    c.arch.neighbourhood_kinds = ("swap", "delete", "repeat", "insert", "layer")
    c.arch.neighbourhood_order = "round_robin"
    # With a capped search split (engine.search_examples): the M best candidates per preference (plus
    # Theta(lambda)'s identity path) are re-scored on the whole search split and the best there is the answer
    # (against the winner's curse of picking the max of many noisy scores); charged to the budget, and the
    # per-preference path baselines (EA, DE, grid search) confirm the same way. 0 = off.
    c.arch.confirm_top = 3
    # ... and every source's own model (each expert's identity path and Theta(lambda)'s) joins HM3's shortlist
    # (path_confirmation.confirm_candidates; scored and charged like the others, so the path baselines' equal budget grows
    # with it; their own shortlists are their top M).
    c.arch.confirm_sources = True
    # ... and a candidate replaces Theta(lambda)'s identity path only if it beats it on at least this fraction of
    # paired bootstrap resamples of the whole search split (path_confirmation.significant_gain). 0 = best on the split.
    c.arch.confirm_significance = 0.95
    c.arch.confirm_bootstrap_samples = 1000
    c.arch.refine_iterations = 0  # optional online PPO refinement per preference (suggest with search=True)

    c.baselines = ml_collections.ConfigDict()
    c.baselines.param_methods = ("task_arithmetic", "ties", "dare_ties", "consensus", "pcb")
    c.baselines.tune = True
    c.baselines.path_methods = ("ea", "moea", "grid_search", "differential_evolution")
    c.baselines.budget = -1  # path evaluations per path baseline; -1 = HM3's architecture-level count

    # Where and how much is held, never what is computed (not part of the run's fingerprint: a run resumes under
    # other values). resident_preferences: how many preferences' merged model (shell + pool of the K + 1 sources'
    # blocks) are held at once, rebuilt from their recipe when needed again (hm3_jax/pipeline/preference_models.py);
    # 0 = all N (fastest; memory grows with N), 1 = memory flat in the preferences (large models).
    c.memory = ml_collections.ConfigDict()
    c.memory.resident_preferences = 0
    # Before loading anything, the memory plan's check (python -m experiments.plan) refuses a run that would not
    # fit: where the backend reports its memory (accelerators) or device_memory_gb (per device) is set.
    c.memory.check_fits = True
    c.memory.device_memory_gb = ml_collections.config_dict.placeholder(float)

    c.report = ml_collections.ConfigDict()
    c.report.fixed_reference = None  # a [K] reference point in normalised units, or None for the 1.1 rule
    # Paired bootstrap over held-out examples: hypervolume intervals and P(HM3 > X) (hm3_jax.moo.bootstrap);
    # every reported point is re-run once on the held-out split. 0 = off.
    c.report.bootstrap_samples = 1000
    c.export = True

    if smoke:
        c.preferences.num = 3
        c.engine.search_examples = 0  # the whole (tiny) search split
        # Batches' small remainders as padded chunks (the same scores): on tiny models compiling the one-path
        # programs costs more than the padding (PathEngine.use_single_path_chunks; default on).
        c.engine.single_path_chunks = False
        c.param_level.scale_grid = (1.5,)
        c.param_level.cmaes.population_size = 4
        c.param_level.cmaes.num_generations = 1
        # With the menu switched on: one candidate per method, few rows and steps.
        c.param_level.data_aware.calibration_rows = 8
        c.param_level.data_aware.regmean_alphas = (0.9,)
        c.param_level.data_aware.tsv_scales = (1.0,)
        c.param_level.data_aware.adamerging.num_steps = 2
        c.param_level.data_aware.adamerging.batch_size = 4
        c.arch.checkpoint_every = 1
        c.arch.neighbourhood_evaluations = 4
        # The trained policy fitted onto the answers after the search (`warm_start.distill`; off elsewhere): the
        # smoke run tests it end to end.
        c.arch.distill_steps = 300
        c.report.bootstrap_samples = 20
        c.arch.rl.t_max = 4
        c.arch.rl.t_min = 1
        c.arch.rl.num_envs = 8
        c.arch.rl.num_iterations = 2
        c.arch.rl.warm_start_steps = 20
        c.arch.rl.update_epochs = 1
        c.arch.rl.num_minibatches = 2
        c.arch.rl.hidden_size = 16
        c.arch.rl.embed_size = 8
        c.baselines.tune = False
        c.baselines.budget = 8
    return c
