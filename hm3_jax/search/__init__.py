"""HM3's two search levels over one `problem.Problem`: the parameter level (`param_level`: merge hyperparameters
per preference, data-aware merges from `data_aware_menu`) and the architecture level (`arch_level`: the path
search, its neighbourhood refinement and the paired-bootstrap confirmation on `heldout_bootstrap`'s
per-example statistics)."""
