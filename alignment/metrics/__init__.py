"""Evaluation metrics: win rates, bias, toxicity, image quality and change metrics."""
