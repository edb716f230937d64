"""Preference data: formats, errors, the SPLITS.md data roles, seeded draws, chat rendering, batching, CLI."""

import gzip
import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import build_tiny
from saealign.data import (
    HH_SUBSETS,
    LoadReport,
    PreferenceDataError,
    PreferenceTriple,
    RenderError,
    collate_pairs,
    drop_ties,
    hh_rlhf_roles,
    length_batches,
    load_preferences,
    render_triple,
    render_triples,
    restrict,
    sample,
    split_validation,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def core(triples):
    return [(t.prompt, t.chosen, t.rejected) for t in triples]


# ------------------------------------------------------------------------------------------ formats

def test_hh_raw_splits_prompt_and_keeps_earlier_turns(caplog):
    report = LoadReport()
    with caplog.at_level(logging.WARNING, logger="saealign.data"):
        triples = load_preferences(FIXTURES / "hh_raw.jsonl", report=report)
    assert report.read == 5 and report.kept == 4 and report.dropped == {"identical": 1}
    assert "identical" in caplog.text  # the drop is logged, not silent
    single, multi, diverging, consecutive = triples
    assert single.prompt == [{"role": "user", "content": "What is the capital of France?"}]
    assert (single.chosen, single.rejected) == ("Paris is the capital of France.", "I don't know.")
    assert [m["role"] for m in multi.prompt] == ["user", "assistant", "user"]
    assert multi.prompt[1]["content"] == "Great! What kind?" and multi.rejected == "Bread is food."
    # the dialogues diverge at the first reply: the prompt is what they share, not chosen's last turn
    assert diverging.prompt == [{"role": "user", "content": "Name a fruit."}]
    assert diverging.chosen == "An apple." and diverging.rejected.startswith("Hmm.") and "A rock." in diverging.rejected
    assert report.warnings["turn_markers_in_response"] == 1
    warned = [p for p in report.problems if p.reason == "turn_markers_in_response"]
    assert warned[0].field == "rejected" and warned[0].line == 4 and warned[0].action == "kept"
    assert consecutive.prompt == [{"role": "user", "content": "Hello.\n\nAre you there?"}]
    assert single.meta["line"] == 1 and consecutive.meta["line"] == 5 and single.meta["format"] == "hh-rlhf"


def test_standard_format_and_meta():
    triples = load_preferences(FIXTURES / "standard.jsonl", subset="uf")
    assert len(triples) == 3
    assert triples[0].prompt == [{"role": "user", "content": "how to boil an egg"}]
    assert triples[1].chosen.startswith("Soft rain") and triples[1].chosen.endswith("earth")  # stripped
    assert triples[0].meta["extra"]["source_index"] == 7 and triples[0].meta["subset"] == "uf"
    assert {t.meta["format"] for t in triples} == {"standard"}
    assert len({t.meta["id"] for t in triples}) == 3


def test_conversational_prompt_field_with_system_and_multiturn():
    triples = load_preferences(FIXTURES / "conversational.json")
    assert triples[0].prompt[0] == {"role": "system", "content": "You are terse."}
    assert (triples[0].chosen, triples[0].rejected) == ("Rome.", "Milan.")
    assert [m["role"] for m in triples[1].prompt] == ["user", "assistant", "user"]
    assert triples[0].meta["id"] == "c1" and triples[0].meta["format"] == "conversational"


def test_conversational_implicit_prompt_and_h4_style():
    report = LoadReport()
    triples = load_preferences(FIXTURES / "conversational_implicit.jsonl", report=report)
    assert triples[0].prompt == [{"role": "user", "content": "Translate 'cat' to French."}]
    assert (triples[0].chosen, triples[0].rejected) == ("Chat.", "Chien.")
    assert triples[1].prompt == [{"role": "user", "content": "List two colours."}]  # prompt string + full conversations
    assert report.formats == {"conversational-implicit": 1, "conversational": 1}


def test_hh_split_prompt_string_matches_raw(tmp_path):
    raw = load_preferences(FIXTURES / "hh_raw.jsonl")
    records = []
    for line in (FIXTURES / "hh_raw.jsonl").read_text().splitlines()[:2]:
        r = json.loads(line)
        cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        records.append({"prompt": r["chosen"][:cut], "chosen": r["chosen"][cut:], "rejected": r["rejected"][cut:]})
    split = load_preferences(write_jsonl(tmp_path / "split.jsonl", records))
    assert core(split) == core(raw[:2]) and split[0].meta["format"] == "hh-rlhf-split"


@pytest.mark.parametrize("kind", ["jsonl.gz", "json", "json.gz", "parquet"])
def test_containers_give_identical_triples(tmp_path, kind):
    source = FIXTURES / "standard.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines()]
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl.gz":
        with gzip.open(path, "wt") as fh:
            fh.write(source.read_text())
    elif kind == "json":
        path.write_text(json.dumps({"data": records}))
    elif kind == "json.gz":
        with gzip.open(path, "wt") as fh:
            json.dump(records, fh)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    got = load_preferences(path)
    assert core(got) == core(load_preferences(source))
    assert [t.meta["line"] for t in got] == [1, 2, 3]
    assert got[0].meta["extra"]["metadata"]["score_chosen"] == 8.0


def test_limit_and_column_mapping(tmp_path):
    assert len(load_preferences(FIXTURES / "hh_raw.jsonl", limit=2)) == 2
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"question": "Q?", "good": "Yes.", "bad": "No."}])
    (t,) = load_preferences(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert (t.prompt[0]["content"], t.chosen, t.rejected) == ("Q?", "Yes.", "No.")


def test_hub_path_parses_like_local_files(tmp_path):
    # the `datasets.load_dataset` code path, offline: its "json" builder reads a local file
    report = LoadReport()
    got = load_preferences("json", split="train", report=report,
                           hf_kwargs={"data_files": str(FIXTURES / "hh_raw.jsonl"), "cache_dir": str(tmp_path)})
    assert core(got) == core(load_preferences(FIXTURES / "hh_raw.jsonl"))
    assert report.sources == ["json[train]"] and report.dropped == {"identical": 1}
    assert got[-1].meta["line"] == 5


def test_local_paths_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(IsADirectoryError):
        load_preferences(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_preferences(FIXTURES / "standard.jsonl", split="train")


# ------------------------------------------------------------------------------------------ errors

BAD = [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, None, None),
    ('{"prompt": "p", "chosen": "a",', "malformed_json", None),
    ({"prompt": "p", "chosen": "a"}, "missing_field", "rejected"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty_response", "chosen"),
    ({"chosen": "plain a", "rejected": "plain b"}, "missing_field", "prompt"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "invalid_field", "prompt[0].role"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]}, "invalid_field", "rejected"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "invalid_field", "chosen"),
]


