"""Reward / preference models behind one interface (see base.py)."""
