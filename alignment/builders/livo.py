"""LiVO's value data from a backbone (SPEC §4, docs/methods.md#building-livo-data-from-a-backbone):
``python -m alignment.build livo``.

Two kinds of item, each sampled on its own (its batches never mix with another item's, so a row does not depend on
the chunk size or on how many processes share the work):

- **bias**, one item per concept (a profession). The plain prompt ``train_template`` ("A photo of a/an {concept}
  person") is sampled ``plain_images`` times, and the attribute classifier (a scorer with ``classify(images,
  prompts, attributes)``: ``ClipAttributeClassifier``, the toy world's ``ToyAttributeClassifier``) labels each of
  those images with its argmax attribute, per attribute set (``attributes``: gender, race, ...). An attribute whose
  share is below ``1/|A|`` is under-represented. Then ``attribute_template`` ("A photo of a/an {race} {gender}
  {concept} person") is sampled ``images_per_attribute`` times for every combination of the attribute words
  (balanced over all of them). For each bias value (``value_attributes``: gender equality -> gender, racial
  equality -> race) every explicit image becomes a row with the *plain* prompt and the value: label 1 if the
  attribute it was prompted with is under-represented, else 0; category "bias".
- **toxicity**, one item per toxic prompt (``toxic_templates`` filled with every concept, plus ``toxic_prompts``):
  its value is the retriever's keyword value (``alignment.retrieval.values.keyword_value``); ``toxic_images``
  images of the toxic prompt are dispreferred (label 0), and as many images of the prompt with its toxic words
  removed (``remove_keywords``, the retriever's lists), sampled with Safe Latent Diffusion (``sld``, concept: the
  removed words unless set) from the same seeds, are preferred (label 1); the row's prompt is the toxic prompt;
  category "toxicity".

Templates may write ``a/an``: it becomes "a" or "an" by the word that follows (after toxic words are removed).
Every null option takes the value of the ``setting`` (``paper``: SD 1.5 and the CLIP attribute classifier;
``toy``: the toy world's professions, grammar and attributes, with ``ToyAttributeClassifier``; ``auto``: toy for
``backbone=toy``, else paper). Rows have LiVO's columns (``prompt, value, category, image, label``; PNG bytes) plus
the sampled prompt, its seed, the attribute and its share, and load with ``alignment.data.livo.ValuePairs``.
"""

from __future__ import annotations

import itertools
import re
import string
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from alignment.builders.base import Builder
from alignment.config import integer, number, positive_int
from alignment.errors import ConfigError, DataError
from alignment.objectives.livo import BIAS_VALUES, TOXICITY_VALUES, VALUES
from alignment.seeding import derive_seed

LIVO_BUILD_VERSION = 1  # bump when the rows made for the same settings change
SETTINGS: tuple[str, ...] = ("auto", "paper", "toy")
LIVO_BUILD_SCHEMA = pa.schema([
    pa.field("prompt", pa.string()), pa.field("value", pa.string()), pa.field("category", pa.string()),
    pa.field("image", pa.binary()), pa.field("label", pa.int64()),
    pa.field("sampled_prompt", pa.string()),        # what the image was sampled with
    pa.field("seed", pa.int64()),
    pa.field("attribute", pa.string()),             # bias: the attribute word it was prompted with
    pa.field("attribute_share", pa.float64()),      # bias: that attribute's share among the plain images
    pa.field("item", pa.int64()),                   # the concept / toxic prompt's item index
])

# [choice] professions for the paper setting (SPEC §4 names no list): common occupations with a known skew
PAPER_PROFESSIONS: tuple[str, ...] = (
    "doctor", "nurse", "teacher", "CEO", "engineer", "lawyer", "chef", "police officer", "firefighter", "pilot",
    "scientist", "farmer", "cashier", "janitor", "secretary", "software developer", "construction worker",
    "hairdresser", "accountant", "librarian")
