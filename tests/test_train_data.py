"""Tests of training data loading, tokenization, batching and the offline BPE tokenizer.

Small files written to tmp_path cover each layout and each kind of bad input. The alpaca-libre files in the shared
data folder are the real input, and the tests that read them skip when that folder is absent.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Set before anything imports huggingface_hub, which reads it at import. Nothing in these tests may download.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import transformers

from lisa_tune.errors import InputError
from lisa_tune.train.data import (
    IGNORE_INDEX,
    AlpacaRecord,
    ChatMessage,
    ChatRecord,
    Example,
    TextRecord,
    TokenizationStats,
    TokenizedDataset,
    collate,
    format_alpaca_prompt,
    load_records,
    make_dataloader,
    pack_dataset,
    record_texts,
    split_holdout,
    tokenize_records,
)
from lisa_tune.train.tokenizer import MIN_VOCAB_SIZE, train_bpe_tokenizer

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca-libre"
requires_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"the alpaca-libre data set is not at {DATA_DIR}, so the real-data tests skip"
)
V1_RECORDS = 2375
V2_LINES = 2294
V2_MALFORMED = 14
V2_FIRST_MALFORMED_LINE = 2279

CORPUS = [
    "Write a short poem about the sea.",
    "The sea is wide and the waves are high.",
    "Translate the sentence into French.",
    "Hello, how are you today? I am fine, thank you.",
    "Summarize the text in one sentence.",
    "### Instruction:\n### Input:\n### Response:\n### User:\n### Assistant:\n### System:\n",
] * 20

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path: Path, objects: list[Any]) -> Path:
    path.write_text("".join(json.dumps(value) + "\n" for value in objects), encoding="utf-8")
    return path


def trained_labels(example: Example) -> list[int]:
    return [label for label in example.labels if label != IGNORE_INDEX]


def stats_for(examples: list[Example]) -> TokenizationStats:
    tokens = sum(len(example.input_ids) for example in examples)
    return TokenizationStats(
        record_count=len(examples),
        example_count=len(examples),
        truncated_count=0,
        truncated_lines=[],
        dropped_count=0,
        dropped_lines=[],
        token_count=tokens,
        trainable_token_count=tokens,
    )


def make_dataset(size: int) -> TokenizedDataset:
    """Build a data set of ``size`` two-token examples whose ``line`` identifies them, without a tokenizer."""
    examples = [Example(input_ids=[i, i + 1], labels=[i, i + 1], line=i + 1) for i in range(size)]
    return TokenizedDataset(examples, pad_token_id=0, max_length=8, packed=False, stats=stats_for(examples))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(CORPUS, 400, output_dir)
    return output_dir


@pytest.fixture
def tokenizer(tokenizer_dir: Path) -> Any:
    # A fresh copy for each test, so that a test may set a chat template without affecting the others.
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def propagate_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The command line stops lisa_tune records at its own handler; caplog listens on the root logger.
    monkeypatch.setattr(logging.getLogger("lisa_tune"), "propagate", True)
    yield


# Loading


def test_load_alpaca_layout(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hello.", "output": "Hello."},
        ],
    )
    loaded = load_records(path)
    assert loaded.records == [
        AlpacaRecord(instruction="Add the numbers.", input="2 and 3", output="5", line=1),
        AlpacaRecord(instruction="Say hello.", input="", output="Hello.", line=2),
    ]
    assert loaded.layout_counts() == {"alpaca": 2, "chat": 0, "text": 0}
    assert loaded.malformed_count == 0


def test_load_chat_layout(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    loaded = load_records(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]))
    expected = ChatRecord(
        messages=(
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Hi"),
            ChatMessage(role="assistant", content="Hello."),
        ),
        line=1,
    )
    assert loaded.records == [expected]


def test_load_text_layout(tmp_path: Path) -> None:
    loaded = load_records(write_jsonl(tmp_path / "text.jsonl", [{"text": "one"}, {"text": "two"}]))
    assert loaded.records == [TextRecord(text="one", line=1), TextRecord(text="two", line=2)]


def test_load_mixed_layouts(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"text": "plain"},
            {"instruction": "Do it.", "output": "Done."},
            {"messages": [{"role": "assistant", "content": "Hi."}]},
        ],
    )
    assert load_records(path).layout_counts() == {"alpaca": 1, "chat": 1, "text": 1}


def test_extra_fields_ignored(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "extra.jsonl",
        [{"instruction": "Say hi.", "input": "", "output": "Hi.", "status": "ok", "other": {"similarity": 0.5}}],
    )
    loaded = load_records(path)
    assert loaded.records == [AlpacaRecord(instruction="Say hi.", input="", output="Hi.", line=1)]
    assert loaded.malformed_count == 0


def test_load_json_array_lines(tmp_path: Path) -> None:
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"text": "one"}, {"oops": 1}, {"text": "three"}], indent=2), encoding="utf-8")
    loaded = load_records(path)
    # indent=2 puts each object's opening brace on lines 2, 5 and 8.
    assert [record.line for record in loaded.records] == [2, 8]
    assert loaded.malformed_lines == [5]


def test_blank_lines_not_malformed(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": "one"}\n\n   \n{"text": "two"}\r\n', encoding="utf-8")
    loaded = load_records(path)
    assert loaded.malformed_count == 0
    assert [record.line for record in loaded.records] == [1, 4]


def test_malformed_line_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture, propagate_logs: None) -> None:
    path = tmp_path / "damaged.jsonl"
    lines = ['{"text": "one"}', '{"text": "two"', "[1, 2]", '{"text": "four"}', '{"prompt": "five"}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lisa_tune.train.data"):
        loaded = load_records(path)
    assert len(loaded.records) == 2
    assert loaded.malformed_count == 3
    assert loaded.malformed_lines == [2, 3, 5]
    assert loaded.malformed[0].reason.startswith("is not valid JSON")
    assert loaded.malformed[1].reason == "is a JSON array, not an object"
    assert len(caplog.records) == 1
    assert "skipped 3 malformed" in caplog.text


def test_malformed_lines_capped(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text('{"text": "ok"}\n' + "not json\n" * 25, encoding="utf-8")
    loaded = load_records(path)
    assert loaded.malformed_count == 25
    assert loaded.malformed_lines == list(range(2, 12))


def test_strict_raises_naming_line(tmp_path: Path) -> None:
    path = tmp_path / "damaged.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"^Line 3 of .*damaged\.jsonl is not valid JSON") as caught:
        load_records(path, strict=True)
    assert "without strict mode" in str(caught.value)


def test_strict_raises_on_wrong_type(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "typed.jsonl", [{"text": "one"}, {"instruction": "Do it.", "output": 5}])
    with pytest.raises(InputError, match=r"Line 2 of .* has an 'output' that is a JSON number, not a string"):
        load_records(path, strict=True)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"instruction": "Do it."}, "has an 'instruction' but no 'output'"),
        ({"instruction": "Do it.", "input": 3, "output": "x"}, "has an 'input' that is a JSON number, not a string"),
        ({"messages": "hi"}, "has 'messages' that is a JSON string, not an array"),
        ({"messages": []}, "has an empty 'messages' array"),
        ({"messages": [{"role": "user"}]}, "has message 1 without a string 'content'"),
        ({"messages": [{"content": "hi"}]}, "has message 1 without a string 'role'"),
        ({"text": None}, "has a 'text' that is a JSON null, not a string"),
        ("just a string", "is a JSON string, not an object"),
    ],
)
def test_malformed_reasons(tmp_path: Path, value: Any, reason: str) -> None:
    path = write_jsonl(tmp_path / "records.jsonl", [{"text": "fine"}, value])
    loaded = load_records(path)
    assert loaded.malformed_lines == [2]
    assert loaded.malformed[0].reason == reason


def test_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match=r"empty\.jsonl is empty"):
        load_records(path)


def test_empty_array_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("[ ]\n", encoding="utf-8")
    with pytest.raises(InputError, match="contains an empty JSON array"):
        load_records(path)


def test_non_json_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\nSay hi,Hi\n", encoding="utf-8")
    with pytest.raises(
        InputError, match=r"data\.csv has no valid record among its 2 entries \(line 1 is not valid JSON"
    ):
        load_records(path)


def test_binary_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b'{"text": "ok"}\n\xff\xfe\x00\x01\n')
    with pytest.raises(InputError, match=r"^Line 2 of .*data\.bin is not valid UTF-8"):
        load_records(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"absent\.jsonl not found"):
        load_records(tmp_path / "absent.jsonl")


def test_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        load_records(tmp_path)


def test_unknown_layout_raises(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "unknown.jsonl", [{"prompt": "a", "completion": "b"}, {"question": "c"}])
    with pytest.raises(InputError, match=r"\(line 1 has none of the keys 'instruction', 'messages' or 'text'"):
        load_records(path)


def test_one_line_object_names_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text('{"foo": 1}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"line 1 has none of the keys 'instruction', 'messages' or 'text'"):
        load_records(path)


def test_single_object_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "object.json"
    path.write_text(json.dumps({"data": [{"text": "one"}]}, indent=2), encoding="utf-8")
    with pytest.raises(InputError, match="contains one JSON object"):
        load_records(path)


def test_json_array_syntax_error_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "one"},\n  {"text": "two",}\n]\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"broken\.json is not valid JSON at line 3"):
        load_records(path)


def test_json_array_trailing_text_raises(tmp_path: Path) -> None:
    path = tmp_path / "trailing.json"
    path.write_text('[{"text": "one"}]\n{"text": "two"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"at line 2, column 1 \(extra data after the closing '\]'\)"):
        load_records(path)


def test_keep_filter(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "status.jsonl",
        [
            {"text": "one", "status": "ok"},
            {"text": "two", "status": "too similar"},
            {"text": "three", "status": "ok"},
        ],
    )
    loaded = load_records(path, keep=lambda value: value.get("status") == "ok")
    assert [record.line for record in loaded.records] == [1, 3]
    assert loaded.filtered_count == 1


def test_keep_rejecting_all_raises(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "status.jsonl", [{"text": "one", "status": "error"}])
    with pytest.raises(InputError, match="1 were rejected by the keep filter"):
        load_records(path, keep=lambda value: value.get("status") == "ok")


def test_empty_responses_skipped(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "empty.jsonl",
        [
            {"instruction": "Say hi.", "output": " "},
            {"text": ""},
            {"messages": [{"role": "user", "content": "Hi"}]},
            {"text": "kept"},
        ],
    )
    loaded = load_records(path, strict=True)
    assert loaded.empty_count == 3
    assert loaded.empty_lines == [1, 2, 3]
    assert loaded.records == [TextRecord(text="kept", line=4)]


# Tokenization


def test_alpaca_labels_response_only(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Write a poem.", "input": "the sea", "output": "Waves."}])
    dataset = tokenize_records(load_records(path), tokenizer, max_length=256)
    example = dataset[0]
    prompt_ids = tokenizer(format_alpaca_prompt("Write a poem.", "the sea"))["input_ids"]  # starts with BOS
    response_ids = tokenizer("Waves.", add_special_tokens=False)["input_ids"]
    prompt_length = len(prompt_ids)

    assert example.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example.labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert example.labels[prompt_length:] == example.input_ids[prompt_length:]
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_alpaca_prompt_without_input() -> None:
    assert format_alpaca_prompt("Say hi.") == "### Instruction:\nSay hi.\n\n### Response:\n"


def test_text_labels_all_tokens(tokenizer: Any) -> None:
    dataset = tokenize_records([TextRecord(text="The sea is wide.")], tokenizer, max_length=64)
    example = dataset[0]
    assert example.labels[0] == IGNORE_INDEX  # BOS
    assert example.labels[1:] == example.input_ids[1:]
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_chat_plain_template_labels(tokenizer: Any) -> None:
    record = ChatRecord(
        messages=(
            ChatMessage(role="user", content="Hello"),
            ChatMessage(role="assistant", content="Hi there."),
            ChatMessage(role="user", content="Bye"),
            ChatMessage(role="assistant", content="Goodbye."),
        )
    )
    example = tokenize_records([record], tokenizer, max_length=256)[0]
    eos = tokenizer.eos_token
    assert tokenizer.decode(trained_labels(example)) == f"Hi there.{eos}Goodbye.{eos}"
    assert tokenizer.decode(example.input_ids, skip_special_tokens=True) == (
        "### User:\nHello\n\n### Assistant:\nHi there.### User:\nBye\n\n### Assistant:\nGoodbye."
    )
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_chat_template_labels(tokenizer: Any) -> None:
    tokenizer.chat_template = CHATML_TEMPLATE
    record = ChatRecord(
        messages=(
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Hello"),
            ChatMessage(role="assistant", content="Hi there."),
        )
    )
    example = tokenize_records([record], tokenizer, max_length=256)[0]
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in record.messages], tokenize=False
    )
    assert tokenizer.decode(example.input_ids) == rendered + tokenizer.eos_token
    assert tokenizer.decode(trained_labels(example)) == "Hi there.<|im_end|>\n" + tokenizer.eos_token
    assert example.input_ids[0] != tokenizer.bos_token_id  # the template decides the leading tokens


def test_chat_template_eos_not_doubled(tokenizer: Any) -> None:
    tokenizer.chat_template = CHATML_TEMPLATE.replace("<|im_end|>", tokenizer.eos_token)
    record = ChatRecord(messages=(ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Yo")))
    example = tokenize_records([record], tokenizer, max_length=256)[0]
    assert example.input_ids.count(tokenizer.eos_token_id) == 2


def test_chat_template_error_names_line(tmp_path: Path, tokenizer: Any) -> None:
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + CHATML_TEMPLATE
    )
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
            {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "Yo"}]},
        ],
    )
    with pytest.raises(InputError, match=r"rejected the conversation on line 2 of .*chat\.jsonl \(no system role\)"):
        tokenize_records(load_records(path), tokenizer, max_length=64)


def test_chat_template_not_prefix_stable(tokenizer: Any) -> None:
    # This template marks the end of the whole conversation, so a cut conversation is no prefix of the full one.
    tokenizer.chat_template = CHATML_TEMPLATE + "{% if not add_generation_prompt %}<|end of chat|>{% endif %}"
    record = ChatRecord(
        messages=(
            ChatMessage(role="user", content="Hi"),
            ChatMessage(role="assistant", content="Yo"),
            ChatMessage(role="user", content="Bye"),
            ChatMessage(role="assistant", content="Bye."),
        ),
        line=7,
    )
    with pytest.raises(InputError, match="conversation on line 7 differently when it is cut after a message"):
        tokenize_records([record], tokenizer, max_length=256)


def test_truncation_counted(tokenizer: Any) -> None:
    records = [
        AlpacaRecord(instruction="Say hi.", input="", output="Hi.", line=1),
        AlpacaRecord(instruction="Write a poem.", input="", output="The sea is wide. " * 20, line=2),
    ]
    max_length = 32
    dataset = tokenize_records(records, tokenizer, max_length=max_length)
    assert len(dataset) == 2
    assert dataset.stats.truncated_count == 1
    assert dataset.stats.truncated_lines == [2]
    assert len(dataset[1].input_ids) == max_length
    assert dataset[1].input_ids[-1] != tokenizer.eos_token_id


def test_cut_off_response_dropped(tokenizer: Any) -> None:
    records = [
        AlpacaRecord(instruction="Say hi.", input="", output="Hi.", line=1),
        AlpacaRecord(instruction="Summarize the text. " * 20, input="", output="Short.", line=2),
    ]
    dataset = tokenize_records(records, tokenizer, max_length=32)
    assert len(dataset) == 1
    assert dataset.stats.dropped_count == 1
    assert dataset.stats.dropped_lines == [2]
    assert dataset.stats.truncated_count == 0


def test_all_too_long_raises(tokenizer: Any) -> None:
    records = [AlpacaRecord(instruction="Summarize the text. " * 20, input="", output="Short.")] * 3
    with pytest.raises(InputError, match=r"max_length=16 cuts off the response of all 3 records.*raise the sequence"):
        tokenize_records(records, tokenizer, max_length=16)


def test_tiny_max_length_raises(tokenizer: Any) -> None:
    with pytest.raises(InputError, match="Invalid max_length 1"):
        tokenize_records([TextRecord(text="a")], tokenizer, max_length=1)


def test_packing_full_blocks(tokenizer: Any) -> None:
    records = [
        AlpacaRecord(instruction=f"Write poem {i}.", input="", output="The sea is wide. " * i) for i in range(30)
    ]
    max_length = 48
    unpacked = tokenize_records(records, tokenizer, max_length=max_length)
    packed = tokenize_records(records, tokenizer, max_length=max_length, pack=True)
    total = unpacked.stats.token_count

    assert packed.packed
    assert all(len(block.input_ids) == max_length for block in packed)
    assert all(len(block.labels) == max_length for block in packed)
    assert tokenizer.pad_token_id not in [token for block in packed for token in block.input_ids]
    assert packed.stats.block_count == len(packed)
    assert len(packed) * max_length + packed.stats.pack_discarded_token_count == total
    for block in packed:
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(block.labels, block.input_ids, strict=True))


def test_packing_masks_first_token() -> None:
    # These examples have no BOS, so packing must take the loss off each example's first token.
    examples = [Example(input_ids=[1, 2, 3], labels=[1, 2, 3])] * 4
    dataset = TokenizedDataset(examples, pad_token_id=0, max_length=4, packed=False, stats=stats_for(examples))
    packed = pack_dataset(dataset)
    assert [block.input_ids for block in packed] == [[1, 2, 3, 1], [2, 3, 1, 2], [3, 1, 2, 3]]
    assert [block.labels for block in packed] == [
        [IGNORE_INDEX, 2, 3, IGNORE_INDEX],
        [2, 3, IGNORE_INDEX, 2],
        [3, IGNORE_INDEX, 2, 3],
    ]


def test_packing_skips_blocks_without_loss() -> None:
    examples = [Example(input_ids=[1, 1, 1, 1, 2, 3], labels=[IGNORE_INDEX] * 4 + [2, 3])] * 2
    dataset = TokenizedDataset(examples, pad_token_id=0, max_length=4, packed=False, stats=stats_for(examples))
    packed = pack_dataset(dataset)
    assert [block.input_ids for block in packed] == [[2, 3, 1, 1], [1, 1, 2, 3]]
    assert packed.stats.pack_discarded_token_count == 4


def test_packing_too_few_tokens_raises(tokenizer: Any) -> None:
    with pytest.raises(InputError, match="fewer than one packed block of max_length=512"):
        tokenize_records([TextRecord(text="Hi.")], tokenizer, max_length=512, pack=True)


# Batching and splitting


def test_collate_pads(tokenizer: Any) -> None:
    dataset = tokenize_records([TextRecord(text="Hi."), TextRecord(text="The sea is wide.")], tokenizer, max_length=64)
    batch = dataset.collate([dataset[0], dataset[1]])
    short = len(dataset[0].input_ids)
    width = len(dataset[1].input_ids)

    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0, short:].tolist() == [tokenizer.pad_token_id] * (width - short)
    assert batch["labels"][0, short:].tolist() == [IGNORE_INDEX] * (width - short)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (width - short)
    assert batch["attention_mask"][1].tolist() == [1] * width


def test_collate_given_pad_id() -> None:
    example = Example(input_ids=[5], labels=[5])
    longer = Example(input_ids=[5, 6], labels=[5, 6])
    batch = collate([example, longer], pad_token_id=7)
    assert batch["input_ids"].tolist() == [[5, 7], [5, 6]]


def test_pad_falls_back_to_eos(tokenizer: Any) -> None:
    tokenizer.pad_token = None
    dataset = tokenize_records([TextRecord(text="Hi.")], tokenizer, max_length=64)
    assert dataset.pad_token_id == tokenizer.eos_token_id


def batch_ids(dataset: TokenizedDataset, seed: int) -> list[list[list[int]]]:
    loader = make_dataloader(dataset, batch_size=4, seed=seed)
    return [batch["input_ids"].tolist() for _ in range(2) for batch in loader]


def test_dataloader_same_seed_same_batches() -> None:
    dataset = make_dataset(40)
    torch.manual_seed(1)
    first = batch_ids(dataset, seed=7)
    torch.manual_seed(2)  # the loader must not depend on the global random state
    second = batch_ids(dataset, seed=7)
    assert first == second


def test_dataloader_seed_changes_order() -> None:
    dataset = make_dataset(40)
    assert batch_ids(dataset, seed=7) != batch_ids(dataset, seed=8)


def test_dataloader_epochs_differ() -> None:
    batches = batch_ids(make_dataset(40), seed=7)
    assert batches[:10] != batches[10:]


def test_holdout_deterministic() -> None:
    dataset = make_dataset(100)
    train_a, held_a = split_holdout(dataset, 0.1, seed=3)
    train_b, held_b = split_holdout(dataset, 0.1, seed=3)
    assert [e.line for e in held_a] == [e.line for e in held_b]
    assert [e.line for e in train_a] == [e.line for e in train_b]


def test_holdout_disjoint_and_complete() -> None:
    dataset = make_dataset(100)
    train, heldout = split_holdout(dataset, 0.1, seed=3)
    train_lines = {e.line for e in train}
    held_lines = {e.line for e in heldout}
    assert len(heldout) == 10
    assert len(train) == 90
    assert train_lines.isdisjoint(held_lines)
    assert train_lines | held_lines == set(range(1, 101))


def test_holdout_seed_changes_split() -> None:
    dataset = make_dataset(100)
    _, held_a = split_holdout(dataset, 0.1, seed=3)
    _, held_b = split_holdout(dataset, 0.1, seed=4)
    assert [e.line for e in held_a] != [e.line for e in held_b]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_holdout_invalid_fraction(fraction: float) -> None:
    with pytest.raises(InputError, match=f"Invalid holdout fraction {fraction}"):
        split_holdout(make_dataset(10), fraction, seed=0)


def test_holdout_too_small_raises() -> None:
    with pytest.raises(InputError, match="leaves nothing to train on"):
        split_holdout(make_dataset(1), 0.5, seed=0)


def test_batch_gives_finite_loss(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [{"instruction": f"Write poem {i}.", "output": "The sea is wide. " * (i + 1)} for i in range(8)],
    )
    dataset = tokenize_records(load_records(path), tokenizer, max_length=64)
    batch = next(iter(make_dataloader(dataset, batch_size=4, seed=0)))
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    loss = model(**batch).loss
    assert torch.isfinite(loss)


# BPE tokenizer


def test_bpe_small_vocab_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_bpe_tokenizer(["text"], MIN_VOCAB_SIZE - 1, tmp_path)


def test_bpe_no_text_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="No text to train the tokenizer on"):
        train_bpe_tokenizer(["", ""], 300, tmp_path)


@requires_data
def test_bpe_on_real_records(tmp_path: Path) -> None:
    loaded = load_records(DATA_DIR / "tasks_v1.jsonl")
    tokenizer = train_bpe_tokenizer(record_texts(loaded.records[:200]), 1000, tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    sample = loaded.records[300]
    assert isinstance(sample, AlpacaRecord)
    text = sample.output + " Ünïcödé ✓ 日本語"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert len(tokenizer) == 1000
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded("x")["input_ids"][0] == reloaded.bos_token_id
    assert reloaded.pad_token == "<|pad|>"
    assert reloaded.eos_token == "<|endoftext|>"
    assert reloaded.unk_token == "<|unk|>"


# Real data


@requires_data
def test_real_v1_loads_all() -> None:
    loaded = load_records(DATA_DIR / "tasks_v1.jsonl")
    assert loaded.entry_count == V1_RECORDS
    assert loaded.malformed_count == 0
    assert len(loaded) + loaded.empty_count == V1_RECORDS
    assert loaded.layout_counts()["alpaca"] == len(loaded)


@requires_data
def test_real_v2_malformed_counted() -> None:
    loaded = load_records(DATA_DIR / "tasks_v2.jsonl")
    assert loaded.entry_count == V2_LINES
    assert loaded.malformed_count == V2_MALFORMED
    assert loaded.malformed_lines[0] == V2_FIRST_MALFORMED_LINE
    assert len(loaded) + loaded.empty_count + V2_MALFORMED == V2_LINES


@requires_data
def test_real_v2_strict_raises() -> None:
    with pytest.raises(InputError, match=f"^Line {V2_FIRST_MALFORMED_LINE} of .*tasks_v2.jsonl is not valid JSON"):
        load_records(DATA_DIR / "tasks_v2.jsonl", strict=True)


@requires_data
def test_real_status_filter() -> None:
    loaded = load_records(DATA_DIR / "tasks_v1.jsonl", keep=lambda value: value.get("status") == "ok")
    statuses = [json.loads(line)["status"] for line in (DATA_DIR / "tasks_v1.jsonl").read_text().splitlines()]
    assert len(loaded) + loaded.empty_count == statuses.count("ok")
    assert loaded.filtered_count == V1_RECORDS - statuses.count("ok")


@requires_data
def test_real_tokenize_and_pack(tokenizer: Any) -> None:
    loaded = load_records(DATA_DIR / "tasks_v2.jsonl", keep=lambda value: value.get("status") == "ok")
    dataset = tokenize_records(loaded, tokenizer, max_length=128)
    packed = pack_dataset(dataset)
    stats = dataset.stats

    assert stats.example_count + stats.dropped_count == len(loaded)
    assert all(len(example.input_ids) <= 128 for example in dataset)
    assert all(trained_labels(example) for example in dataset)
    assert all(len(block.input_ids) == 128 for block in packed)
