"""The road from the command line to a trained, evaluated model (train.py, eval.py).

- `pipeline.py`  train(cfg): what train.py runs; the Trainer from the `trainer` config
- `evaluate.py`  evaluate(cfg): what eval.py runs (checkpoint or shipped weights -> report)
- `data.py`      CIFAR sources (torchvision files or an ImageFolder tree), the uint8 cache,
                 the stratified validation split, the fast batch loader and the DataModule
- `models.py`    build_model: a model config section -> `models.create_model(...)`
- `module.py`    the LightningModule: model, loss, optimizer, schedule, per-stage metrics
- `checkpoints.py` reading checkpoints safely and checking they fit the model
- `callbacks.py` throughput and wall-time accounting, weight EMA, the best checkpoint's epoch
- `summary.py`   the end-of-run table
- `config.py`    Hydra/OmegaConf helpers (resume folder resolver, plain configs)
- `errors.py`    errors a user can fix, reported without a traceback

docs/architecture.md says what may import what.
"""
