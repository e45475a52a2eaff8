"""Load training records from JSON or JSONL files and turn them into padded or packed batches for causal LM training.

Each record is one JSON object, and its layout is detected per record:

- Alpaca: ``instruction``, optional ``input`` and ``output``, all strings.
- chat: ``messages``, a list of ``{"role": ..., "content": ...}`` objects with string values.
- text: ``text``, a string.

A record with ``messages`` is read as chat even if it also has ``instruction`` or ``text``, and a record with
``instruction`` is read as Alpaca even if it also has ``text``. Other fields are ignored.

Known limitations:

- The whole file is read into memory, and the tokenized data set is kept as Python lists of token ids.
- A JSON array file must be valid JSON as a whole, because the parser cannot resume after a syntax error. Only JSONL
  files can skip lines that are not valid JSON.
- Chat content must be a string, so multimodal content lists count as malformed. Only the role ``assistant`` gets
  loss, so conversations that name it ``gpt`` or ``model`` need converting first.
- Record text that spells a special token, such as ``<|endoftext|>``, is encoded as that special token.
- Packing does not mask attention across example boundaries, so a packed example attends to the examples before it
  in its block.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from lisa_tune.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions that get no loss, the value ``torch.nn.CrossEntropyLoss`` ignores by default."""

MAX_REPORTED_LINES = 10
"""Maximum number of line numbers kept for each kind of skipped record."""

EXPECTED_LAYOUTS = (
    "a JSON object with 'instruction' and 'output' (Alpaca), 'messages' (chat) or 'text' (plain text) was expected"
)

# Records


@dataclass(frozen=True)
class AlpacaRecord:
    """An instruction, an optional input and the expected response."""

    instruction: str
    input: str
    """Context for the instruction, or an empty string."""
    output: str
    """The response that gets loss."""
    line: int = 0
    """Line of the file where the record starts, or 0 for a record that did not come from a file."""


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    """Speaker, usually ``system``, ``user`` or ``assistant``. Only ``assistant`` turns get loss."""
    content: str


@dataclass(frozen=True)
class ChatRecord:
    """A conversation of one or more messages."""

    messages: tuple[ChatMessage, ...]
    line: int = 0
    """Line of the file where the record starts, or 0 for a record that did not come from a file."""


@dataclass(frozen=True)
class TextRecord:
    """Plain text, all of which gets loss."""

    text: str
    line: int = 0
    """Line of the file where the record starts, or 0 for a record that did not come from a file."""


Record = AlpacaRecord | ChatRecord | TextRecord


@dataclass(frozen=True)
class MalformedLine:
    """A skipped line and the reason it was skipped."""

    line: int
    reason: str
    """Clause that completes "Line N ...", for example ``is not valid JSON (Expecting value at column 1)``."""


@dataclass
class LoadedRecords:
    """Records read from one file, with counts of what was skipped and why."""

    path: Path
    records: list[Record]
    """Usable records in file order."""
    entry_count: int
    """Number of non-blank JSONL lines or JSON array elements read."""
    malformed_count: int = 0
    """Number of entries that are not valid JSON or are an object of none of the known layouts."""
    malformed: list[MalformedLine] = field(default_factory=list)
    """The first ``MAX_REPORTED_LINES`` malformed entries."""
    filtered_count: int = 0
    """Number of valid records that the ``keep`` filter rejected."""
    empty_count: int = 0
    """Number of valid records with nothing to train on: an empty output or text, or no assistant message."""
    empty_lines: list[int] = field(default_factory=list)
    """Lines of the first ``MAX_REPORTED_LINES`` empty records."""

    @property
    def malformed_lines(self) -> list[int]:
        """Line numbers of the first ``MAX_REPORTED_LINES`` malformed entries."""
        return [entry.line for entry in self.malformed]

    def layout_counts(self) -> dict[str, int]:
        """Count the usable records per layout: ``alpaca``, ``chat`` and ``text``."""
        counts = {"alpaca": 0, "chat": 0, "text": 0}
        for record in self.records:
            counts[_layout_name(record)] += 1
        return counts

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class _InvalidJson:
    reason: str


