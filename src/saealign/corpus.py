"""Text corpora for SAE training and evaluation.

A corpus is plain text (`.txt`: one document per line; `.jsonl/.json/.parquet` with a `text` field
or chat `messages`), a preference file or HF-RLHF directory (each triple gives two chat-rendered
dialogues: prompt + chosen and prompt + rejected), or a HF dataset name.
"""

from __future__ import annotations

from pathlib import Path

from saealign import data


def render_dialogue(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def preference_texts(tokenizer, triples) -> list[str]:
    """Both dialogues of every triple, rendered with the model's chat template."""
    texts = []
    for t in triples:
        for response in (t.chosen, t.rejected):
            texts.append(render_dialogue(tokenizer, list(t.prompt) + [{"role": "assistant", "content": response}]))
    return texts


def _record_text(record, tokenizer, where: str) -> str:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return render_dialogue(tokenizer, record["messages"])
    got = f"fields {sorted(record)}" if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: expected an object with a string 'text' or a list 'messages' field, got {got}")


def sample_texts(texts: list[str], n: int | None, seed: int = 0) -> list[str]:
    """A seeded sample of at most `n` texts, kept in corpus order."""
    if not n or n >= len(texts):
        return texts
    import numpy as np

    return [texts[i] for i in sorted(np.random.default_rng(seed).choice(len(texts), n, replace=False))]


def load_texts(source: str, tokenizer, role: str | None = None, split_seed: int = 0) -> list[str]:
    """Texts of a corpus. `role` selects a data role (fit, validation, test_helpful, ...) when
    `source` is an HH-RLHF directory laid out as in the shared data; `split_seed` is the seed of
    that split (keep 0, the protocol's, so validation text never leaks into training).

    Preference sources go through `data.select_triples`, so they are checked by the same rules as
    for fitting; a corpus without any text is refused here, before activations are extracted.
    """
    path = data.local_path(source)
    if path is not None and (path.is_dir() or role is not None or _is_preference_file(path)):
        texts = preference_texts(tokenizer, data.select_triples(source, role, split_seed=split_seed))
    elif path is not None and path.name.lower().removesuffix(".gz").endswith(".txt"):
        texts = [line for _, line in data.read_lines(path) if line.strip()]
    elif path is not None:
        texts = [_record_text(record, tokenizer, f"{path}:{line}") for line, record in data.read_records(path)]
    else:
        import datasets

        ds = datasets.load_dataset(source, split="train")
        texts = [_record_text(r, tokenizer, f"{source}:{i}") for i, r in enumerate(ds, 1)]
    if not texts:
        raise ValueError(f"no texts in {source}")
    return texts


def _is_preference_file(path: Path) -> bool:
    """Peek at the first record: preference data has chosen/rejected fields."""
    if not path.name.lower().removesuffix(".gz").endswith((".jsonl", ".json")):
        return False
    record = next((record for _, record in data.read_records(path)), None)
    return isinstance(record, dict) and "chosen" in record and "rejected" in record
