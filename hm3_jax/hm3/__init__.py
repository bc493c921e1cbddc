"""The end-to-end HM3 run: problem setup, parameter level, architecture level, baselines, report, exports."""