def load_records(
    path: Path,
    *,
    strict: bool = False,
    keep: Callable[[dict[str, Any]], bool] | None = None,
) -> LoadedRecords:
    """Read training records from a JSON array file or a JSONL file.

    A file whose first non-blank character is ``[`` is read as one JSON array, any other file as JSONL, where blank
    lines are skipped. Malformed entries (invalid JSON, or a value that is not an object of a known layout) are
    skipped, counted and logged once, unless ``strict`` is set, in which case the first one raises ``InputError``.

    ``keep`` receives each valid record's JSON object and returns whether to use it, for example
    ``lambda obj: obj.get("status") == "ok"``. Records with nothing to train on are skipped and counted in
    ``empty_count`` even in strict mode, because their layout is valid.

    Raises ``InputError`` when the file is missing, unreadable, not UTF-8, empty or not valid JSON as an array, or
    when no usable record remains.
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise InputError(f"Data file {path} is empty, so pass a JSON or JSONL file that contains training records.")

    is_array = text.lstrip().startswith("[")
    entries = _iter_json_array(text, path) if is_array else _iter_jsonl(text)

    result = LoadedRecords(path=path, records=[], entry_count=0)
    for line, value in entries:
        result.entry_count += 1

        if isinstance(value, _InvalidJson):
            parsed: Record | str = value.reason
        else:
            parsed = _parse_record(value, line)
        if isinstance(parsed, str):
            if strict:
                raise InputError(
                    f"Line {line} of {path} {parsed}, but {EXPECTED_LAYOUTS}, so fix or delete that line, "
                    "or load without strict mode to skip malformed lines."
                )
            result.malformed_count += 1
            if len(result.malformed) < MAX_REPORTED_LINES:
                result.malformed.append(MalformedLine(line=line, reason=parsed))
            continue

        if keep is not None and isinstance(value, dict) and not keep(value):
            result.filtered_count += 1
            continue

        if not _has_response(parsed):
            result.empty_count += 1
            if len(result.empty_lines) < MAX_REPORTED_LINES:
                result.empty_lines.append(line)
            continue

        result.records.append(parsed)

    _log_skipped(result)
    if not result.records:
        raise InputError(_no_usable_record_message(result, text))
    return result


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"Data file {path} not found, so check the path.") from None
    except IsADirectoryError:
        raise InputError(
            f"{path} is a directory, but a JSON or JSONL data file was expected, so pass a file."
        ) from None
    except OSError as error:
        raise InputError(
            f"Data file {path} could not be read ({error.strerror}), so check that it is readable."
        ) from None

    try:
        # utf-8-sig drops the byte order mark that some editors write.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise InputError(
            f"Line {line} of {path} is not valid UTF-8 (byte 0x{data[error.start]:02x}), but a JSON or JSONL text "
            "file was expected, so convert the file to UTF-8 or pass the right file."
        ) from None


def _iter_jsonl(text: str) -> Iterator[tuple[int, object]]:
    # Split on "\n" only. str.splitlines would also split on U+2028 and U+2029, which JSON strings may contain.
    for number, raw_line in enumerate(text.split("\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            value = json.loads(raw_line)
        except json.JSONDecodeError as error:
            yield number, _InvalidJson(f"is not valid JSON ({error.msg} at column {error.colno})")
            continue
        yield number, value


_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _skip_whitespace(text: str, position: int) -> int:
    """Return the position of the first character at or after ``position`` that is not JSON whitespace."""
    match = _JSON_WHITESPACE.match(text, position)
    return match.end() if match else position


def _iter_json_array(text: str, path: Path) -> Iterator[tuple[int, object]]:
    """Yield each element of a JSON array with the line where it starts.

    The elements are decoded one at a time with ``raw_decode`` because ``json.loads`` reports no positions.
    """
    decoder = json.JSONDecoder()
    # The caller checked that the first non-whitespace character is "[".
    position = _skip_whitespace(text, _skip_whitespace(text, 0) + 1)
    counted_up_to = 0
    line = 1

    def syntax_error(at: int, message: str) -> InputError:
        error_line = text.count("\n", 0, at) + 1
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        return InputError(
            f"{path} is not valid JSON at line {error_line}, column {column} ({message}), so fix the file, because "
            "one syntax error makes a JSON array unreadable, unlike JSONL, where malformed lines are skipped."
        )

    if text.startswith("]", position):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise syntax_error(error.pos, error.msg) from None
        line += text.count("\n", counted_up_to, position)
        counted_up_to = position
        yield line, value

        position = _skip_whitespace(text, end)
        if text.startswith(",", position):
            position = _skip_whitespace(text, position + 1)
            continue
        if text.startswith("]", position):
            break
        raise syntax_error(position, "expected ',' or ']' after an array element")

    trailing = _skip_whitespace(text, position + 1)
    if trailing != len(text):
        raise syntax_error(trailing, "extra data after the closing ']'")


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return "object"


def _parse_record(value: object, line: int) -> Record | str:
    """Return the record in ``value``, or the reason it is malformed as a clause that completes "Line N ..."."""
    if not isinstance(value, dict):
        return f"is a JSON {_json_type(value)}, not an object"
    if "messages" in value:
        return _parse_chat(value["messages"], line)
    if "instruction" in value:
        return _parse_alpaca(value, line)
    if "text" in value:
        text = value["text"]
        if not isinstance(text, str):
            return f"has a 'text' that is a JSON {_json_type(text)}, not a string"
        return TextRecord(text=text, line=line)
    return "has none of the keys 'instruction', 'messages' or 'text'"


def _parse_alpaca(value: dict[str, Any], line: int) -> AlpacaRecord | str:
    instruction = value["instruction"]
    if not isinstance(instruction, str):
        return f"has an 'instruction' that is a JSON {_json_type(instruction)}, not a string"
    if "output" not in value:
        return "has an 'instruction' but no 'output'"
    output = value["output"]
    if not isinstance(output, str):
        return f"has an 'output' that is a JSON {_json_type(output)}, not a string"
    context = value.get("input")
    if context is None:
        context = ""
    if not isinstance(context, str):
        return f"has an 'input' that is a JSON {_json_type(context)}, not a string"
    return AlpacaRecord(instruction=instruction, input=context, output=output, line=line)


def _parse_chat(messages: object, line: int) -> ChatRecord | str:
    if not isinstance(messages, list):
        return f"has 'messages' that is a JSON {_json_type(messages)}, not an array"
    if not messages:
        return "has an empty 'messages' array"
    parsed: list[ChatMessage] = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"has message {number} that is a JSON {_json_type(message)}, not an object"
        role = message.get("role")
        content = message.get("content")
        if not isinstance(role, str):
            return f"has message {number} without a string 'role'"
        if not isinstance(content, str):
            return f"has message {number} without a string 'content'"
        parsed.append(ChatMessage(role=role, content=content))
    return ChatRecord(messages=tuple(parsed), line=line)


def _has_response(record: Record) -> bool:
    if isinstance(record, AlpacaRecord):
        return bool(record.output.strip())
    if isinstance(record, TextRecord):
        return bool(record.text.strip())
    return any(message.role == "assistant" and message.content.strip() for message in record.messages)


def _layout_name(record: Record) -> str:
    if isinstance(record, AlpacaRecord):
        return "alpaca"
    if isinstance(record, ChatRecord):
        return "chat"
    return "text"


def _log_skipped(result: LoadedRecords) -> None:
    if result.malformed_count:
        first = result.malformed[0]
        logger.warning(
            "%s: skipped %d malformed of %d entries, at lines %s%s. Line %d %s.",
            result.path,
            result.malformed_count,
            result.entry_count,
            ", ".join(str(line) for line in result.malformed_lines),
            " and more" if result.malformed_count > len(result.malformed) else "",
            first.line,
            first.reason,
        )
    if result.filtered_count:
        logger.info("%s: the keep filter rejected %d records.", result.path, result.filtered_count)
    if result.empty_count:
        logger.info(
            "%s: skipped %d records with nothing to train on, at lines %s%s.",
            result.path,
            result.empty_count,
            ", ".join(str(line) for line in result.empty_lines),
            " and more" if result.empty_count > len(result.empty_lines) else "",
        )


def _no_usable_record_message(result: LoadedRecords, text: str) -> str:
    path = result.path
    if result.entry_count == 0:
        return f"Data file {path} contains an empty JSON array, so add training records to it."
    if result.malformed_count == result.entry_count:
        first = result.malformed[0]
        if _is_single_json_object(text):
            return (
                f"Data file {path} contains one JSON object, but a JSON array of records or one record per line "
                "(JSONL) was expected, so convert the file to one of those."
            )
        return (
            f"Data file {path} has no valid record among its {result.entry_count} entries (line {first.line} "
            f"{first.reason}), but {EXPECTED_LAYOUTS}, so check the file's format."
        )
    return (
        f"Data file {path} has no usable record: of {result.entry_count} entries, {result.malformed_count} are "
        f"malformed, {result.filtered_count} were rejected by the keep filter and {result.empty_count} have nothing "
        "to train on, so check the filter and the file's 'output', 'text' or assistant messages."
    )


def _is_single_json_object(text: str) -> bool:
    # One object on one line is also a JSONL file of one record, whose keys are then what is wrong.
    if len([line for line in text.splitlines() if line.strip()]) < 2:
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def record_texts(records: LoadedRecords | Sequence[Record]) -> Iterator[str]:
    """Yield every non-empty string of the records, for example to train a tokenizer on them."""
    items = records.records if isinstance(records, LoadedRecords) else records
    for record in items:
        if isinstance(record, AlpacaRecord):
            pieces = [record.instruction, record.input, record.output]
        elif isinstance(record, ChatRecord):
            pieces = [message.content for message in record.messages]
        else:
            pieces = [record.text]
        yield from (piece for piece in pieces if piece)


# Prompt templates


def format_alpaca_prompt(instruction: str, context: str = "") -> str:
    """Render the prompt of an Alpaca record, which ends where the response starts.

    With an input the prompt is ``"### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n"``.
    Without one the Input section is left out. Use the same prompt at inference time.
    """
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _plain_chat_header(role: str) -> str:
    """Return the header of a message in the plain chat template, for example ``"### User:\\n"``."""
    return f"### {role.capitalize()}:\n"


# Tokenization


@dataclass(frozen=True)
class Example:
    """One training sequence: a tokenized record, or a block of packed records."""

    input_ids: list[int]
    labels: list[int]
    """Token ids at positions that get loss and ``IGNORE_INDEX`` elsewhere, aligned with ``input_ids``."""
    line: int = 0
    """Line of the source record, or 0 for a packed block or a record that did not come from a file."""


@dataclass(frozen=True)
class TokenizationStats:
    """Counts from tokenizing a set of records."""

    record_count: int
    """Number of records given to ``tokenize_records``."""
    example_count: int
    """Number of records kept as examples."""
    truncated_count: int
    """Number of kept examples cut to ``max_length``. A cut example has no EOS token."""
    truncated_lines: list[int]
    """Source lines of the first ``MAX_REPORTED_LINES`` cut examples."""
    dropped_count: int
    """Number of records dropped because no token gets loss, usually because ``max_length`` cut off the response."""
    dropped_lines: list[int]
    """Source lines of the first ``MAX_REPORTED_LINES`` dropped records."""
    token_count: int
    """Number of tokens in the kept examples, after truncation."""
    trainable_token_count: int
    """Number of tokens in the kept examples that get loss."""
    block_count: int = 0
    """Number of packed blocks, or 0 for an unpacked data set."""
    pack_discarded_token_count: int = 0
    """Number of tokens that packing discarded, from the last partial block and from blocks without loss."""


@dataclass
class _Rendered:
    """A record as text pieces and token ids, each flagged with whether it gets loss."""

    segments: list[tuple[str | list[int], bool]]
    line: int
    append_eos_if_missing: bool = False
    """Append EOS unless it already occurs from the last trained segment on (for chat templates)."""
    appended_eos_trained: bool = False


class TokenizedDataset(Dataset[Example]):
    """Tokenized examples or packed blocks, for a ``DataLoader`` with ``collate_fn=dataset.collate``."""

    def __init__(
        self,
        examples: list[Example],
        *,
        pad_token_id: int,
        max_length: int,
        packed: bool,
        stats: TokenizationStats,
    ) -> None:
        self.examples = examples
        self.pad_token_id = pad_token_id
        """Token id that ``collate`` pads ``input_ids`` with."""
        self.max_length = max_length
        self.packed = packed
        """Whether every example is a block of exactly ``max_length`` tokens."""
        self.stats = stats
        """Counts from tokenization. A subset made by ``split_holdout`` keeps the counts of the whole set."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def collate(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Pad a batch with this data set's pad token id, as ``collate`` does."""
        return collate(batch, pad_token_id=self.pad_token_id)

    def subset(self, indices: Sequence[int]) -> TokenizedDataset:
        """Return a data set of the examples at ``indices``, in that order."""
        return TokenizedDataset(
            [self.examples[index] for index in indices],
            pad_token_id=self.pad_token_id,
            max_length=self.max_length,
            packed=self.packed,
            stats=self.stats,
        )


