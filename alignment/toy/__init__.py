"""The toy world: a procedural 32×32 domain whose every attribute is known, for verifying alignment methods on CPU.

- ``world``    caption grammar, scene sampling and the renderer (pixels + ground truth masks);
- ``corpus``   the deterministic training corpus with planted bias, toxicity and artifacts;
- ``scorers``  exact, pixel-based scorers behind ``alignment.scorers.base.Scorer`` (no renderer truth needed);
- ``backbone`` the ``toy`` SD-1.5-shaped backbone (weights committed under ``alignment/toy/weights/``);
- ``probe``    prompt-following and planted-flaw rates of a backbone, measured with the scorers;
- ``pairs``    preference pairs of the base model's own samples labelled by a toy rater; the train/held-out split;
- ``demo``     ``make demo``: Diffusion-DPO on the toy world and its win rate over the base on held-out captions.
"""
