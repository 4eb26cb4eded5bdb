"""A prompt safety filter for evaluation prompt sets (``prompt_filter`` of ``conf/evaluate.yaml`` and
``conf/generate.yaml``): a text classifier drops the prompts it calls unsafe before any image is generated.

BalancedDPO filters its evaluation prompts with ``michellejieli/inappropriate_text_classifier`` (a DistilBERT
classifier with the labels ``NSFW`` / ``SFW``); any transformers text-classification model works (a local folder, or
a hub id already in the Hugging Face cache: nothing is downloaded while ``HF_HUB_OFFLINE`` is set). Remote code is
never run (no ``trust_remote_code``).

For each prompt: ``p = softmax(logits)`` over the model's labels, ``p_unsafe = Σ p[label]`` over
``unsafe_labels``; the prompt is dropped when ``p_unsafe >= threshold`` (so ``threshold: 0`` drops every prompt and
a threshold above 1 drops none). Prompts are classified in file order, ``batch_size`` at a time; with a limit
(``max_prompts``) classification stops once that many prompts are kept.

The config is checked in two steps, so that a wrong label is reported before any weight is read:
:meth:`PromptSafetyFilter.from_config` checks the node and reads the model's config (``AutoConfig``: its
``id2label``), the tokenizer and weights load on first use.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from alignment.errors import ConfigError

KEYS = ("model", "unsafe_labels", "threshold", "batch_size", "device")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _load_error(key: str, model: str, error: BaseException) -> ConfigError:
    """One line for a model that cannot be loaded: a missing folder, or a hub id that is not in the local cache."""
    path = Path(model).expanduser()
    if path.exists():
        return ConfigError(f"{key}: cannot load {model!r} as a transformers text classifier ({_first_line(error)})")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    where = ("not in the local Hugging Face cache, and HF_HUB_OFFLINE is set (nothing is downloaded)" if offline
             else f"cannot be loaded from the hub ({_first_line(error)})")
    return ConfigError(f"{key}: {model!r} is not a local folder and, as a Hugging Face model id, {where}")


@dataclass
class FilterResult:
    """Which prompts a filter kept: ``kept`` (indices into the input, in order), ``dropped`` (one dict per dropped
    prompt: its index, text and summed unsafe probability) and ``examined`` (how many were classified)."""

    kept: list[int]
    dropped: list[dict]
    examined: int
    total: int
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The ``prompt_filter`` entry of metrics.json."""
        return {**self.settings, "examined": self.examined, "total": self.total, "kept": len(self.kept),
                "dropped": len(self.dropped), "renumbered": True, "kept_indices": list(self.kept),
                "dropped_prompts": list(self.dropped)}