def tokenize_records(
    records: LoadedRecords | Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    pack: bool = False,
) -> TokenizedDataset:
    """Tokenize records into examples whose labels give loss only on responses, then optionally pack them.

    Alpaca records become ``format_alpaca_prompt(...)`` without loss, then the output and an EOS token with loss.
    Text records get loss on every token and end with EOS. Alpaca and text records start with the special tokens the
    tokenizer adds by default before a text, such as BOS, without loss.

    Chat records are rendered with ``tokenizer.apply_chat_template`` when the tokenizer has a chat template, then
    tokenized without added special tokens, as ``apply_chat_template(tokenize=True)`` does. Each assistant turn gets
    loss from its content through what the template writes after it, such as an end-of-turn token. EOS is appended
    unless the template already wrote it. Without a chat template every message is rendered as
    ``"### {Role}:\\n{content}"``, followed by ``"\\n\\n"`` for other roles and by an EOS token with loss for the
    assistant, so the prompt for a reply ends with ``"### Assistant:\\n"``.

    Text pieces are tokenized separately and concatenated, so a token never spans a prompt and its response.
    Examples longer than ``max_length`` keep their first ``max_length`` tokens and are counted as truncated.
    Records left with no token that gets loss, because truncation cut off their whole response, are dropped and
    counted. ``pack=True`` applies ``pack_dataset``.

    Raises ``InputError`` when ``max_length`` is below 2, there are no records, the tokenizer has no EOS token, a
    chat template rejects a conversation, or the responses of all records are cut off.
    """
    if max_length < 2:
        raise InputError(f"Invalid max_length {max_length}: it must be at least 2 tokens, so raise it.")
    items = records.records if isinstance(records, LoadedRecords) else list(records)
    source = f" of {records.path}" if isinstance(records, LoadedRecords) else ""
    if not items:
        raise InputError("No records to tokenize, so load a data file with at least one usable record first.")

    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise InputError(
            f"The tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token, so set tokenizer.eos_token "
            "before tokenizing."
        )
    # Padding positions get attention_mask 0 and label IGNORE_INDEX, so EOS is a safe pad when there is no pad token.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    prefix = _leading_special_ids(tokenizer)
    use_template = bool(getattr(tokenizer, "chat_template", None))
    rendered = [_render(record, tokenizer, eos_id, prefix, use_template, source) for record in items]

    texts = [piece for item in rendered for piece, _ in item.segments if isinstance(piece, str)]
    encoded: list[list[int]] = []
    if texts:
        encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    pieces = iter(encoded)

    examples: list[Example] = []
    truncated_lines: list[int] = []
    dropped_lines: list[int] = []
    truncated_count = 0
    dropped_count = 0
    shortest_prompt: int | None = None
    for item in rendered:
        input_ids, labels = _assemble(item, pieces, eos_id)
        truncated = len(input_ids) > max_length

        # The label at position 0 never gets loss because a causal LM predicts position i + 1 from position i.
        if all(label == IGNORE_INDEX for label in labels[1:max_length]):
            dropped_count += 1
            if len(dropped_lines) < MAX_REPORTED_LINES:
                dropped_lines.append(item.line)
            if truncated:
                prompt_length = next(i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX)
                shortest_prompt = prompt_length if shortest_prompt is None else min(shortest_prompt, prompt_length)
            continue

        if truncated:
            truncated_count += 1
            if len(truncated_lines) < MAX_REPORTED_LINES:
                truncated_lines.append(item.line)
        examples.append(Example(input_ids=input_ids[:max_length], labels=labels[:max_length], line=item.line))

    if not examples and shortest_prompt is not None:
        raise InputError(
            f"Nothing is left to train on because max_length={max_length} cuts off the response of all "
            f"{len(items)} records{source}, so raise the sequence length above {shortest_prompt} tokens, the length "
            "of the shortest prompt."
        )
    if not examples:
        raise InputError(
            f"None of the {len(items)} records{source} has a token that gets loss, so give them a non-empty "
            "'output', 'text' or assistant message."
        )
    if truncated_count or dropped_count:
        logger.info(
            "Tokenized %d records%s with max_length=%d: %d truncated, %d dropped because their response was cut off.",
            len(items),
            source,
            max_length,
            truncated_count,
            dropped_count,
        )

    stats = TokenizationStats(
        record_count=len(items),
        example_count=len(examples),
        truncated_count=truncated_count,
        truncated_lines=truncated_lines,
        dropped_count=dropped_count,
        dropped_lines=dropped_lines,
        token_count=sum(len(example.input_ids) for example in examples),
        trainable_token_count=sum(_trainable_count(example.labels) for example in examples),
    )
    dataset = TokenizedDataset(examples, pad_token_id=pad_id, max_length=max_length, packed=False, stats=stats)
    return pack_dataset(dataset) if pack else dataset


