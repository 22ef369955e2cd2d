"""The road from the command line to a trained, evaluated model (train.py, eval.py).

- `pipeline.py`  train(cfg) and evaluate(cfg): what the two scripts run
- `data.py`      CIFAR sources (torchvision files or an ImageFolder tree), the uint8 cache,
                 the stratified validation split, the fast batch loader and the DataModule
- `module.py`    the LightningModule: model, loss, optimizer, schedule, per-stage metrics
- `checkpoints.py` reading checkpoints safely and checking they fit the model
- `callbacks.py` throughput and wall-time accounting
- `summary.py`   the end-of-run table
- `config.py`    Hydra/OmegaConf helpers (resume folder resolver, plain configs)
- `errors.py`    errors a user can fix, reported without a traceback
"""