@pytest.mark.parametrize("line", range(2, len(BAD) + 1))
def test_errors_name_file_line_and_field(tmp_path, line):
    path = write_jsonl(tmp_path / "bad.jsonl", [BAD[0][0], BAD[line - 1][0]])
    with pytest.raises(PreferenceDataError) as info:
        load_preferences(path)
    _, reason, field = BAD[line - 1]
    message = str(info.value)
    assert message.startswith(f"{path}:2: ")
    if field is not None:
        assert f"field {field!r}" in message
    assert info.value.problem.reason == reason


def test_drop_mode_collects_every_problem(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [record for record, _, _ in BAD])
    report = LoadReport()
    triples = load_preferences(path, errors="drop", report=report)
    assert len(triples) == 1 and report.read == len(BAD) and report.kept == 1
    assert sum(report.dropped.values()) == len(BAD) - 1  # nothing disappears without a count
    assert [p.line for p in report.problems] == list(range(2, len(BAD) + 1))
    assert all(p.action == "dropped" for p in report.problems)


def test_empty_response_allowed_as_warning(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "chosen": "", "rejected": "b"}])
    report = LoadReport()
    (t,) = load_preferences(path, allow_empty=True, report=report)
    assert t.chosen == "" and report.warnings == {"empty_response": 1} and report.problems[0].action == "kept"


def test_drop_ties_counts():
    report = LoadReport()
    triples = drop_ties(load_preferences(FIXTURES / "standard.jsonl", report=report), report)
    assert [t.meta["extra"]["source_index"] for t in triples] == [7, 12]
    assert report.dropped["score_tie"] == 1 and report.kept == 2
    implicit = drop_ties(load_preferences(FIXTURES / "conversational_implicit.jsonl"))  # top-level scores
    assert len(implicit) == 1
    with pytest.raises(ValueError, match="score_chosen"):
        drop_ties(load_preferences(FIXTURES / "hh_raw.jsonl"))


# ------------------------------------------------------------------------------------------ draws

def synthetic(n_a=60, n_b=140):
    return [PreferenceTriple([{"role": "user", "content": f"{s}{i}"}], "c", "r", {"subset": s, "id": f"{s}/{i}"})
            for s, n in (("a", n_a), ("b", n_b)) for i in range(n)]


def ids(triples):
    return [t.meta["id"] for t in triples]