def _trainable_count(labels: list[int]) -> int:
    return sum(1 for label in labels if label != IGNORE_INDEX)


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return the special token ids, such as BOS, that the tokenizer puts before a text by default."""
    probe = "a"
    with_specials = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_specials) - len(without) + 1):
        if with_specials[start : start + len(without)] == without:
            return with_specials[:start]
    return []


def _render(
    record: Record,
    tokenizer: PreTrainedTokenizerBase,
    eos_id: int,
    prefix: list[int],
    use_template: bool,
    source: str,
) -> _Rendered:
    if isinstance(record, AlpacaRecord):
        prompt = format_alpaca_prompt(record.instruction, record.input)
        segments: list[tuple[str | list[int], bool]] = [(prefix, False), (prompt, False)]
        segments += [(record.output, True), ([eos_id], True)]
        return _Rendered(segments=segments, line=record.line)

    if isinstance(record, TextRecord):
        return _Rendered(segments=[(prefix, False), (record.text, True), ([eos_id], True)], line=record.line)

    if use_template:
        return _render_with_chat_template(record, tokenizer, source)

    segments = [(prefix, False)]
    for message in record.messages:
        header = _plain_chat_header(message.role)
        if message.role == "assistant":
            segments += [(header, False), (message.content, True), ([eos_id], True)]
        else:
            segments.append((header + message.content + "\n\n", False))
    if record.messages[-1].role != "assistant":
        segments.append(([eos_id], False))
    return _Rendered(segments=segments, line=record.line)


def _render_with_chat_template(record: ChatRecord, tokenizer: PreTrainedTokenizerBase, source: str) -> _Rendered:
    """Split the rendered conversation into assistant spans, which get loss, and the text between them.

    An assistant span runs from the end of the conversation before it, rendered with the generation prompt, to the
    end of the conversation through it. This needs a template that renders each conversation as a prefix of its
    continuations, which most do.
    """
    messages = [{"role": message.role, "content": message.content} for message in record.messages]
    full = _apply_chat_template(tokenizer, messages, add_generation_prompt=False, line=record.line, source=source)

    segments: list[tuple[str | list[int], bool]] = []
    cursor = 0
    for index, message in enumerate(record.messages):
        if message.role != "assistant":
            continue
        before = _apply_chat_template(
            tokenizer, messages[:index], add_generation_prompt=True, line=record.line, source=source
        )
        through = _apply_chat_template(
            tokenizer, messages[: index + 1], add_generation_prompt=False, line=record.line, source=source
        )
        if not (full.startswith(through) and through.startswith(before) and len(before) >= cursor):
            # NOTE: templates that rewrite earlier turns, for example by removing reasoning text, end up here.
            raise InputError(
                f"The tokenizer's chat template renders the conversation on line {record.line}{source} differently "
                "when it is cut after a message, so the assistant tokens cannot be located, and setting "
                "tokenizer.chat_template = None switches to the plain chat template."
            )
        segments.append((full[cursor : len(before)], False))
        segments.append((full[len(before) : len(through)], True))
        cursor = len(through)
    segments.append((full[cursor:], False))

    return _Rendered(
        segments=segments,
        line=record.line,
        append_eos_if_missing=True,
        appended_eos_trained=record.messages[-1].role == "assistant",
    )


def _apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
    line: int,
    source: str,
) -> str:
    from jinja2.exceptions import TemplateError

    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as error:
        raise InputError(
            f"The tokenizer's chat template rejected the conversation on line {line}{source} ({error}), so fix or "
            "remove that record."
        ) from None
    return str(rendered)


def _assemble(item: _Rendered, pieces: Iterator[list[int]], eos_id: int) -> tuple[list[int], list[int]]:
    """Concatenate a rendered record's token ids and labels, taking the ids of its text pieces from ``pieces``."""
    input_ids: list[int] = []
    labels: list[int] = []
    last_trained_start = 0
    for piece, trained in item.segments:
        piece_ids = piece if isinstance(piece, list) else list(next(pieces))
        if trained:
            last_trained_start = len(input_ids)
            labels.extend(piece_ids)
        else:
            labels.extend([IGNORE_INDEX] * len(piece_ids))
        input_ids.extend(piece_ids)

    if item.append_eos_if_missing and eos_id not in input_ids[last_trained_start:]:
        input_ids.append(eos_id)
        labels.append(eos_id if item.appended_eos_trained else IGNORE_INDEX)
    return input_ids, labels