DEFAULTS: dict[str, dict] = {
    "paper": {
        "concepts": list(PAPER_PROFESSIONS),
        "train_template": "A photo of a/an {concept} person",
        "eval_template": "A photo of the face of a/an {concept} person",
        "attribute_template": "A photo of a/an {race} {gender} {concept} person",
        "attributes": {"gender": ["male", "female"], "race": ["white", "black", "asian", "indian", "latino"]},
        "value_attributes": {"gender equality": "gender", "racial equality": "race"},
        "toxic_templates": ["A photo of a/an bloody {concept} person", "A photo of a/an naked {concept} person",
                            "A photo of a/an zombie {concept} person"],
        "classifier": "attributes",
        "plain_images": 50, "images_per_attribute": 5, "toxic_images": 10,
        "num_inference_steps": 50, "guidance_scale": 7.5, "batch_size": 16,
    },
    "toy": {  # the toy world's grammar (alignment/toy/world.py): its skin tones play race
        "concepts": ["doctor", "nurse", "teacher", "butcher"],
        "train_template": "a photo of a {concept}",
        "eval_template": "a photo of a {concept}",
        "attribute_template": "a photo of a {tone} {gender} {concept}",
        "attributes": {"gender": ["male", "female"], "tone": ["pale", "light", "medium", "tan", "dark"]},
        "value_attributes": {"gender equality": "gender", "racial equality": "tone"},
        "toxic_templates": ["a photo of a bloody {concept}", "a photo of a naked {concept}"],
        "classifier": "toy_attributes",
        "plain_images": 40, "images_per_attribute": 4, "toxic_images": 8,
        "num_inference_steps": 20, "guidance_scale": 7.5, "batch_size": 64,
    },
}
ARTICLE = re.compile(r"\b([Aa])/an(\s+)([^\s]+)")


def fix_articles(text: str) -> str:
    """Every ``a/an`` (or ``A/an``) becomes "a"/"an" by the first letter of the word after it (a vowel: "an")."""
    def article(match):
        vowel = match.group(3)[:1].lower() in "aeiou"
        return (match.group(1) + ("n" if vowel else "")) + match.group(2) + match.group(3)
    return ARTICLE.sub(article, text)


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def under_represented(shares: Sequence[float]) -> list[bool]:
    """Which attributes are under-represented: share < 1/|A| (SPEC §4; an exact 1/|A| is not)."""
    count = len(shares)
    return [float(s) < 1.0 / count for s in shares]


def attribute_shares(probs: torch.Tensor) -> list[float]:
    """Each attribute's share of the images, every image counted once for its argmax attribute (LiVO's bias metric,
    ``alignment.metrics.bias.attribute_distribution``)."""
    from alignment.metrics.bias import attribute_distribution

    return [float(x) for x in attribute_distribution(probs)]


def bias_labels(probs: torch.Tensor, prompted: Sequence[int]) -> tuple[list[int], list[float]]:
    """The labels of explicit images prompted with attribute indices ``prompted``, given the classifier's
    ``probs`` (N, A) of the plain prompt's images: 1 where that attribute is under-represented; and the shares."""
    shares = attribute_shares(probs)
    under = under_represented(shares)
    return [int(under[a]) for a in prompted], shares


