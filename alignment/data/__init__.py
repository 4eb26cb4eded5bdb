"""Data layer: dataset classes, the dataset as a config component, extras, caches, sampling order, prompt files.

Modules (imported explicitly, so that importing ``alignment.data`` stays cheap):

- :mod:`alignment.data.component`: ``dataset._target_`` -> a dataset; checks it against the objective (batch kind,
  extra columns) before any model loads; the collate function of each kind.
- :mod:`alignment.data.pickapic`: :class:`PreferencePairs` (``kind = "pairs"``, Pick-a-Pic v2 schema) and
  ``collate_pairs``.
- :mod:`alignment.data.prompts`: :class:`PromptSet` (``kind = "prompts"``) and ``read_prompts`` /
  ``read_prompt_records`` for .txt, .jsonl, .json, .tsv, .csv and .parquet prompt files.
- :mod:`alignment.data.extras`: per-sample extra columns (``dataset.extra_columns``) and their collation.
- :mod:`alignment.data.cache`: the latent cache (VAE posteriors and prompt embeddings computed once).
- :mod:`alignment.data.images`: ``decode_image`` and the paired training transform ``PairTransform``.
- :mod:`alignment.data.sampler`: ``StepIndexedSampler``, a data order that is a function of seed and step.
- :mod:`alignment.data.synthetic`: synthetic Pick-a-Pic pairs (a builder) for tests and smoke runs.
"""
