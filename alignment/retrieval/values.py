"""LiVO's value retriever ``p(v | x)``: which value, if any, applies to a prompt (docs/methods.md#value-retriever).

1. Keywords — case-insensitive substrings, checked in the order nudity, bloody, horror (the authors' word lists).
2. Otherwise a person classifier decides whether the prompt depicts a person; if so, gender or racial equality,
   else no value. Classifiers (``classifier``):

   - ``lexicon`` (default, offline): a list of person words (whole words, plural ``s`` allowed); then racial
     equality when the prompt already names a gender (``attribute_words.gender``) and no race, gender equality when
     it names a race (``attribute_words.race``) and no gender — the value "more relevant to the prompt" the authors
     ask their LLM for — else a coin seeded by the retriever's seed and the prompt **[choice]**;
   - ``zero_shot``: a local transformers zero-shot-classification model folder (never remote code);
   - ``chat``: an OpenAI-compatible chat endpoint by URL (``.../v1`` or ``.../v1/chat/completions``), asked the
     authors' question; the request is built and the answer parsed here (urllib, a timeout). A timeout, an HTTP
     error or an answer that names no option falls back to the lexicon with a logged warning
     (``on_error: lexicon``) or is a one-line error (``on_error: error``).

At inference (``image_value``) a bias value is used with probability ``bias_probability`` (0.5) per image, drawn
from the retriever's seed, the prompt and the image's seed; toxicity values always; no value means the base model's
conditioning. ``retriever_settings(node)`` checks a ``retriever`` config node of ``alignment.generate`` /
``alignment.evaluate`` (null: off) without loading or calling anything; ``ValueRetriever(**settings).image_values``
gives the value of every (prompt, seed) image of a run (docs/methods.md#livo-inference).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import urllib.error
import urllib.request
from typing import Sequence

from alignment.errors import ConfigError, DataError
from alignment.objectives.livo import BIAS_VALUES, TOXICITY_VALUES
from alignment.seeding import derive_seed

log = logging.getLogger(__name__)

GENDER, RACE = BIAS_VALUES
NUDITY, BLOODY, HORROR = TOXICITY_VALUES
# SPEC §4: the authors' keyword lists, checked in this order
KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (NUDITY, ("nudity", "naked", "nude", "lewd", "erotic", "sexy", "pussy", "no clothes", "nsfw", "fuck", "fucked",
              "sex", "no panties", "orgasm", "porn", "making love", "boobs")),
    (BLOODY, ("bloody", "blood", "bloodied")),
    (HORROR, ("zombie", "dead")),
)
# Words that make a prompt depict a person (lexicon classifier); whole words, an optional plural "s"/"es".
PERSON_WORDS: tuple[str, ...] = (
    "person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid", "baby", "babies",
    "guy", "lady", "ladies", "gentleman", "gentlemen", "human", "humans", "adult", "teenager", "teen", "toddler",
    "face", "portrait", "selfie", "mother", "father", "mom", "dad", "parent", "son", "daughter", "brother", "sister",
    "grandmother", "grandfather", "wife", "husband", "bride", "groom", "friend", "student", "worker", "doctor",
    "nurse", "teacher", "professor", "scientist", "engineer", "lawyer", "judge", "police", "policeman",
    "policewoman", "officer", "soldier", "firefighter", "chef", "cook", "waiter", "waitress", "farmer", "pilot",
    "driver", "athlete", "player", "dancer", "singer", "musician", "artist", "painter", "writer", "actor",
    "actress", "model", "ceo", "manager", "businessman", "businesswoman", "secretary", "cashier", "janitor",
    "housekeeper", "mechanic", "carpenter", "plumber", "electrician", "programmer", "developer", "accountant",
    "pharmacist", "dentist", "surgeon", "astronaut", "king", "queen", "prince", "princess", "president",
    "politician", "priest", "monk", "nun", "hiker", "surfer", "skier", "runner", "cyclist", "tourist", "customer",
    "patient", "baker", "butcher", "fisherman", "hairdresser", "librarian", "photographer", "journalist",
    "reporter", "receptionist", "clerk", "guard", "sailor", "captain", "chief", "boss", "employee", "citizen",
)
CLASSIFIERS: tuple[str, ...] = ("lexicon", "zero_shot", "chat")
ON_ERROR: tuple[str, ...] = ("lexicon", "error")
RETRIEVER_KEYS: tuple[str, ...] = ("classifier", "bias_probability", "seed", "attribute_words", "zero_shot", "chat")
# Attribute words a prompt may already name (whole words): naming one attribute makes the other value the relevant
# one. The toy world sets its skin tones as race words (conf/retriever/toy_lexicon.yaml).
ATTRIBUTE_WORDS: dict[str, tuple[str, ...]] = {
    "gender": ("male", "female", "man", "men", "woman", "women", "boy", "boys", "girl", "girls", "gentleman",
               "gentlemen", "lady", "ladies", "masculine", "feminine", "businessman", "businesswoman", "policeman",
               "policewoman", "actress", "waitress", "mother", "father", "wife", "husband", "son", "daughter",
               "brother", "sister", "king", "queen", "prince", "princess", "nun", "monk", "bride", "groom"),
    "race": ("white", "black", "asian", "indian", "latino", "latina", "latinx", "hispanic", "african", "caucasian",
             "arab", "middle eastern", "east asian", "south asian", "native american", "european"),
}
CLASSIFIER_KEYS: dict[str, tuple[str, ...]] = {"zero_shot": ("model", "threshold", "device"),
                                               "chat": ("url", "model", "timeout", "on_error", "api_key_env")}
CHAT_QUESTION = (
    "You decide which value applies to a text-to-image prompt. If the prompt depicts a person (or people), answer "
    "'gender equality' or 'racial equality' — the one more relevant to the prompt, chosen at random when neither "
    "fits better. If it depicts no person, answer 'none'. Answer with exactly one of: gender equality, racial "
    "equality, none.")


def keyword_value(prompt: str) -> str | None:
    """The toxicity value whose keyword occurs in ``prompt`` (case-insensitive substring), first list first."""
    text = prompt.lower()
    for value, words in KEYWORDS:
        if any(word in text for word in words):
            return value
    return None


def remove_keywords(prompt: str) -> tuple[str, list[str]]:
    """``prompt`` with its toxic words removed, and the words removed (in order), matched as ``keyword_value``
    matches (case-insensitive substrings): every run of words holding a phrase keyword ("no clothes", also inside
    "no clothesline"), then every word that contains a keyword ("bloodied", "nudes,"), with the spaces and stray
    punctuation left behind tidied; repeated until nothing matches (a removal can bring words together). The cleaned
    prompt has no ``keyword_value`` (the LiVO builder samples it with negative guidance for the preferred toxicity
    images)."""
    phrases = sorted({w for _, words in KEYWORDS for w in words if " " in w}, key=len, reverse=True)
    singles = [w for _, words in KEYWORDS for w in words if " " not in w]
    patterns = [re.compile(rf"\S*{re.escape(phrase)}\S*", re.IGNORECASE) for phrase in phrases]
    text, removed = " ".join(prompt.split()), []
    while True:
        before = text
        for pattern in patterns:
            removed += [m.strip(".,;:!?\"'()") for m in pattern.findall(text)]
            text = " ".join(pattern.sub(" ", text).split())
        kept = []
        for token in text.split():
            if any(word in token.lower() for word in singles):
                removed.append(token.strip(".,;:!?\"'()"))
            else:
                kept.append(token)
        text = " ".join(kept)
        if text == before:
            break
    cleaned = re.sub(r"\s+([,.;:!?])", r"\1", text)
    cleaned = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", cleaned).strip(" ,;:")
    return cleaned, removed


def seeded_coin(seed: int, *parts: object) -> float:
    """A uniform number in [0, 1) fixed by ``seed`` and ``parts`` (same in every process and session)."""
    return random.Random(derive_seed(seed, *parts)).random()


def word_pattern(words: Sequence[str], plurals: bool = False) -> re.Pattern | None:
    """A case-folded whole-word regex matching any of ``words`` (longest first); None for no words."""
    if not words:
        return None
    alternatives = "|".join(sorted((re.escape(w.lower()) for w in words), key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives}){'(?:e?s)?' if plurals else ''}\b")


class LexiconClassifier:
    """A person if a person word occurs as a whole word; then the bias value the prompt leaves open (racial equality
    when it names only a gender, gender equality when it names only a race), else a seeded coin."""

    def __init__(self, words: Sequence[str] = PERSON_WORDS, seed: int = 0, attribute_words: dict | None = None):
        self.seed = int(seed)
        self.pattern = word_pattern(words, plurals=True)
        attribute_words = ATTRIBUTE_WORDS if attribute_words is None else attribute_words
        self.gender_pattern = word_pattern(attribute_words.get("gender", ()))
        self.race_pattern = word_pattern(attribute_words.get("race", ()))

    def depicts_person(self, prompt: str) -> bool:
        return self.pattern.search(prompt.lower()) is not None

    def bias_value(self, prompt: str) -> str:
        text = prompt.lower()
        names_gender = self.gender_pattern is not None and self.gender_pattern.search(text) is not None
        names_race = self.race_pattern is not None and self.race_pattern.search(text) is not None
        if names_gender != names_race:
            return RACE if names_gender else GENDER
        return GENDER if seeded_coin(self.seed, "lexicon", prompt) < 0.5 else RACE

    def __call__(self, prompt: str) -> str | None:
        return self.bias_value(prompt) if self.depicts_person(prompt) else None


class ZeroShotClassifier:
    """A local transformers zero-shot-classification model (an NLI model folder): a person when the hypothesis
    "This prompt depicts a person." scores at least ``threshold``; then gender or race by the seeded coin."""

    LABELS = ("a person", "no person")

    def __init__(self, model: str, threshold: float = 0.5, device: str = "cpu", seed: int = 0,
                 key: str = "retriever.zero_shot", attribute_words: dict | None = None):
        if not isinstance(model, str) or not os.path.isdir(os.path.expanduser(model)):
            raise ConfigError(f"{key}.model: {model!r} is not a local model folder")
        from transformers import pipeline

        self.threshold = float(threshold)
        self.coin = LexiconClassifier(seed=seed, attribute_words=attribute_words)
        try:
            self.pipe = pipeline("zero-shot-classification", model=os.path.expanduser(model), device=device,
                                 trust_remote_code=False, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - a folder that is no usable model
            raise ConfigError(f"{key}.model: cannot load {model}: {str(err).splitlines()[0][:200]}") from None

    def __call__(self, prompt: str) -> str | None:
        out = self.pipe(prompt, candidate_labels=list(self.LABELS), hypothesis_template="This prompt depicts {}.")
        score = dict(zip(out["labels"], out["scores"]))[self.LABELS[0]]
        return self.coin.bias_value(prompt) if score >= self.threshold else None


class ChatError(DataError):
    """The chat endpoint did not give a usable answer."""


def parse_chat_answer(text: str) -> str | None:
    """``gender equality`` / ``racial equality`` / None (``none``) from the model's answer; anything else (no
    option, or several) raises ``ChatError``."""
    words = re.sub(r"[^a-z ]+", " ", text.lower()).split()
    found = {GENDER for w in words if w == "gender"} | {RACE for w in words if w in ("racial", "race")}
    if "none" in words or ("no" in words and not found):
        found.add(None)
    if len(found) != 1:
        raise ChatError(f"chat answer names {'no option' if not found else 'several options'}: {text[:80]!r}")
    return found.pop()


class ChatClassifier:
    """An OpenAI-compatible chat completions endpoint (see the module docstring)."""

    def __init__(self, url: str, model: str = "gpt-4o-mini", timeout: float = 10.0, on_error: str = "lexicon",
                 api_key_env: str | None = None, seed: int = 0, key: str = "retriever.chat",
                 attribute_words: dict | None = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.url must be an http(s) URL, got {url!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"{key}.timeout must be > 0 seconds, got {timeout!r}")
        if on_error not in ON_ERROR:
            raise ConfigError(f"{key}.on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.timeout, self.on_error, self.key = model, float(timeout), on_error, key
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.fallback = LexiconClassifier(seed=seed, attribute_words=attribute_words)

    def request(self, prompt: str) -> urllib.request.Request:
        body = {"model": self.model, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "system", "content": CHAT_QUESTION}, {"role": "user", "content": prompt}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")

    def ask(self, prompt: str) -> str | None:
        """One request; ``ChatError`` on a timeout, an HTTP or connection error, or an unusable answer."""
        try:
            with urllib.request.urlopen(self.request(prompt), timeout=self.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise ChatError(f"{self.url} answered HTTP {err.code}") from None
        except (socket.timeout, TimeoutError):
            raise ChatError(f"{self.url} did not answer within {self.timeout:g} s") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (socket.timeout, TimeoutError)):
                raise ChatError(f"{self.url} did not answer within {self.timeout:g} s") from None
            raise ChatError(f"{self.url} is unreachable ({err.reason})") from None
        except (ValueError, UnicodeDecodeError):
            raise ChatError(f"{self.url} answered with something that is not JSON") from None
        try:
            text = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ChatError(f"{self.url} answered without choices[0].message.content") from None
        return parse_chat_answer(str(text))

    def __call__(self, prompt: str) -> str | None:
        try:
            return self.ask(prompt)
        except ChatError as err:
            if self.on_error == "error":
                raise ChatError(f"{self.key}: {err}") from None
            log.warning("%s: %s; using the lexicon for %r", self.key, err, prompt[:60])
            return self.fallback(prompt)


class ValueRetriever:
    """``retrieve(prompt)``: the value of a prompt (or None); ``image_value(prompt, seed)``: the value one image is
    generated with (bias values with probability ``bias_probability``)."""

    def __init__(self, classifier: str = "lexicon", bias_probability: float = 0.5, seed: int = 0,
                 zero_shot: dict | None = None, chat: dict | None = None, key: str = "retriever",
                 attribute_words: dict | None = None):
        for name, node in (("zero_shot", zero_shot), ("chat", chat)):
            unknown = sorted(set(node or {}) - set(CLASSIFIER_KEYS[name]))
            if unknown:
                raise ConfigError(f"{key}.{name}.{unknown[0]}: unknown key (accepted: "
                                  f"{', '.join(CLASSIFIER_KEYS[name])})")
        if classifier not in CLASSIFIERS:
            raise ConfigError(f"{key}.classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
        if isinstance(bias_probability, bool) or not isinstance(bias_probability, (int, float)) \
                or not 0 <= bias_probability <= 1:
            raise ConfigError(f"{key}.bias_probability must be in [0, 1], got {bias_probability!r}")
        self.seed = int(seed)
        self.bias_probability = float(bias_probability)
        words = check_attribute_words(attribute_words, f"{key}.attribute_words")
        if classifier == "lexicon":
            self.classifier = LexiconClassifier(seed=self.seed, attribute_words=words)
        elif classifier == "zero_shot":
            self.classifier = ZeroShotClassifier(**(zero_shot or {}), seed=self.seed, key=f"{key}.zero_shot",
                                                 attribute_words=words)
        else:
            if not chat or "url" not in chat:
                raise ConfigError(f"{key}.chat.url: set the endpoint for classifier=chat")
            self.classifier = ChatClassifier(**chat, seed=self.seed, key=f"{key}.chat", attribute_words=words)

    def retrieve(self, prompt: str) -> str | None:
        return keyword_value(prompt) or self.classifier(prompt)

    def image_value(self, prompt: str, image_seed: int, value: str | None = None) -> str | None:
        """The value of one image: ``value`` (default: retrieved), dropped for a bias value with probability
        ``1 − bias_probability`` (a draw fixed by the retriever's seed, the prompt and ``image_seed``)."""
        value = self.retrieve(prompt) if value is None else value
        if value in BIAS_VALUES and seeded_coin(self.seed, "bias", prompt, int(image_seed)) >= self.bias_probability:
            return None
        return value

    def annotate(self, records: Sequence[dict]) -> list[dict]:
        """Prompt-file rows with ``value`` set to the retrieved value (None: no value); rows that already hold a
        ``value`` keep it."""
        return [{**r, "value": r["value"] if r.get("value") is not None else self.retrieve(r["prompt"])}
                for r in records]

    def image_values(self, prompts: Sequence[str], seeds: Sequence[int],
                     values: Sequence[str | None] | None = None) -> dict[tuple[int, int], str | None]:
        """The value of every image ``(prompt_index, seed)``: ``values[i]`` (a prompt file's ``value`` field) when
        given, else the retrieved value (one ``retrieve`` per distinct prompt text), then ``image_value``'s draw per
        seed (bias values kept with probability ``bias_probability``, toxicity values always; None: no value)."""
        retrieved: dict[str, str | None] = {}
        out: dict[tuple[int, int], str | None] = {}
        for i, prompt in enumerate(prompts):
            value = values[i] if values is not None else None
            if value is None:
                if prompt not in retrieved:
                    retrieved[prompt] = self.retrieve(prompt)
                value = retrieved[prompt]
            for seed in seeds:
                out[(i, int(seed))] = None if value is None else self.image_value(prompt, seed, value)
        return out


def check_attribute_words(node, key: str = "retriever.attribute_words") -> dict[str, tuple[str, ...]]:
    """``{gender: [...], race: [...]}`` (null: ``ATTRIBUTE_WORDS``; a missing group: no words), checked."""
    if node is None:
        return dict(ATTRIBUTE_WORDS)
    if not isinstance(node, dict):
        raise ConfigError(f"{key} must be a mapping {{gender: [words], race: [words]}}, got {node!r}")
    out = {}
    for group, words in node.items():
        if group not in ATTRIBUTE_WORDS:
            raise ConfigError(f"{key}.{group}: unknown key (accepted: {', '.join(ATTRIBUTE_WORDS)})")
        if words is None:
            words = []
        if isinstance(words, str) or not isinstance(words, (list, tuple)) \
                or not all(isinstance(w, str) and w.strip() for w in words):
            raise ConfigError(f"{key}.{group} must be a list of words, got {words!r}")
        out[group] = tuple(w.strip() for w in words)
    return out


def retriever_settings(node, key: str = "retriever") -> dict | None:
    """The checked keyword arguments of ``ValueRetriever`` from a config node (null: no retriever), loading and
    calling nothing: every key known, the classifier one of ``CLASSIFIERS``, ``bias_probability`` in [0, 1], an
    integer ``seed``; for ``zero_shot`` an existing local model folder and a threshold in [0, 1]; for ``chat`` an
    http(s) URL, a timeout > 0, ``on_error`` in ``ON_ERROR`` and, when ``api_key_env`` names one, a set environment
    variable. Only the chosen classifier's node is kept. Errors are one line naming ``<key>.<name>``."""
    from omegaconf import DictConfig, OmegaConf

    if node is None:
        return None
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        raise ConfigError(f"{key} must be null (off) or a mapping {{{', '.join(RETRIEVER_KEYS)}}} "
                          f"(e.g. {key}=lexicon), got {node!r}")
    unknown = sorted(str(k) for k in set(node) - set(RETRIEVER_KEYS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (accepted: {', '.join(RETRIEVER_KEYS)})")
    classifier = node.get("classifier", "lexicon")
    if classifier not in CLASSIFIERS:
        raise ConfigError(f"{key}.classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    probability = node.get("bias_probability", 0.5)
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise ConfigError(f"{key}.bias_probability must be in [0, 1], got {probability!r}")
    seed = node.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{key}.seed must be an integer, got {seed!r}")
    subs = {}
    for name, accepted in CLASSIFIER_KEYS.items():
        sub = node.get(name)
        if sub is None:
            sub = {}
        if not isinstance(sub, dict):
            raise ConfigError(f"{key}.{name} must be a mapping {{{', '.join(accepted)}}}, got {sub!r}")
        unknown = sorted(str(k) for k in set(sub) - set(accepted))
        if unknown:
            raise ConfigError(f"{key}.{name}.{unknown[0]}: unknown key (accepted: {', '.join(accepted)})")
        subs[name] = {k: v for k, v in sub.items() if v is not None}
    settings = {"classifier": classifier, "bias_probability": float(probability), "seed": int(seed)}
    if node.get("attribute_words") is not None:  # null: the built-in lists (not spelt out in metrics.json)
        settings["attribute_words"] = check_attribute_words(node["attribute_words"], f"{key}.attribute_words")
    if classifier == "zero_shot":
        sub, where = subs["zero_shot"], f"{key}.zero_shot"
        model = sub.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}.model: set the local folder of a zero-shot-classification model for "
                              f"classifier=zero_shot")
        if not os.path.isdir(os.path.expanduser(model)):
            raise ConfigError(f"{where}.model: {model!r} is not a local model folder")
        threshold = sub.get("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ConfigError(f"{where}.threshold must be in [0, 1], got {threshold!r}")
        if not isinstance(sub.get("device", "cpu"), str):
            raise ConfigError(f"{where}.device must be a device name (cpu, cuda, cuda:1 ...), got {sub['device']!r}")
        settings["zero_shot"] = sub
    elif classifier == "chat":
        sub, where = subs["chat"], f"{key}.chat"
        url = sub.get("url")
        if url is None:
            raise ConfigError(f"{where}.url: set the endpoint for classifier=chat (http://host/v1 or its "
                              f"/chat/completions address)")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.url must be an http(s) URL, got {url!r}")
        if not isinstance(sub.get("model", "gpt-4o-mini"), str):
            raise ConfigError(f"{where}.model must be a model name, got {sub['model']!r}")
        timeout = sub.get("timeout", 10.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"{where}.timeout must be > 0 seconds, got {timeout!r}")
        if sub.get("on_error", "lexicon") not in ON_ERROR:
            raise ConfigError(f"{where}.on_error must be one of {', '.join(ON_ERROR)}, got {sub['on_error']!r}")
        env = sub.get("api_key_env")
        if env is not None and (not isinstance(env, str) or not env):
            raise ConfigError(f"{where}.api_key_env must be the name of an environment variable, got {env!r}")
        if env is not None and not os.environ.get(env):
            raise ConfigError(f"{where}.api_key_env: the environment variable {env} is not set")
        settings["chat"] = sub
    return settings


def describe_values(values: dict[tuple[int, int], str | None]) -> str:
    """``7 of 12 images with a value (gender equality 4, nudity considered inappropriate 3)``: a one-line summary."""
    counts: dict[str, int] = {}
    for value in values.values():
        if value is not None:
            counts[value] = counts.get(value, 0) + 1
    detail = ", ".join(f"{v} {n}" for v, n in sorted(counts.items()))
    return f"{sum(counts.values())} of {len(values)} images with a value" + (f" ({detail})" if detail else "")