def test_split_validation_is_seeded_stratified_and_disjoint():
    data = synthetic()
    fit, val = split_validation(data, 0.15, seed=3)
    assert Counter(t.meta["subset"] for t in val) == {"a": 9, "b": 21}
    assert sorted(ids(fit) + ids(val)) == sorted(ids(data)) and not set(ids(fit)) & set(ids(val))
    assert ids(split_validation(data, 0.15, seed=3)[1]) == ids(val)
    assert ids(split_validation(data, 0.15, seed=4)[1]) != ids(val)
    assert ids(val) == [i for i in ids(data) if i in set(ids(val))]  # original order kept


def test_restrict_is_seeded_and_nested():
    data = synthetic()
    small, large = restrict(data, 20, seed=1), restrict(data, 80, seed=1)
    assert len(small) == 20 and set(ids(small)) <= set(ids(large))
    assert ids(restrict(data, 20, seed=1)) == ids(small) and ids(restrict(data, 20, seed=2)) != ids(small)
    with pytest.raises(ValueError):
        restrict(data, 201)


def test_sample_is_proportional():
    data = synthetic(n_a=30, n_b=70)
    drawn = sample(data, 10, seed=0)
    assert Counter(t.meta["subset"] for t in drawn) == {"a": 3, "b": 7}
    assert ids(sample(data, 10, seed=0)) == ids(drawn)
    assert Counter(t.meta["subset"] for t in sample(data, 15, seed=0)) in ({"a": 5, "b": 10}, {"a": 4, "b": 11})


# ------------------------------------------------------------------------------------------ real HH-RLHF roles

def _first_human(dialogue: str) -> str:
    return re.split(r"\n\n(?:Human|Assistant):", dialogue.split("Human:", 1)[1])[0].strip()


@pytest.fixture(scope="module")
def roles(shared_data):
    return hh_rlhf_roles(shared_data, seed=0)


def test_roles_counts_follow_splits_arithmetic(roles, shared_data):
    raw = {s: [json.loads(line) for line in gzip.open(shared_data / "hh-rlhf" / s / "test.jsonl.gz", "rt")]
           for s in HH_SUBSETS}
    identical = {s: sum(r["chosen"] == r["rejected"] for r in rows) for s, rows in raw.items()}
    instructions = set()
    for path in (shared_data / "alpaca-eval").rglob("model_outputs.json"):
        instructions |= {r["instruction"].strip() for r in json.loads(path.read_text()) if r["dataset"] == "helpful_base"}
    firsts = [_first_human(r["chosen"]) for r in raw["helpful-base"]]
    contaminated = sum(f in instructions for f in firsts)
    assert len(instructions) == 129 and instructions <= set(firsts)  # every AlpacaEval helpful_base item occurs

    summary = roles.summary()
    pool = {s: len(raw[s]) - identical[s] for s in ("helpful-online", "helpful-rejection-sampled")}
    assert sum(len(raw[s]) for s in pool) == 3886
    assert summary["counts_by_subset"]["validation"] == {s: round(0.15 * n) for s, n in pool.items()}
    assert len(roles["fit"]) + len(roles["validation"]) == sum(pool.values())
    assert len(roles["test_helpful"]) == len(raw["helpful-base"]) - identical["helpful-base"] - contaminated
    harmless = len(raw["harmless-base"]) - identical["harmless-base"]
    assert len(roles["test_harmless"]) == harmless - round(0.4 * harmless) - round(0.1 * harmless)  # SPLITS.md's test half
    assert summary["alpaca_eval_contamination"] == {"instructions": 129, "instructions_matched": 129,
                                                    "removed_test_helpful": contaminated, "removed_fit_pool": 0}
    assert summary["load"]["read"] == sum(len(rows) for rows in raw.values())
    assert summary["load"]["dropped"] == {"identical": sum(identical.values())}
    assert summary["seed"] == 0 and json.loads(json.dumps(summary)) == summary


def test_roles_are_disjoint_and_decontaminated(roles, shared_data):
    seen: set[str] = set()
    for triples in roles.values():
        role_ids = {t.meta["id"] for t in triples}
        assert len(role_ids) == len(triples) and not role_ids & seen
        seen |= role_ids
    instructions = set()
    for path in (shared_data / "alpaca-eval").rglob("model_outputs.json"):
        instructions |= {r["instruction"].strip() for r in json.loads(path.read_text()) if r["dataset"] == "helpful_base"}
    for role in ("fit", "validation", "test_helpful"):
        firsts = {next(m["content"] for m in t.prompt if m["role"] == "user") for t in roles[role]}
        assert not firsts & instructions
    assert {t.meta["subset"] for t in roles["fit"]} == {"helpful-online", "helpful-rejection-sampled"}


