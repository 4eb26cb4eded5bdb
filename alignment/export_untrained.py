"""A run folder for a method that trains nothing: its conditioner, exported as it is built
(docs/methods.md#livo-ablations).

    python -m alignment.export_untrained method=livo_untrained_encoder backbone=sd15
    python -m alignment.export_untrained method=livo_no_value_encoder backbone=sd15 hydra.run.dir=runs/livo_wo_v

LiVO's "w/o t" (the value encoder as initialised) and "w/o v" (the value written into the prompt) ablations have
nothing to train, so ``alignment.run`` refuses them. This writes what a training run would export —
``<run>/conditioner/`` (``conditioner.json`` with the value set; no weights: the conditioner rebuilds itself from the
backbone) and ``<run>/config.yaml`` — so that ``alignment.generate`` / ``alignment.evaluate`` load it like any run
(``+models.<name>.run=<run>``). No model is built; the method's settings are checked as in training.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignment.cli import entry_point
from alignment.errors import ConfigError


def export_untrained(cfg: DictConfig) -> dict:
    from alignment.config import check_keys, instantiate_checked

    node = cfg.method.objective
    target = check_keys(node, "method.objective")
    extra = {"export_only": True} if "export_only" in inspect.signature(target).parameters else {}
    objective = instantiate_checked(node, "method.objective", **extra)
    conditioner = getattr(objective, "conditioner", None)
    if conditioner is None:
        raise ConfigError(f"method={cfg.method.name}: the method has no conditioner to export")
    if not getattr(objective, "trains_nothing", False) or any(True for _ in conditioner.parameters()):
        raise ConfigError(f"method={cfg.method.name}: its conditioner has weights to train — use "
                          "`python -m alignment.run`")
    run_dir = Path(str(cfg.output_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = conditioner.save_pretrained(run_dir / "conditioner")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"done: {type(conditioner).__name__} exported untrained to {folder}; evaluate it with "
          f"+models.{cfg.method.name}.run={run_dir}", file=sys.stderr)
    return {"run_dir": str(run_dir), "conditioner": str(folder)}


@entry_point("config")
def main(cfg: DictConfig):
    return export_untrained(cfg)


if __name__ == "__main__":
    main()
