"""Train a byte-level BPE tokenizer offline, for bundled model profiles that ship no tokenizer.

The bundled profiles contain each model's ``config.json`` without weights or a tokenizer. Training such a model from
scratch needs a tokenizer, and this module trains one with the ``tokenizers`` library on the training texts, so
nothing is downloaded.

Known limitations:

- The vocabulary can come out smaller than requested when the texts contain fewer distinct merges.
- The tokenizer has no chat template, so chat records use the plain template of ``lisa_tune.train.data``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lisa_tune.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN)
"""Special tokens in the order of their ids, 0 to 3."""

BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
"""Smallest vocabulary that contains every byte and the special tokens."""


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``, save it to ``output_dir`` and return it.

    The result is a ``transformers.PreTrainedTokenizerFast`` with pad, EOS, BOS and unknown tokens, which puts BOS
    before every encoded text when special tokens are added. ``save_pretrained`` writes it to ``output_dir``, so
    ``transformers.AutoTokenizer.from_pretrained(output_dir)`` loads it. Every byte is in the vocabulary, so any text
    encodes without the unknown token and decodes back unchanged.

    Raises ``InputError`` when ``vocab_size`` is below ``MIN_VOCAB_SIZE`` or ``texts`` contains no non-empty text.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise InputError(
            f"Invalid vocabulary size {vocab_size}: a byte-level BPE tokenizer needs at least {MIN_VOCAB_SIZE} "
            f"entries for the {BYTE_ALPHABET_SIZE} bytes and {len(SPECIAL_TOKENS)} special tokens, so raise it."
        )

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    counter = _TextCounter(texts)
    tokenizer.train_from_iterator(counter, trainer=trainer)
    if counter.count == 0:
        raise InputError("No text to train the tokenizer on, so pass records with a non-empty text or response.")

    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence(
        [
            # trim_offsets=False keeps the offsets of a token on the space that byte-level BPE merges into it.
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(output_dir)
    return wrapped


def bundled_tokenizer(tokenizer_dir: Path, texts: Iterable[str], vocab_size: int, profile: Any) -> Any:
    """Return the tokenizer saved in ``tokenizer_dir``, or train one on ``texts`` for a bundled profile and save it.

    ``profile`` is the ``ModelSource`` of the profile. The trained vocabulary has at most ``vocab_size`` entries and
    no more than the profile's own. ``texts`` is read only when a tokenizer is trained.
    """
    from transformers import AutoTokenizer

    if (tokenizer_dir / "tokenizer.json").is_file():
        logger.info("using the tokenizer in %s", tokenizer_dir)
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    size = min(vocab_size, int(profile.config.get("vocab_size") or vocab_size))
    tokenizer = train_bpe_tokenizer(texts, size, tokenizer_dir)
    logger.info(
        "bundled profile %s has no tokenizer: trained a %d-token BPE tokenizer on the training data, saved in %s",
        profile.name,
        len(tokenizer),
        tokenizer_dir,
    )
    return tokenizer


class _TextCounter:
    """Iterate over the non-empty texts and count them, so that an empty input can be reported after training."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts = texts
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if text:
                self.count += 1
                yield text
