"""The conv_mode ablation tooling (`python -m tools.ablation`): runs.py finds and groups the runs,
measure.py rebuilds and times their models into results rows, results.py is the results CSV,
report.py writes the report and plots from it, costs.py counts params / mult-adds without training."""
