"""Evaluate a checkpoint (or shipped weights) on the test split, or validation when there is none.

    python eval.py ckpt_path=runs/<...>/checkpoints/last.ckpt     # the final weights (their EMA)
    python eval.py ckpt_path=<file> eval.tta=true                 # + flip test-time augmentation
    python eval.py model=mobilenet_v2 pretrained=true             # shipped weights (models/weights/)

Prints top-1, top-5, per-class accuracy and loss; writes metrics.json and confusion_matrix.png.
"""

import hydra
from omegaconf import DictConfig

from training.config import register_resolvers
from training.errors import exit_on_user_error

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float:
    from training.evaluate import evaluate

    with exit_on_user_error():
        report = evaluate(cfg)
    return report["top1"]


if __name__ == "__main__":
    main()