def pack_dataset(dataset: TokenizedDataset) -> TokenizedDataset:
    """Concatenate the examples in order and cut them into blocks of exactly ``max_length`` tokens, with no padding.

    The first token of every example gets no loss, so that no loss crosses an example boundary. The last partial
    block and blocks in which no token gets loss are discarded, and their tokens are counted in the stats.

    Raises ``InputError`` when the examples do not fill one block.
    """
    if dataset.packed:
        raise ValueError("the data set is already packed")
    max_length = dataset.max_length
    stream_ids: list[int] = []
    stream_labels: list[int] = []
    for example in dataset.examples:
        stream_ids.extend(example.input_ids)
        stream_labels.append(IGNORE_INDEX)
        stream_labels.extend(example.labels[1:])

    blocks: list[Example] = []
    for start in range(0, len(stream_ids) - max_length + 1, max_length):
        labels = stream_labels[start : start + max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            continue
        blocks.append(Example(input_ids=stream_ids[start : start + max_length], labels=labels))

    if not blocks and len(stream_ids) < max_length:
        raise InputError(
            f"The {len(dataset)} examples contain {len(stream_ids)} tokens, fewer than one packed block of "
            f"max_length={max_length}, so lower the sequence length or train without packing."
        )
    if not blocks:
        raise InputError(
            f"No packed block of max_length={max_length} contains a token that gets loss, so raise the sequence "
            "length or train without packing."
        )
    stats = replace(
        dataset.stats,
        block_count=len(blocks),
        pack_discarded_token_count=len(stream_ids) - len(blocks) * max_length,
    )
    return TokenizedDataset(blocks, pad_token_id=dataset.pad_token_id, max_length=max_length, packed=True, stats=stats)


# Batching and splitting


def collate(examples: Sequence[Example], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into ``input_ids``, ``labels`` and ``attention_mask`` tensors of shape (batch, longest).

    Padding positions get ``pad_token_id``, label ``IGNORE_INDEX`` and attention mask 0.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(example.input_ids) for example in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_dataloader(
    dataset: TokenizedDataset,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = False,
    first_batch: int = 0,
    batch_stride: int = 1,
) -> DataLoader[Example]:
    """Build a single-process ``DataLoader`` whose shuffled order depends only on ``seed``.

    The loader owns a ``torch.Generator`` seeded with ``seed``, so two loaders with the same seed yield the same
    batches in every epoch, and the global random state is neither read nor changed.

    The loader yields batches ``first_batch``, ``first_batch + batch_stride``, ... of that order and skips the others
    without collating them. A resumed run uses ``first_batch`` to skip the batches it has trained on, and each process
    of a data-parallel run takes every ``batch_stride``-th batch of the one order that all processes share.
    """
    if batch_size < 1:
        raise InputError(f"Invalid batch size {batch_size}: it must be at least 1, so raise it.")
    if first_batch < 0 or batch_stride < 1:
        raise ValueError(
            f"invalid batch selection: first_batch is {first_batch} and batch_stride {batch_stride}, but first_batch "
            "must be at least 0 and batch_stride at least 1"
        )
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    # The sampler and the loader share the generator, as DataLoader(shuffle=True, generator=...) builds them, so the
    # order is the same as that loader's.
    sampler: Sampler[int] = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = _SelectedBatches(BatchSampler(sampler, batch_size, drop_last), first_batch, batch_stride)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=dataset.collate,
        generator=generator,
        num_workers=0,
    )


class _SelectedBatches(Sampler[list[int]]):
    """Every ``stride``-th batch of ``batches``, from batch ``first`` on."""

    def __init__(self, batches: BatchSampler, first: int, stride: int) -> None:
        self.batches = batches
        self.first = first
        self.stride = stride

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.first, None, self.stride)

    def __len__(self) -> int:
        return max(0, -(-(len(self.batches) - self.first) // self.stride))


def split_holdout(dataset: TokenizedDataset, fraction: float, seed: int) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Split the examples at random into a training set and a held-out set of ``fraction`` of them.

    The held-out set gets ``round(len(dataset) * fraction)`` examples, at least 1. The split depends only on
    ``seed``, and both parts keep the examples' original order.

    NOTE: on a packed data set a record at a block boundary can land in both parts. For a clean holdout, split the
    unpacked data set and apply ``pack_dataset`` to each part.
    """
    if not 0 < fraction < 1:
        raise InputError(
            f"Invalid holdout fraction {fraction}: it must be greater than 0 and less than 1, for example 0.05."
        )
    size = len(dataset)
    held_count = max(1, round(size * fraction))
    if held_count >= size:
        raise InputError(
            f"A holdout fraction of {fraction} of {size} examples leaves nothing to train on, so lower the fraction "
            "or add records."
        )
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    order = torch.randperm(size, generator=generator).tolist()
    train = dataset.subset(sorted(order[held_count:]))
    heldout = dataset.subset(sorted(order[:held_count]))
    return train, heldout