class PromptSafetyFilter:
    """A transformers text classifier as a prompt filter. ``filter(prompts)`` returns the keep decision of each
    prompt (``True``: kept); ``unsafe_probabilities(prompts)`` the summed probability of the unsafe labels;
    ``probabilities(prompts)`` the full ``(N, num_labels)`` softmax."""

    def __init__(self, model: str, unsafe_labels=("NSFW",), threshold: float = 0.5, batch_size: int = 32,
                 device="auto", key: str = "prompt_filter"):
        from alignment.config import positive_int, resolve_device

        self.key = key
        if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
            raise ConfigError(f"{key}.model must be a transformers text-classification model id or folder, "
                              f"got {model!r}")
        self.model_name = str(model)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ConfigError(f"{key}.threshold must be a number (a prompt is dropped when the probability of its "
                              f"unsafe labels is >= threshold), got {threshold!r}")
        self.threshold = float(threshold)
        self.batch_size = positive_int(batch_size, f"{key}.batch_size")
        self.device = resolve_device(device, f"{key}.device")
        self.config = self._load_config()
        self.labels = self._label_names()
        self.unsafe_ids = self._unsafe_ids(unsafe_labels)
        self.unsafe_labels = [self.labels[i] for i in self.unsafe_ids]
        self.tokenizer = None
        self.model = None

    @classmethod
    def from_config(cls, node, key: str = "prompt_filter") -> "PromptSafetyFilter | None":
        """The filter a ``prompt_filter`` node describes, or ``None`` when it is absent or ``model`` is null (off).
        Checks every key and the label names against the model's config; no weight is read yet."""
        if node is None:
            return None
        if not isinstance(node, (DictConfig, dict)):
            raise ConfigError(f"{key} must be a mapping ({', '.join(KEYS)}), got {node!r}")
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        unknown = [str(k) for k in values if k not in KEYS]
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: unknown key (accepted: {', '.join(KEYS)})")
        if values.get("model") in (None, ""):
            return None
        return cls(values["model"], unsafe_labels=values.get("unsafe_labels", ["NSFW"]),
                   threshold=values.get("threshold", 0.5), batch_size=values.get("batch_size", 32),
                   device=values.get("device", "auto"), key=key)

    # -------------------------------------------------------------------------------------------- loading
    def _load_config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.model_name)
        except Exception as error:  # noqa: BLE001 - OSError, ValueError ...: every failure is one line
            raise _load_error(f"{self.key}.model", self.model_name, error) from None

    def _label_names(self) -> list[str]:
        id2label = getattr(self.config, "id2label", None) or {}
        try:
            labels = {int(i): str(name) for i, name in id2label.items()}
        except (TypeError, ValueError):
            labels = {}
        if not labels or sorted(labels) != list(range(len(labels))):
            raise ConfigError(f"{self.key}.model: {self.model_name!r} has no usable id2label in its config "
                              f"(not a text-classification model?)")
        return [labels[i] for i in range(len(labels))]

    def _unsafe_ids(self, unsafe_labels) -> list[int]:
        key = f"{self.key}.unsafe_labels"
        if isinstance(unsafe_labels, (str, int)) and not isinstance(unsafe_labels, bool):
            unsafe_labels = [unsafe_labels]
        if isinstance(unsafe_labels, ListConfig):
            unsafe_labels = OmegaConf.to_container(unsafe_labels)
        if not isinstance(unsafe_labels, (list, tuple)) or not unsafe_labels:
            raise ConfigError(f"{key} must be a non-empty list of label names of the model "
                              f"(its labels: {', '.join(self.labels)}), got {unsafe_labels!r}")
        ids = []
        for label in unsafe_labels:
            if isinstance(label, str) and label in self.labels:
                index = self.labels.index(label)
            elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(self.labels):
                index = label  # a label id, e.g. unsafe_labels=[1] for LABEL_1
            else:
                raise ConfigError(f"{key}: {label!r} is not a label of {self.model_name} (its labels: "
                                  f"{', '.join(self.labels)})")
            if index not in ids:
                ids.append(index)
        return ids

    def load(self) -> "PromptSafetyFilter":
        """Read the tokenizer and weights (once)."""
        if self.model is not None:
            return self
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        except Exception as error:  # noqa: BLE001
            raise _load_error(f"{self.key}.model", self.model_name, error) from None
        try:
            model = AutoModelForSequenceClassification.from_pretrained(self.model_name)
        except Exception as error:  # noqa: BLE001
            raise _load_error(f"{self.key}.model", self.model_name, error) from None
        if tokenizer.pad_token is None:  # e.g. GPT-2 based classifiers: pad with the end-of-text token
            if tokenizer.eos_token is None:
                raise ConfigError(f"{self.key}.model: the tokenizer of {self.model_name!r} has no padding token")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if model.config.num_labels != len(self.labels):
            raise ConfigError(f"{self.key}.model: {self.model_name!r} has {model.config.num_labels} outputs but "
                              f"{len(self.labels)} labels in id2label")
        self.tokenizer, self.model = tokenizer, model.to(self.device).eval()
        return self

    def release(self) -> None:
        """Free the weights (the filter runs once, before the image model loads)."""
        self.model = self.tokenizer = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _max_length(self) -> int:
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length, 512]
        return min(int(v) for v in limits if isinstance(v, int) and v > 0)

    # -------------------------------------------------------------------------------------------- scoring
    def probabilities(self, prompts) -> "torch.Tensor":  # noqa: F821
        """``softmax(logits)`` of every prompt, ``(N, num_labels)`` float32 on the CPU."""
        import torch

        self.load()
        prompts = [str(p) for p in prompts]
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                batch = self.tokenizer(prompts[start:start + self.batch_size], padding=True, truncation=True,
                                       max_length=self._max_length(), return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits = self.model(**batch).logits.float()
                out.append(torch.softmax(logits, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def unsafe_probabilities(self, prompts) -> list[float]:
        """The summed probability of the unsafe labels of each prompt."""
        probs = self.probabilities(prompts)
        return probs[:, self.unsafe_ids].sum(dim=1).tolist()

    def keep(self, unsafe_probability: float) -> bool:
        return unsafe_probability < self.threshold

    def __call__(self, prompts) -> list[bool]:
        """Whether each prompt is kept (``True``) or dropped as unsafe (``p_unsafe >= threshold``)."""
        return [self.keep(p) for p in self.unsafe_probabilities(prompts)]

    def settings(self) -> dict:
        return {"model": self.model_name, "unsafe_labels": list(self.unsafe_labels), "threshold": self.threshold}

    def select(self, prompts, limit: int | None = None) -> FilterResult:
        """Classify ``prompts`` in order, ``batch_size`` at a time, until ``limit`` are kept (None: all)."""
        prompts = [str(p) for p in prompts]
        kept, dropped, examined = [], [], 0
        for start in range(0, len(prompts), self.batch_size):
            if limit is not None and len(kept) >= limit:
                break
            batch = prompts[start:start + self.batch_size]
            for offset, p_unsafe in enumerate(self.unsafe_probabilities(batch)):
                index = start + offset
                if limit is not None and len(kept) >= limit:
                    break
                examined += 1
                if self.keep(p_unsafe):
                    kept.append(index)
                else:
                    dropped.append({"index": index, "prompt": prompts[index], "p_unsafe": round(p_unsafe, 6)})
        return FilterResult(kept=kept, dropped=dropped, examined=examined, total=len(prompts),
                            settings=self.settings())

    def filter_records(self, records: list[dict], limit: int | None = None) -> tuple[list[dict], dict]:
        """The kept prompt rows (renumbered: kept prompt ``n`` is ``records[summary["kept_indices"][n]]``) and the
        summary for metrics.json. Every prompt dropped: a one-line error (nothing left to evaluate)."""
        result = self.select([r["prompt"] for r in records], limit)
        if not result.kept:
            raise ConfigError(f"{self.key}.threshold: all {result.examined} prompt(s) were dropped as unsafe "
                              f"(P({' + '.join(self.unsafe_labels)}) >= {self.threshold:g} by {self.model_name}); "
                              f"nothing is left to generate")
        return [records[i] for i in result.kept], result.summary()


def describe_summary(summary: dict) -> str:
    """One line for the console and the report: ``kept 3 of 4 prompts (1 dropped by <model>, ...)``."""
    labels = " + ".join(summary.get("unsafe_labels", []))
    return (f"kept {summary['kept']} of {summary['examined']} prompt(s) ({summary['dropped']} dropped: "
            f"P({labels}) >= {summary['threshold']:g} by {summary['model']})")
