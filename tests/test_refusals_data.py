"""Issue #13, data part: every bad data input is refused at load time with one line naming file, line,
field and what was expected, the same way through every route (file, HH-RLHF directory role, hub)."""

import gzip
import json
from pathlib import Path

import pytest

from saealign.corpus import load_texts
from saealign.data import PreferenceDataError, load_preferences, select_triples

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def hh(i, chosen=None) -> dict:
    """A raw HH-RLHF record; `chosen` replaces the chosen reply (e.g. with silence)."""
    reply = f" Good answer {i}." if chosen is None else chosen
    return {"chosen": f"\n\nHuman: Question {i}?\n\nAssistant:{reply}",
            "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: Bad answer {i}."}


def hh_dir(root: Path, harmless: list[dict]) -> Path:
    """A minimal shared-data layout: the four HH-RLHF subsets and an AlpacaEval folder."""
    for subset in ("helpful-base", "helpful-online", "helpful-rejection-sampled"):
        (root / "hh-rlhf" / subset).mkdir(parents=True)
        (root / "hh-rlhf" / subset / "test.jsonl.gz").write_bytes(gzip.compress(jsonl(hh(i) for i in range(3))))
    (root / "hh-rlhf" / "harmless-base").mkdir()
    (root / "hh-rlhf" / "harmless-base" / "test.jsonl.gz").write_bytes(gzip.compress(jsonl(harmless)))
    (root / "alpaca-eval" / "m").mkdir(parents=True)
    (root / "alpaca-eval" / "m" / "model_outputs.json").write_text(
        json.dumps([{"instruction": "Unrelated?", "dataset": "helpful_base", "output": "x"}]))
    return root


class FakeTokenizer:
    def apply_chat_template(self, messages, tokenize=False):
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything falls through to the Hugging Face hub loader."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"fell through to the hub loader with {args}")

    monkeypatch.setattr("datasets.load_dataset", refuse)


# ------------------------------------------------------------------------------------------ bytes

def test_truncated_gzip_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl({**GOOD, "chosen": f"reply {i}"} for i in range(5000)))[:-400])
    with pytest.raises(ValueError) as info:
        load_preferences(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and "truncated or corrupt gzip file" in message and "\n" not in message
    assert int(message[len(f"{path}:"):].split(":")[0]) > 1  # the line reached is named


def test_non_utf8_names_file_and_line_on_every_reader(tmp_path):
    bad = jsonl([GOOD]) + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    for name, content in (("prefs.jsonl", bad), ("prefs.jsonl.gz", gzip.compress(bad))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"^.*$") as info:
            load_preferences(path)
        assert str(info.value) == f"{path}:2: not UTF-8 (byte 0xe9 at column 16); the file must be UTF-8"
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"fine\nna\xefve\n")
    with pytest.raises(ValueError, match=rf"^{corpus}:2: not UTF-8 .*must be UTF-8$"):
        load_texts(str(corpus), FakeTokenizer())


def test_utf8_bom_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    path = tmp_path / "bom.jsonl"
    path.write_bytes(bom + jsonl([GOOD, {**GOOD, "chosen": "c"}]))
    assert [t.chosen for t in load_preferences(path)] == ["a", "c"]
    whole = tmp_path / "bom.json"
    whole.write_bytes(bom + json.dumps([GOOD]).encode())
    assert len(load_preferences(whole)) == 1
    corpus = tmp_path / "bom.txt"
    corpus.write_bytes(bom + b"first\nsecond\n")
    assert load_texts(str(corpus), FakeTokenizer()) == ["first", "second"]


# ------------------------------------------------------------------------------------------ paths