class LiVOBuilder(Builder):
    """LiVO's value data from a backbone (see the module docstring). Items: the concepts (bias), then the toxic
    prompts (toxicity)."""

    name = "livo"
    item_unit = "img"
    chunk_size = 1
    needs_backbone = True
    schema = LIVO_BUILD_SCHEMA

    def __init__(self, setting: str = "auto", backbone: str | None = None, values: Sequence[str] | None = None,
                 concepts=None, train_template: str | None = None, eval_template: str | None = None,
                 attribute_template: str | None = None, attributes: Mapping | None = None,
                 value_attributes: Mapping | None = None, classifier: str | None = None,
                 plain_images: int | None = None, images_per_attribute: int | None = None,
                 toxic_templates: Sequence[str] | None = None, toxic_prompts=None, toxic_images: int | None = None,
                 sld=None, seed: int = 0, sampler: str = "ddim", num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, negative_prompt: str = "", batch_size: int | None = None,
                 config_key: str = "builder"):
        from alignment.retrieval.values import keyword_value, remove_keywords
        from alignment.sampling.sample import check_sampler
        from alignment.sampling.sld import check_guidance, safety_from_config

        key = self.config_key = config_key
        if setting not in SETTINGS:
            raise ConfigError(f"{key}.setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
        if setting == "auto":
            setting = "toy" if str(backbone) == "toy" else "paper"
        self.setting = setting
        defaults = DEFAULTS[setting]

        def pick(value, name):
            return defaults[name] if value is None else value

        # values
        values = list(VALUES) if values is None else [str(v) for v in values]
        unknown = [v for v in values if v not in VALUES]
        if unknown or not values:
            raise ConfigError(f"{key}.values: unknown value {unknown[0] if unknown else None!r} (LiVO's values: "
                              f"{', '.join(VALUES)})")
        self.values = list(dict.fromkeys(values))
        bias_values = [v for v in self.values if v in BIAS_VALUES]
        toxic_values = [v for v in self.values if v in TOXICITY_VALUES]
        # concepts
        self.concepts = self._concepts(pick(concepts, "concepts"), f"{key}.concepts")
        # bias settings
        self.train_template = self._template(pick(train_template, "train_template"), f"{key}.train_template", ())
        self.eval_template = self._template(pick(eval_template, "eval_template"), f"{key}.eval_template", ())
        attributes = pick(attributes, "attributes")
        if not isinstance(attributes, Mapping) or not attributes:
            raise ConfigError(f"{key}.attributes must map attribute names to word lists, e.g. {{gender: [male, "
                              f"female]}}, got {attributes!r}")
        self.attributes = {}
        for name, words in attributes.items():
            if isinstance(words, str) or not isinstance(words, Sequence) or len(words) < 2 \
                    or len(set(map(str, words))) != len(words):
                raise ConfigError(f"{key}.attributes.{name}: needs at least two distinct words, got {words!r}")
            self.attributes[str(name)] = [str(w) for w in words]
        self.attribute_template = self._template(pick(attribute_template, "attribute_template"),
                                                 f"{key}.attribute_template", tuple(self.attributes))
        value_attributes = dict(pick(value_attributes, "value_attributes"))
        self.value_attributes = {}
        for value in bias_values:
            kind = value_attributes.get(value)
            if kind not in self.attributes:
                raise ConfigError(f"{key}.value_attributes: value {value!r} needs an attribute set of "
                                  f"{key}.attributes ({', '.join(self.attributes)}), got {kind!r}")
            self.value_attributes[value] = str(kind)
        self.classifier = str(pick(classifier, "classifier")) if bias_values else None
        self.plain_images = positive_int(pick(plain_images, "plain_images"), f"{key}.plain_images")
        self.images_per_attribute = positive_int(pick(images_per_attribute, "images_per_attribute"),
                                                 f"{key}.images_per_attribute")
        self.bias_concepts = list(self.concepts) if bias_values else []
        # toxicity
        templates = list(pick(toxic_templates, "toxic_templates") or [])
        raw = []  # (prompt as written with a/an, where)
        for i, template in enumerate(templates):
            self._template(template, f"{key}.toxic_templates[{i}]", ())
            raw += [(template.format(concept=c), f"{key}.toxic_templates[{i}]") for c in self.concepts]
        raw += [(p, f"{key}.toxic_prompts") for p in self._prompt_list(toxic_prompts, f"{key}.toxic_prompts")]
        self.toxic = []  # dicts: prompt, clean, value, removed
        for text, where in raw:
            value = keyword_value(text)
            if value is None:
                raise ConfigError(f"{where}: {text!r} holds no toxic keyword (alignment.retrieval.values.KEYWORDS)")
            if value not in toxic_values:
                continue  # a value this build does not make (builder.values)
            clean, removed = remove_keywords(text)
            if not clean.strip():
                raise ConfigError(f"{where}: {text!r} is empty once its toxic words are removed")
            left = keyword_value(fix_articles(clean))
            if left is not None:  # the preferred images would be sampled from a prompt that is still toxic
                raise ConfigError(f"{where}: {text!r} still holds a toxic keyword ({left}) once its toxic words "
                                  f"are removed: {fix_articles(clean)!r}")
            self.toxic.append({"prompt": fix_articles(text), "clean": fix_articles(clean), "value": value,
                               "removed": removed})
        if toxic_values and not self.toxic:
            raise ConfigError(f"{key}.toxic_templates / {key}.toxic_prompts: no prompt for the toxicity values "
                              f"{toxic_values} (or drop them from {key}.values)")
        self.toxic_images = positive_int(pick(toxic_images, "toxic_images"), f"{key}.toxic_images")
        self.sld = safety_from_config(sld if sld is not None else "strong", f"{key}.sld")
        if self.toxic and self.sld is None:
            raise ConfigError(f"{key}.sld: the preferred toxicity images are sampled with Safe Latent Diffusion: set "
                              f"{key}.sld.preset (weak | medium | strong | max)")
        self.sld_concept_from_words = self.sld is not None and (sld is None or isinstance(sld, str) or (
            isinstance(sld, Mapping) and sld.get("concept") is None))
        # sampling
        self.seed = integer(seed, f"{key}.seed")
        self.sampler = check_sampler(sampler, f"{key}.sampler")
        self.num_inference_steps = positive_int(pick(num_inference_steps, "num_inference_steps"),
                                                f"{key}.num_inference_steps")
        self.guidance_scale = number(pick(guidance_scale, "guidance_scale"), f"{key}.guidance_scale")
        if self.toxic:
            check_guidance(self.sld, self.guidance_scale, f"{key}.guidance_scale")
        if not isinstance(negative_prompt, str):
            raise ConfigError(f"{key}.negative_prompt must be a string, got {negative_prompt!r}")
        self.negative_prompt = negative_prompt
        self.batch_size = positive_int(pick(batch_size, "batch_size"), f"{key}.batch_size")
        self.scorer_names = (self.classifier,) if self.bias_concepts else ()
        if not self.bias_concepts and not self.toxic:
            raise ConfigError(f"{key}: nothing to build (no bias value or toxic prompt)")

    # ------------------------------------------------------------------------------------------------ checks
    @staticmethod
    def _concepts(concepts, key: str) -> list[str]:
        if isinstance(concepts, (str, Path)) and Path(str(concepts)).expanduser().is_file():
            concepts = LiVOBuilder._prompt_list(concepts, key)
        if isinstance(concepts, str) or not isinstance(concepts, Sequence):
            raise ConfigError(f"{key} must be a list of concepts (professions) or a file of them, got {concepts!r}")
        concepts = [str(c).strip() for c in concepts]
        if not concepts or not all(concepts):
            raise ConfigError(f"{key}: needs at least one non-empty concept (profession), got {concepts!r}")
        if len(set(concepts)) != len(concepts):
            raise ConfigError(f"{key}: {concepts!r} lists a concept twice")
        return concepts

    @staticmethod
    def _template(template, key: str, attributes: tuple[str, ...]) -> str:
        if not isinstance(template, str):
            raise ConfigError(f"{key} must be a text with {{concept}}, got {template!r}")
        try:
            fields = template_fields(template)
        except ValueError as err:
            raise ConfigError(f"{key}: {template!r} is not a valid template ({err})") from None
        if "concept" not in fields:
            raise ConfigError(f"{key}: {template!r} has no {{concept}} placeholder")
        allowed = {"concept", *attributes}
        bad = [f for f in fields if f not in allowed]
        if bad:
            raise ConfigError(f"{key}: {template!r} has an unknown placeholder {{{bad[0]}}} "
                              f"(allowed: {', '.join(sorted(allowed))})")
        missing = [a for a in attributes if a not in fields]
        if missing:
            raise ConfigError(f"{key}: {template!r} does not name attribute {{{missing[0]}}} (every attribute set "
                              "is balanced over in the explicit prompts)")
        return template

    @staticmethod
    def _prompt_list(prompts, key: str) -> list[str]:
        """A list of prompts, or a prompt file's (any format ``read_prompt_records`` reads)."""
        from alignment.data.prompts import read_prompt_records

        if prompts is None:
            return []
        if isinstance(prompts, (str, Path)):
            path = Path(str(prompts)).expanduser()
            if not path.is_file():
                raise ConfigError(f"{key}: prompt file {path} does not exist")
            try:
                return [r["prompt"] for r in read_prompt_records(path)]
            except DataError as err:
                raise DataError(f"{key}: {err}") from None
        if not isinstance(prompts, Sequence):
            raise ConfigError(f"{key} must be a list of prompts or a prompt file, got {prompts!r}")
        return [str(p) for p in prompts]

    def check_scorer_names(self, configured) -> None:
        """The attribute classifier is a configured scorer (from the config alone, before any model loads)."""
        if not self.bias_concepts or self.classifier in configured:
            return
        names = ", ".join(sorted(str(n) for n in configured)) or "none"
        raise ConfigError(f"scorers: {self.config_key}.classifier is {self.classifier!r}, which is not a configured "
                          f"scorer (add it: scorers={self.classifier}; configured: {names})")

    def select_scorers(self, scorers) -> dict:
        if not self.bias_concepts:
            return {}
        scorers = dict(scorers or {})
        self.check_scorer_names(scorers)
        return {self.classifier: scorers[self.classifier]}

    # ------------------------------------------------------------------------------------------------ plan
    def combinations(self) -> list[dict[str, str]]:
        """Every combination of attribute words (one per attribute set), in a fixed order."""
        names = list(self.attributes)
        return [dict(zip(names, words)) for words in itertools.product(*(self.attributes[n] for n in names))]

    def num_items(self) -> int:
        return len(self.bias_concepts) + len(self.toxic)

    def item_units(self, items) -> int:
        """Images sampled for ``items`` (the runner's progress bar counts images)."""
        bias = self.plain_images + len(self.combinations()) * self.images_per_attribute
        return sum(bias if i < len(self.bias_concepts) else 2 * self.toxic_images for i in items)

    def train_prompt(self, concept: str) -> str:
        return fix_articles(self.train_template.format(concept=concept))

    def evaluation_prompts(self) -> list[str]:
        return [fix_articles(self.eval_template.format(concept=c)) for c in self.bias_concepts]

    def sld_for(self, toxic: dict):
        """SLD's settings for one toxic prompt: its concept is the removed toxic words unless ``sld.concept`` is
        set."""
        from dataclasses import replace

        if self.sld_concept_from_words and toxic["removed"]:
            return replace(self.sld, concept=", ".join(dict.fromkeys(w.lower() for w in toxic["removed"])))
        return self.sld

    def key_fields(self) -> dict:
        return {"version": LIVO_BUILD_VERSION, "values": self.values, "concepts": self.bias_concepts,
                "train_template": self.train_template, "attribute_template": self.attribute_template,
                "attributes": self.attributes, "value_attributes": self.value_attributes,
                "classifier": self.classifier, "plain_images": self.plain_images,
                "images_per_attribute": self.images_per_attribute,
                "toxic": [{"prompt": t["prompt"], "clean": t["clean"], "value": t["value"],
                           "sld": self.sld_for(t).identity()} for t in self.toxic],
                "toxic_images": self.toxic_images, "seed": self.seed, "sampler": self.sampler,
                "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "negative_prompt": self.negative_prompt, "batch_size": self.batch_size}

    # ------------------------------------------------------------------------------------------------ build
    def sample_pixels(self, backbone, prompts: list[str], seeds: list[int], safety=None) -> list[np.ndarray]:
        from alignment.sampling.sample import sample_images, to_pil

        pixels = []
        for start in range(0, len(prompts), self.batch_size):
            images = sample_images(backbone, prompts[start:start + self.batch_size],
                                   seeds[start:start + self.batch_size], self.num_inference_steps,
                                   self.guidance_scale, negative_prompt=self.negative_prompt, sampler=self.sampler,
                                   **({} if safety is None else {"safety": safety}))
            pixels += [np.asarray(image) for image in to_pil(images)]
        return pixels

    def classify(self, scorer, pixels: list[np.ndarray], prompt: str, words: list[str]) -> torch.Tensor:
        """(N, A) attribute probabilities of the stored 8-bit pixels, ``batch_size`` images per call."""
        from alignment.builders.pools import pixels_to_tensor

        device = getattr(scorer, "device", torch.device("cpu"))
        dtype = getattr(scorer, "dtype", torch.float32)
        out = []
        for start in range(0, len(pixels), self.batch_size):
            images = pixels_to_tensor(pixels[start:start + self.batch_size]).to(device, dtype)
            out.append(scorer.classify(images, [prompt] * images.shape[0], attributes=words).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def build_chunk(self, items, backbone, scorers) -> pa.Table:
        rows = []
        for item in items:
            if item < len(self.bias_concepts):
                rows += self._bias_rows(item, backbone, scorers[self.classifier])
            else:
                rows += self._toxic_rows(item, backbone)
        return pa.Table.from_pylist(rows, schema=LIVO_BUILD_SCHEMA)

    def _bias_rows(self, item: int, backbone, classifier) -> list[dict]:
        from alignment.builders.pools import encode_png

        concept = self.bias_concepts[item]
        prompt = self.train_prompt(concept)
        plain_seeds = [derive_seed(self.seed, "livo-plain", concept, j) for j in range(self.plain_images)]
        plain = self.sample_pixels(backbone, [prompt] * len(plain_seeds), plain_seeds)
        combos = self.combinations()
        jobs = [(c, k) for c in range(len(combos)) for k in range(self.images_per_attribute)]
        texts = [fix_articles(self.attribute_template.format(concept=concept, **combos[c])) for c, _ in jobs]
        seeds = [derive_seed(self.seed, "livo-attribute", concept, c, k) for c, k in jobs]
        explicit = [encode_png(p) for p in self.sample_pixels(backbone, texts, seeds)]
        rows = []
        for value, kind in self.value_attributes.items():
            words = self.attributes[kind]
            probs = self.classify(classifier, plain, prompt, words)
            prompted = [words.index(combos[c][kind]) for c, _ in jobs]
            labels, shares = bias_labels(probs, prompted)
            rows += [{"prompt": prompt, "value": value, "category": "bias", "image": image, "label": label,
                      "sampled_prompt": text, "seed": seed, "attribute": words[a], "attribute_share": shares[a],
                      "item": item}
                     for image, label, text, seed, a in zip(explicit, labels, texts, seeds, prompted)]
        return rows

    def _toxic_rows(self, item: int, backbone) -> list[dict]:
        from alignment.builders.pools import encode_png

        toxic = self.toxic[item - len(self.bias_concepts)]
        seeds = [derive_seed(self.seed, "livo-toxic", toxic["prompt"], j) for j in range(self.toxic_images)]
        bad = self.sample_pixels(backbone, [toxic["prompt"]] * len(seeds), seeds)
        good = self.sample_pixels(backbone, [toxic["clean"]] * len(seeds), seeds, safety=self.sld_for(toxic))
        rows = []
        for label, text, pixels in ((0, toxic["prompt"], bad), (1, toxic["clean"], good)):
            rows += [{"prompt": toxic["prompt"], "value": toxic["value"], "category": "toxicity",
                      "image": encode_png(p), "label": label, "sampled_prompt": text, "seed": seed,
                      "attribute": None, "attribute_share": None, "item": item}
                     for seed, p in zip(seeds, pixels)]
        return rows

    # ------------------------------------------------------------------------------------------------ summary
    def summary(self, table: pa.Table) -> dict:
        data = table.select(["prompt", "value", "category", "label", "attribute", "attribute_share"]).to_pylist()
        shares = {}
        for row in data:
            if row["category"] == "bias":
                shares.setdefault(row["prompt"], {}).setdefault(row["value"], {})[row["attribute"]] = \
                    row["attribute_share"]
        return {"setting": self.setting,
                "labels": {c: {str(label): sum(1 for r in data if r["category"] == c and r["label"] == label)
                             for label in (0, 1)} for c in ("bias", "toxicity")},
                "attribute_shares": shares,
                "toxic_prompts": [{k: t[k] for k in ("prompt", "clean", "value")} for t in self.toxic],
                "evaluation_prompts": self.evaluation_prompts()}
