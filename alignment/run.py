"""Training entry point: ``python -m alignment.run [overrides]`` composes the config and runs the training recipe
(``alignment.training.recipe.train``).

    python -m alignment.run method=dpo backbone=tiny
    python -m alignment.run -m method.beta=1000,5000          # Hydra sweep, one folder per job
    python -m alignment.run method=dpo terms=[sft] terms.sft.weight=0.1   # add a weighted loss term
    python -m alignment.run --cfg job                         # print the composed config

Everything a user can get wrong is checked before any model is built and reported as one line naming the key,
file or row: ``error: method.beta must be > 0, got -1.0``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from alignment.cli import entry_point
from alignment.training.recipe import train  # noqa: F401 - the recipe, importable as alignment.run.train


@entry_point("config")
def main(cfg: DictConfig):
    return train(cfg)


if __name__ == "__main__":
    main()
