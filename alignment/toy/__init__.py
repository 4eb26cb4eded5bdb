"""The toy world: a procedural 32×32 domain whose every attribute is known, for verifying alignment methods on CPU.

- ``world``    caption grammar, scene sampling and the renderer (pixels + ground truth masks);
- ``corpus``   the deterministic training corpus with planted bias, toxicity and artifacts;
- ``scorers``  exact, pixel-based scorers behind ``alignment.scorers.base.Scorer`` (no renderer truth needed);
- ``backbone`` the ``toy`` SD-1.5-shaped backbone (weights committed under ``alignment/toy/weights/``);
- ``probe``    prompt-following and planted-flaw rates of a backbone, measured with the scorers.
"""
