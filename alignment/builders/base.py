"""The builder interface: how a method that makes its own data (toy pairs, HG-DPO image pools, BalancedDPO votes,
LiVO data, synthetic pairs) describes that work, so that one runner can build it robustly (resumable, sharded over
processes, merged by the last finisher; see :mod:`alignment.builders.runner`).

A builder is a fixed, ordered list of ``num_items()`` items, cut by the runner into chunks of ``chunk_size``
consecutive items: chunk ``c`` holds items ``[c·chunk_size, (c+1)·chunk_size)`` (a builder whose items fall into
groups that must not share a batch may cut at the group borders: ``chunk_ranges``). ``build_chunk`` turns one chunk into
rows and must be a pure function of the items and the builder's settings (seeds derived from item indices, never a
running random state), so that any process can build any chunk, in any order, after any restart, and the result is
the same file. Items are grouped by chunk and never by process, so the batch a model sees — and therefore every
float it returns — does not depend on how many processes share the work.

Writing a builder::

    class MyBuilder(Builder):
        name = "my_data"            # output: <out>/my_data-<key>.parquet
        item_unit = "img"           # progress bar: img/s
        chunk_size = 64             # items per chunk = per model batch
        needs_backbone = True

        def __init__(self, prompts: list[str], seed: int = 0, config_key: str = "builder"):
            ...                     # check settings here: ConfigError naming f"{config_key}.<option>"

        def num_items(self): return len(self.prompts)
        def key_fields(self): return {"version": 1, "prompts": self.prompts, "seed": self.seed}
        def build_chunk(self, items, backbone, scorers): return pa.Table.from_pylist([...], schema=SCHEMA)

``key_fields`` is everything the output depends on besides the models (the runner adds the backbone's and the
scorers' fingerprints, the chunk size and the builder name): put a ``version`` in it and bump it when the code
changes what rows are made, so that files of the old code are never reused.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pyarrow as pa

from alignment.errors import ConfigError


class Builder:
    """Base class of dataset builders (see the module docstring). Subclasses set the class attributes and implement
    ``num_items``, ``key_fields`` and ``build_chunk``; ``finalize``, ``summary``, ``select_scorers`` and
    ``chunk_ranges`` are optional.

    Class attributes:
        name: The output file's prefix (``<name>-<key>.parquet``) and the builder's name in messages.
        item_unit: What one item is, for the progress bar (``"pair"``, ``"img"``, ``"prompt"``).
        chunk_size: Default items per chunk (the runner's ``chunk_size`` argument overrides it; it is part of the
            key, since it fixes which items share a model batch).
        needs_backbone: Whether ``build_chunk`` uses the backbone (only then is the backbone built by
            ``python -m alignment.build`` and fingerprinted into the key).
        scorer_names: Scorers ``build_chunk`` reads from the scorers mapping (the default ``select_scorers``
            requires them).
        schema: The rows' schema, if fixed: chunks are checked against it and an empty table has it.
    """

    name: str = "dataset"
    item_unit: str = "item"
    chunk_size: int = 64
    needs_backbone: bool = False
    scorer_names: tuple[str, ...] = ()
    schema: pa.Schema | None = None

    def num_items(self) -> int:
        """How many items the dataset is made of (fixed by the settings)."""
        raise NotImplementedError

    def key_fields(self) -> dict[str, Any]:
        """JSON-serialisable settings the output depends on, besides the models (see the module docstring)."""
        raise NotImplementedError

    def build_chunk(self, items: Sequence[int], backbone, scorers: Mapping[str, Any]) -> pa.Table:
        """The rows of ``items`` (consecutive item indices). ``backbone`` is None unless ``needs_backbone``;
        ``scorers`` is what ``select_scorers`` returned. Any number of rows per item is allowed."""
        raise NotImplementedError

    def chunk_ranges(self, chunk_size: int) -> list[range]:
        """The chunks: consecutive item ranges covering ``range(num_items())`` in order. Default: fixed ranges
        ``[c·chunk_size, (c+1)·chunk_size)``. Override only to keep items that must not share a model batch apart
        (toy pairs start a new chunk at each guidance scale); the layout must depend on the settings alone."""
        count = self.num_items()
        return [range(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]

    def select_scorers(self, scorers: Mapping[str, Any] | None) -> dict[str, Any]:
        """The scorers ``build_chunk`` will use, taken from the built ``scorers`` mapping (``{name: Scorer}``); their
        fingerprints go into the key. Default: the ``scorer_names``, each required."""
        scorers = dict(scorers or {})
        missing = [name for name in self.scorer_names if name not in scorers]
        if missing:
            raise ConfigError(f"scorers: builder {self.name!r} needs scorer {missing[0]!r} "
                              f"(add it: scorers=[{','.join(self.scorer_names)}])")
        return {name: scorers[name] for name in self.scorer_names}

    def finalize(self, table: pa.Table) -> pa.Table:
        """Called once on the merged chunks, in chunk order: sort rows, add dataset-wide statistics. Default: as is."""
        return table

    def summary(self, table: pa.Table) -> dict[str, Any]:
        """Statistics of the final table for the ``.json`` written beside it (the row count is always there)."""
        return {}
