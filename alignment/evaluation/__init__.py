"""The parts of ``python -m alignment.evaluate`` (docs/evaluation.md).

- :mod:`~alignment.evaluation.plan`: the checked evaluation config (prompts, seeds, models, metric options); every
  check that needs no model runs here, first.
- :mod:`~alignment.evaluation.cache`: the on-disk image cache, ``<image_dir>/<model>/<prompt:05d>_seed<seed>.png``
  plus one ``manifest.json`` per model saying what defines each image; only missing or outdated images are
  generated.
- :mod:`~alignment.evaluation.scoring`: one streaming pass over each model's cached images: scorer scores
  ``(P, k)``, and the paper metrics (win rates, colour shift, change, FID/IS, CLIP score, bias, toxicity).
- :mod:`~alignment.evaluation.report`: the self-contained HTML report and the W&B tables.
"""