def test_roles_split_is_deterministic(roles, shared_data):
    again = hh_rlhf_roles(shared_data / "hh-rlhf", seed=0)  # the hh-rlhf folder itself works too
    assert ids(again["validation"]) == ids(roles["validation"])
    assert again.summary()["fingerprints"] == roles.summary()["fingerprints"]
    other = hh_rlhf_roles(shared_data, seed=1)
    assert ids(other["validation"]) != ids(roles["validation"])
    assert ids(other["test_helpful"]) == ids(roles["test_helpful"])


# ------------------------------------------------------------------------------------------ rendering

def text_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def hh_triples():
    return load_preferences(FIXTURES / "hh_raw.jsonl") + load_preferences(FIXTURES / "conversational.json")


def test_render_prompt_ends_with_generation_prompt_and_prefix_holds(smol_tokenizer, hh_triples):
    tok = smol_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for triple in hh_triples:
        r = render_triple(tok, triple)
        assert r.prompt_ids[-len(text_ids(tok, "<|im_start|>assistant\n")):] == text_ids(tok, "<|im_start|>assistant\n")
        for reply, text in ((r.chosen_ids, triple.chosen), (r.rejected_ids, triple.rejected)):
            full = tok.apply_chat_template(triple.prompt + [{"role": "assistant", "content": text}], tokenize=False)
            full_ids = text_ids(tok, full)
            assert full_ids[:len(r.prompt_ids) + len(reply)] == r.prompt_ids + reply
            assert tok.decode(full_ids[len(r.prompt_ids) + len(reply):]).strip() == ""  # only the "\n" separator left
            assert reply[-1] == end and reply.count(end) == 1  # one end-of-turn, no doubled EOS
            assert tok.decode(reply[:-1], clean_up_tokenization_spaces=False) == text
        prompt_text = tok.apply_chat_template(triple.prompt, tokenize=False, add_generation_prompt=True)
        assert tok.decode(r.prompt_ids, clean_up_tokenization_spaces=False) == prompt_text  # no extra BOS
    multi = render_triple(tok, hh_triples[1])
    assert "Great! What kind?" in tok.decode(multi.prompt_ids)


def test_render_batch_equals_single_and_system_prompt(smol_tokenizer, hh_triples):
    batch = render_triples(smol_tokenizer, hh_triples, chunk_size=2)
    for triple, rendered in zip(hh_triples, batch):
        single = render_triple(smol_tokenizer, triple)
        assert (rendered.prompt_ids, rendered.chosen_ids, rendered.rejected_ids) == (
            single.prompt_ids, single.chosen_ids, single.rejected_ids)
    with_sys = smol_tokenizer.decode(render_triple(smol_tokenizer, hh_triples[0], system_prompt="Be kind.").prompt_ids)
    assert with_sys.startswith("<|im_start|>system\nBe kind.<|im_end|>") and "SmolLM" not in with_sys
    joined = smol_tokenizer.decode(render_triple(smol_tokenizer, hh_triples[4], system_prompt="Be kind.").prompt_ids)
    assert joined.count("<|im_start|>system") == 1 and "Be kind.\n\nYou are terse." in joined


def test_render_truncation_keeps_prompt_end_and_response_start(smol_tokenizer, hh_triples):
    triple = hh_triples[1]
    full = render_triple(smol_tokenizer, triple)
    limit = len(full.prompt_ids) - 10 + 6
    cut = render_triple(smol_tokenizer, triple, max_length=limit)
    assert cut.truncated and not full.truncated
    assert len(cut.prompt_ids) + max(len(cut.chosen_ids), len(cut.rejected_ids)) <= limit
    assert cut.prompt_ids == full.prompt_ids[len(full.prompt_ids) - len(cut.prompt_ids):]
    assert cut.chosen_ids == full.chosen_ids[:len(cut.chosen_ids)]
    assert len(cut.prompt_ids) >= limit // 2
    tight = render_triple(smol_tokenizer, triple, max_length=20)
    assert len(tight.prompt_ids) == 10 and len(tight.chosen_ids) == 10 < len(full.chosen_ids)
    assert tight.prompt_ids == full.prompt_ids[-10:] and tight.chosen_ids == full.chosen_ids[:10]
    roomy = render_triple(smol_tokenizer, triple, max_length=full.length() + 5)
    assert not roomy.truncated and roomy.chosen_ids == full.chosen_ids


