"""Dataset builders: a method that makes its own data describes it as a :class:`~alignment.builders.base.Builder`;
:mod:`alignment.builders.runner` builds it once, resumably and sharded over processes (``python -m alignment.build
NAME``, or ``ensure_built`` at training time)."""

from alignment.builders.base import Builder

__all__ = ["Builder"]
