"""The CLIP BPE tokenizer, built offline.

The BPE merges file of OpenAI's CLIP (MIT licence, ``assets/LICENSE.clip-bpe.txt``)
ships inside the package; the vocabulary is derived from it the way CLIP does:
the 256 byte symbols, the same with ``</w>``, the first 48,894 merges joined,
then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 entries).
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import List, Sequence

import torch

logger = logging.getLogger(__name__)

#: Token count of a CLIP text input, start and end tokens included.
MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict:
    """CLIP's reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _bpe_file() -> Path:
    return Path(str(resources.files("cfgswitch").joinpath("assets/bpe_simple_vocab_16e6.txt.gz")))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple:
    """Return ``(vocab, merges)`` of CLIP's tokenizer, derived from the shipped BPE file."""
    with gzip.open(_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return vocab, merges


def write_clip_tokenizer_files(directory: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of CLIP's tokenizer into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


@functools.lru_cache(maxsize=1)
def load_clip_tokenizer():
    """Build a transformers ``CLIPTokenizer`` offline, with ``model_max_length=77``."""
    import inspect

    from transformers import CLIPTokenizer

    params = inspect.signature(CLIPTokenizer.__init__).parameters
    if "vocab" in params:  # transformers >= 5: vocab and merges in memory
        vocab, merges = clip_vocab_and_merges()
        return CLIPTokenizer(
            vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=MAX_LENGTH, pad_token=EOS_TOKEN
        )
    with tempfile.TemporaryDirectory(prefix="cfgswitch-tok-") as tmp:  # transformers 4: files
        d = write_clip_tokenizer_files(Path(tmp))
        return CLIPTokenizer(
            vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"),
            model_max_length=MAX_LENGTH, pad_token=EOS_TOKEN,
        )


@dataclass(frozen=True)
class Tokenized:
    """Token ids of a list of prompts and what truncation cut.

    Attributes:
        input_ids (`torch.LongTensor` of shape `[B, max_length]`): padded ids.
        dropped (`list[int]`): tokens cut from each prompt (0 when it fit).
    """

    input_ids: torch.Tensor
    dropped: List[int]


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> Tokenized:
    """Tokenize ``prompts`` to ``max_length`` ids, padding and truncating, and count what was cut.

    Args:
        tokenizer: a transformers CLIP tokenizer.
        prompts (`Sequence[str]`): the prompts.
        max_length (`int`, defaults to 77): ids per prompt, start and end tokens included.
    """
    enc = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    full = tokenizer(list(prompts), padding=False, truncation=False, verbose=False)["input_ids"]
    dropped = [max(0, len(ids) - max_length) for ids in full]
    return Tokenized(input_ids=enc["input_ids"], dropped=dropped)


def truncation_warnings(prompts: Sequence[str], tokenized: Tokenized, label: str = "prompt") -> List[str]:
    """Human-readable warnings for each prompt that truncation cut."""
    out = []
    for i, (p, n) in enumerate(zip(prompts, tokenized.dropped)):
        if n:
            shown = p if len(p) <= 60 else p[:57] + "..."
            out.append(f"{label} {i} was truncated to {MAX_LENGTH} tokens: {n} token(s) dropped ({shown!r})")
    return out