def test_render_error_when_prompt_is_not_a_prefix(smol_tokenizer, hh_triples):
    original = smol_tokenizer.chat_template
    smol_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}")
    try:
        with pytest.raises(RenderError, match=r"hh_raw.jsonl:1: .*prefix"):
            render_triple(smol_tokenizer, hh_triples[0])
    finally:
        smol_tokenizer.chat_template = original


# ------------------------------------------------------------------------------------------ batching

def test_collate_masks_and_padding(smol_tokenizer, hh_triples):
    rendered = render_triples(smol_tokenizer, hh_triples)
    batch = collate_pairs(rendered, smol_tokenizer, which="both")
    n = len(rendered)
    assert batch["input_ids"].shape[0] == 2 * n
    for i, r in enumerate(rendered):
        for row, reply in ((i, r.chosen_ids), (n + i, r.rejected_ids)):
            mask = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][mask].tolist() == r.prompt_ids + reply
            assert batch["input_ids"][row][batch["response_mask"][row]].tolist() == reply
            assert mask[-1] and batch["position_ids"][row][mask].tolist() == list(range(len(r.prompt_ids) + len(reply)))
            assert not (batch["response_mask"][row] & ~mask).any()
    right = collate_pairs(rendered, smol_tokenizer, which="rejected", pad_side="right")
    assert right["attention_mask"][:, 0].all()
    assert right["input_ids"][right["response_mask"]].tolist() == [t for r in rendered for t in r.rejected_ids]


def test_left_padding_does_not_change_response_logits(smol_tokenizer, hh_triples):
    model = build_tiny("llama")  # vocab 512: token ids are folded into it, padding is what is tested
    rendered = render_triples(smol_tokenizer, hh_triples[:3])
    batch = collate_pairs(rendered, smol_tokenizer, which="chosen")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"] % 512, attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        for i, r in enumerate(rendered):
            alone = model(input_ids=torch.tensor([r.prompt_ids + r.chosen_ids]) % 512).logits[0]
            torch.testing.assert_close(logits[i][batch["response_mask"][i]], alone[len(r.prompt_ids):], rtol=1e-4, atol=1e-4)


def test_length_batches_cover_all_and_respect_budgets(smol_tokenizer, hh_triples):
    rendered = render_triples(smol_tokenizer, hh_triples * 3)
    batches = length_batches(rendered, batch_size=4)
    assert sorted(i for b in batches for i in b) == list(range(len(rendered)))
    assert all(len(b) <= 4 for b in batches)
    lengths = [[rendered[i].length() for i in b] for b in batches]
    assert all(ls == sorted(ls, reverse=True) for ls in lengths)
    budget = 2 * max(r.length() for r in rendered) * 2
    for b in length_batches(rendered, max_tokens=budget):
        assert len(b) == 1 or 2 * len(b) * max(rendered[i].length() for i in b) <= budget
    assert length_batches(rendered, batch_size=4, seed=1) == length_batches(rendered, batch_size=4, seed=1)
    assert sorted(map(tuple, length_batches(rendered, batch_size=4, seed=1))) == sorted(map(tuple, batches))


# ------------------------------------------------------------------------------------------ CLI

def test_cli_inspect(tmp_path, smol_tokenizer):
    from typer.testing import CliRunner

    import saealign.cli.data_cmd  # noqa: F401  (registers the command)
    from saealign.cli import app

    source = tmp_path / "mixed.jsonl"
    shutil.copy(FIXTURES / "hh_raw.jsonl", source)
    with open(source, "a") as fh:
        fh.write('{"prompt": "p", "chosen": "a"}\n{not json\n')
    tok_dir = tmp_path / "tok"
    smol_tokenizer.save_pretrained(tok_dir)
    out = tmp_path / "stats.json"
    result = CliRunner().invoke(app, ["data", "inspect", str(source), "--model", str(tok_dir), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "read 7, kept 4" in result.output and "hh-rlhf" in result.output
    assert "problems (4)" in result.output
    stats = json.loads(out.read_text())
    assert any(p.startswith(f"{source}:6: field 'rejected': missing") for p in stats["problems"])
    assert stats["dropped"] == {"identical": 1, "missing_field": 1, "malformed_json": 1}
    assert stats["user_turns"] == {"1": 3, "2": 1}
    assert stats["lengths"]["tokens"]["prompt"]["min"] > stats["lengths"]["tokens"]["chosen"]["min"]
    missing = CliRunner().invoke(app, ["data", "inspect", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code != 0 and "nope.jsonl" in missing.output
