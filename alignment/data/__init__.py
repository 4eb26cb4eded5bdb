"""Data layer: preference pairs, paired image transforms, step-indexed sampling, prompt lists, synthetic data.

Modules (imported explicitly, so that importing ``alignment.data`` stays cheap):

- :mod:`alignment.data.pickapic`: :class:`PreferencePairs` dataset (Pick-a-Pic v2 schema) and ``collate_pairs``.
- :mod:`alignment.data.images`: ``decode_image`` and the paired training transform ``PairTransform``.
- :mod:`alignment.data.sampler`: ``StepIndexedSampler``, a data order that is a function of seed and step.
- :mod:`alignment.data.prompts`: ``read_prompts`` for .txt, .jsonl, .json, .tsv and .csv prompt files.
- :mod:`alignment.data.synthetic`: a tiny synthetic preference parquet file for tests and smoke runs.
"""
