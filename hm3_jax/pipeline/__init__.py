"""The end-to-end HM3 run (`run.run_hm3`): problem setup, the two search levels, the ablations, the baselines at
an equal budget, the held-out report, exports and `suggest`. Built on `hm3_jax.search`; the binaries in
`experiments/` are its only callers above it."""