@pytest.mark.parametrize("source", ["./nope", "nope.jsonl", "nope.json.gz", "nope.parquet", "a/b/c", "sub/nope", "ABS"])
def test_missing_local_path_is_refused_without_the_hub(tmp_path, monkeypatch, no_hub, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    source = str(tmp_path / "nope") if source == "ABS" else source
    expected = f"^no such file or directory: {source}"
    with pytest.raises(FileNotFoundError, match=expected):
        load_preferences(source)
    with pytest.raises(FileNotFoundError, match=expected):
        select_triples(source)
    with pytest.raises(FileNotFoundError, match=expected):
        select_triples(source, role="fit")
    with pytest.raises(FileNotFoundError, match=expected):
        load_texts(source, FakeTokenizer())


def test_hub_names_still_reach_the_hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr("datasets.load_dataset", lambda name, **kw: calls.append(name) or [GOOD])
    assert len(load_preferences("owner/name")) == 1 and calls == ["owner/name"]


def test_role_needs_an_hh_rlhf_directory(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(jsonl([GOOD]))
    with pytest.raises(FileNotFoundError, match=rf"^{path}: not an HH-RLHF data directory"):
        select_triples(path, role="fit")
    root = hh_dir(tmp_path / "shared", [hh(i) for i in range(3)])
    with pytest.raises(ValueError, match="pass a role, one of"):
        select_triples(root)


# ------------------------------------------------------------------------------------------ empty inputs

@pytest.mark.parametrize("name,content,why", [
    ("empty.jsonl", b"", "it holds no records"),
    ("blank.jsonl", b"\n  \n", "it holds no records"),
    ("empty.jsonl.gz", gzip.compress(b""), "it holds no records"),
    ("empty.json", b"[]", "it holds no records"),
    ("same.jsonl", jsonl([{**GOOD, "rejected": "a"}]), "all 1 record(s) dropped (identical 1)"),
], ids=["empty", "blank", "empty-gz", "empty-list", "all-identical"])
def test_no_usable_record_is_refused_at_load_time(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_preferences(path)
    assert str(info.value).startswith(f"no preference triples in {path}: {why}")


def test_empty_corpus_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=f"^no texts in {path}$"):
        load_texts(str(path), FakeTokenizer())


# ------------------------------------------------------------------------------------------ same rules on every route

def test_empty_response_gets_the_same_rule_on_every_route(tmp_path):
    records = [hh(0), hh(1, chosen=""), hh(2)]
    file = tmp_path / "harmless.jsonl"
    file.write_bytes(jsonl(records))
    root = hh_dir(tmp_path / "shared", records)
    harmless = root / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

    # default: kept with a warning (the protocol keeps HH-RLHF's real empty replies) on both routes
    from_file, from_dir = select_triples(file), select_triples(root, role="harmless_all")
    assert [t.chosen for t in from_file] == [t.chosen for t in from_dir] == ["Good answer 0.", "", "Good answer 2."]

    # strict: refused on both routes, and on the hub route, with the same one-line message
    for source, route in ((file, lambda: select_triples(file, allow_empty=False)),
                          (harmless, lambda: select_triples(root, role="harmless_all", allow_empty=False))):
        with pytest.raises(PreferenceDataError) as info:
            route()
        assert str(info.value) == f"{source}:2: field 'chosen': expected a non-empty response, got ''"
    with pytest.raises(PreferenceDataError) as info:
        load_preferences("json", split="train", hf_kwargs={"data_files": str(file), "cache_dir": str(tmp_path / "c")})
    assert str(info.value) == "json[train]:2: field 'chosen': expected a non-empty response, got ''"


def test_malformed_json_names_file_line_and_what_was_expected(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(jsonl([GOOD]) + b'{"prompt": "p", "chosen": "a",\n')
    with pytest.raises(PreferenceDataError) as info:
        load_preferences(path)
    assert str(info.value).startswith(f"{path}:2: malformed JSON (")
    assert str(info.value).endswith("expected one JSON object per line")
    whole = tmp_path / "prefs.json"
    whole.write_text('{"rows": []}')
    with pytest.raises(PreferenceDataError, match=r"expected a JSON list of records \(or \{'data': \[...\]\}\), got dict"):
        load_preferences(whole)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match=rf"^{corpus}:2: malformed JSON \(.*\); expected one JSON object per line$"):
        load_texts(str(corpus), FakeTokenizer())
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_bytes(b'{"text": 3}\n')
    with pytest.raises(ValueError, match=rf"^{wrong}:1: expected an object with a string 'text' or a list 'messages' field"):
        load_texts(str(wrong), FakeTokenizer())
