"""Tools: commands that turn runs into shipped artefacts and docs (weight export and its check, the
model table, the ablation report, packing and slimming runs for a GPU machine). Run them as modules
from the repository root, e.g. `python -m tools.export_weights runs/<model>/<date> --data-root ...`."""
