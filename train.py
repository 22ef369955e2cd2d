"""Train a zoo model on CIFAR, then test its final weights (their EMA) where the data has a test split.

    python train.py model=mobilenet_v2 data=cifar10
    python train.py model=resnet20 data.root=../shared/data/cifar10 trainer.max_epochs=10
    python train.py -m model=mobilenet_v2,resnet20 seed=0,1          # a sweep
    python train.py model=resnet20 ckpt_path=runs/<...>/checkpoints/last.ckpt  # resume: the same overrides + ckpt_path

Configs live in configs/ (train.yaml and its groups); the work is done in training/pipeline.py.
"""

import hydra
from omegaconf import DictConfig

from training.config import register_resolvers
from training.errors import exit_on_user_error

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from training.pipeline import train  # heavy imports after Hydra has parsed the command line

    with exit_on_user_error():
        summary = train(cfg)
    # for Hydra sweepers that optimize a value: the final weights' accuracy (their EMA), what export
    # ships, so a sweep selects on what a user gets, not on its luckiest epoch
    return summary["final_val_acc"]


if __name__ == "__main__":
    main()
