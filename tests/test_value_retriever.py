"""LiVO's value retriever (docs/methods.md#value-retriever): keywords and their order, the lexicon, the chat
endpoint against a local stub server (never a real network call), the per-image bias probability."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignment.errors import ConfigError
from alignment.retrieval.values import (BLOODY, GENDER, HORROR, NUDITY, RACE, ChatError, LexiconClassifier,
                                        ValueRetriever, keyword_value, parse_chat_answer)


@pytest.mark.parametrize("prompt,value", [
    ("A NAKED man on a beach", NUDITY),
    ("a bloodied knife", BLOODY),
    ("a Zombie walking", HORROR),
    ("a dead tree", HORROR),
    ("a sexy zombie covered in blood", NUDITY),      # nudity is checked first
    ("a zombie covered in blood", BLOODY),            # then bloody, then horror
    ("making love on the beach", NUDITY),
    ("a bowl of fruit", None),
])
def test_keywords_in_order(prompt, value):
    assert keyword_value(prompt) == value


def test_lexicon_person_words_and_seeded_coin():
    lexicon = LexiconClassifier(seed=0)
    assert lexicon("a bowl of fruit") is None
    assert lexicon("a manhole cover") is None                  # whole words only
    assert lexicon("two Doctors talking") in (GENDER, RACE)
    people = [f"a photo of a {job}" for job in ("doctor", "nurse", "ceo", "teacher", "chef", "pilot", "farmer",
                                                "judge", "singer", "dancer")]
    first = [lexicon(p) for p in people]
    assert first == [LexiconClassifier(seed=0)(p) for p in people]   # seeded, stable
    assert {GENDER, RACE} == set(first)


def test_retriever_keywords_before_classifier_and_bias_probability():
    retriever = ValueRetriever(seed=0)
    assert retriever.retrieve("a naked woman") == NUDITY
    assert retriever.retrieve("a bowl of fruit") is None
    assert all(retriever.image_value("a bloody man", s) == BLOODY for s in range(20))   # toxicity: always
    used = [retriever.image_value("a photo of a doctor", s) for s in range(400)]
    share = sum(v is not None for v in used) / len(used)
    assert 0.4 < share < 0.6
    assert used == [ValueRetriever(seed=0).image_value("a photo of a doctor", s) for s in range(400)]
    assert ValueRetriever(bias_probability=0).image_value("a photo of a doctor", 3) is None
    rows = retriever.annotate([{"prompt": "a dead fish"}, {"prompt": "a cup", "value": GENDER}])
    assert [r["value"] for r in rows] == [HORROR, GENDER]


@pytest.mark.parametrize("answer,value", [("gender equality", GENDER), ("Racial equality.", RACE), ("none", None),
                                          ("No", None)])
def test_chat_answer_parsing(answer, value):
    assert parse_chat_answer(answer) == value


@pytest.mark.parametrize("answer", ["I like turtles", "gender equality or racial equality"])
def test_chat_answer_nonsense(answer):
    with pytest.raises(ChatError):
        parse_chat_answer(answer)


class _Stub(BaseHTTPRequestHandler):
    mode = "good"
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body, self.headers.get("Authorization")))
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "http_error":
            self.send_response(500)
            self.end_headers()
            return
        content = {"good": "racial equality", "nonsense": "bananas", "slow": "gender equality"}[self.mode]
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture()
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _retriever(url, mode, **chat):
    _Stub.mode = mode
    return ValueRetriever(classifier="chat", chat={"url": url, "model": "stub", **chat})


def test_chat_good_answer_and_request(stub_url, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "secret")
    retriever = _retriever(stub_url, "good", api_key_env="STUB_KEY")
    assert retriever.retrieve("a photo of a doctor") == RACE
    assert retriever.retrieve("a naked man") == NUDITY              # keywords first: no request
    assert len(_Stub.requests) == 1
    path, body, auth = _Stub.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret"
    assert body["model"] == "stub" and body["messages"][-1]["content"] == "a photo of a doctor"


def test_chat_nonsense_falls_back_to_the_lexicon(stub_url, caplog):
    retriever = _retriever(stub_url, "nonsense")
    assert retriever.retrieve("a photo of a doctor") == LexiconClassifier(seed=0)("a photo of a doctor")
    assert retriever.retrieve("a bowl of fruit") is None
    assert "using the lexicon" in caplog.text


def test_chat_timeout_is_short_and_can_be_an_error(stub_url):
    retriever = _retriever(stub_url, "slow", timeout=0.2, on_error="error")
    start = time.monotonic()
    with pytest.raises(ChatError) as info:
        retriever.retrieve("a photo of a doctor")
    assert time.monotonic() - start < 0.9
    assert "did not answer within 0.2 s" in str(info.value) and "\n" not in str(info.value)
    fallback = _retriever(stub_url, "slow", timeout=0.2)
    assert fallback.retrieve("a photo of a doctor") in (GENDER, RACE)


def test_chat_http_error_and_unreachable(stub_url):
    with pytest.raises(ChatError, match="HTTP 500"):
        _retriever(stub_url, "http_error", on_error="error").retrieve("a man")
    with pytest.raises(ChatError, match="unreachable"):
        ValueRetriever(classifier="chat", chat={"url": "http://127.0.0.1:9/v1", "timeout": 0.5,
                                                "on_error": "error"}).retrieve("a man")


def test_bad_retriever_settings():
    with pytest.raises(ConfigError, match="retriever.classifier"):
        ValueRetriever(classifier="oracle")
    with pytest.raises(ConfigError, match="retriever.chat.url"):
        ValueRetriever(classifier="chat")
    with pytest.raises(ConfigError, match="retriever.zero_shot.model"):
        ValueRetriever(classifier="zero_shot", zero_shot={"model": "/nonexistent/model"})


def test_a_prompt_naming_one_attribute_gets_the_other_value():
    """The lexicon picks the value the prompt leaves open: a named gender -> racial equality, a named race -> gender
    equality; both or neither -> the seeded coin (the same for every call)."""
    from alignment.retrieval.values import GENDER, RACE, ValueRetriever

    retriever = ValueRetriever()
    assert retriever.retrieve("a photo of a woman doctor") == RACE
    assert retriever.retrieve("A photo of an Asian doctor") == GENDER
    assert retriever.retrieve("a photo of a whitewashed wall painter") in (GENDER, RACE)  # no whole race word: coin
    coin = retriever.retrieve("a photo of a black woman doctor")
    assert coin in (GENDER, RACE) and retriever.retrieve("a photo of a black woman doctor") == coin
    toy = ValueRetriever(attribute_words={"gender": ["male", "female"], "race": ["pale", "dark"]})
    assert toy.retrieve("a photo of a pale nurse") == GENDER and toy.retrieve("a photo of a male nurse") == RACE
    assert toy.retrieve("a photo of a bloody pale nurse") == "bloody considered inappropriate"


@pytest.mark.parametrize("words, message", [
    ("male", "retriever.attribute_words must be a mapping"),
    ({"colour": ["red"]}, "retriever.attribute_words.colour: unknown key"),
    ({"gender": "male"}, "retriever.attribute_words.gender must be a list of words"),
    ({"race": ["", "x"]}, "retriever.attribute_words.race must be a list of words"),
])
def test_bad_attribute_words_are_named(words, message):
    from alignment.retrieval.values import retriever_settings

    with pytest.raises(ConfigError) as err:
        retriever_settings({"classifier": "lexicon", "attribute_words": words})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
