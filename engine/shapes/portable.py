"""Make a diffusers folder readable by every toolchain: transformers 4.x and 5.x, optimum.

transformers 5 saves a ``CLIPTextModel`` with keys relative to the text transformer
(``embeddings.token_embedding.weight``); transformers 4.x names them ``text_model.*`` and,
given the shorter names, loads a *randomly initialised* encoder with only a warning.
transformers 5 reads the ``text_model.*`` names too (its checkpoint conversion drops the
prefix), so the portable form is the prefixed one. The slow ``CLIPTokenizer`` of
transformers 4.x (and optimum's ONNX exporter) needs ``vocab.json`` and ``merges.txt``;
transformers 5 needs ``tokenizer.json``. :func:`make_portable` writes both forms, values
unchanged, and :func:`portability_problems` checks a folder against what each reads.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Tuple

from ..errors import InvalidArgumentError

logger = logging.getLogger(__name__)

#: Prefix of every key of a ``CLIPTextModel`` state dict in transformers 4.x.
TEXT_MODEL_PREFIX = "text_model."
#: Header line of a BPE merges file (the slow CLIPTokenizer skips the first line).
MERGES_HEADER = "#version: 0.2"
#: Weight file of the text encoder inside a diffusers folder.
TEXT_ENCODER_WEIGHTS = Path("text_encoder") / "model.safetensors"
#: The tokenizer files each transformers major reads.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def _model_dir(model_dir: "str | Path") -> Path:
    root = Path(model_dir)
    if not (root / TEXT_ENCODER_WEIGHTS).is_file() or not (root / "tokenizer" / "tokenizer.json").is_file():
        raise InvalidArgumentError(
            "model_dir", "a diffusers folder with text_encoder/model.safetensors and tokenizer/tokenizer.json", str(root)
        )
    return root


def portable_text_encoder_keys(keys: List[str]) -> Dict[str, str]:
    """``{old: new}``: each key of a ``CLIPTextModel`` state dict under its transformers 4.x name."""
    return {k: k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k for k in keys}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def rewrite_text_encoder(model_dir: "str | Path") -> bool:
    """Rename the text encoder's safetensors keys to ``text_model.*`` (values bit-identical).

    Returns:
        `bool`: whether the file changed (``False`` when it was portable already).
    """
    from safetensors import safe_open
    from safetensors.torch import save

    path = _model_dir(model_dir) / TEXT_ENCODER_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        keys = list(f.keys())
        rename = portable_text_encoder_keys(keys)
        if all(k == v for k, v in rename.items()):
            return False
        tensors = {rename[k]: f.get_tensor(k) for k in keys}
    metadata.setdefault("format", "pt")
    _write_atomic(path, save(tensors, metadata=metadata))
    logger.info("%s: %d keys renamed to %s*", path, len(keys), TEXT_MODEL_PREFIX)
    return True


def _vocab_and_merges(tokenizer_json: Path) -> Tuple[Dict[str, int], List[str]]:
    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        raise InvalidArgumentError("tokenizer.json", "a BPE tokenizer (CLIP)", model.get("type"))
    merges = [" ".join(m) if isinstance(m, list) else str(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def write_slow_tokenizer_files(model_dir: "str | Path") -> Tuple[Path, Path]:
    """Write ``tokenizer/vocab.json`` and ``tokenizer/merges.txt`` from the folder's ``tokenizer.json``.

    They carry the same vocabulary and merges, so the slow and the fast tokenizer give the same ids.
    """
    tok = _model_dir(model_dir) / "tokenizer"
    vocab, merges = _vocab_and_merges(tok / "tokenizer.json")
    vocab_path, merges_path = tok / "vocab.json", tok / "merges.txt"
    _write_atomic(vocab_path, json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    _write_atomic(merges_path, ("\n".join([MERGES_HEADER] + merges) + "\n").encode("utf-8"))
    return vocab_path, merges_path


def make_portable(model_dir: "str | Path") -> Path:
    """Rewrite a diffusers folder in place so transformers 4.x and 5.x, diffusers and optimum read it.

    Args:
        model_dir (`str` or `Path`): a Stable-Diffusion-layout diffusers folder.

    Raises:
        InvalidArgumentError: ``model_dir`` lacks the text encoder weights or ``tokenizer.json``.
    """
    root = _model_dir(model_dir)
    rewrite_text_encoder(root)
    write_slow_tokenizer_files(root)
    problems = portability_problems(root)
    if problems:  # pragma: no cover - would mean the writer above is wrong
        raise RuntimeError(f"{root} is still not portable: {'; '.join(problems)}")
    return root


def portability_problems(model_dir: "str | Path") -> List[str]:
    """What keeps ``model_dir`` from loading under transformers 4.x or 5.x (empty when nothing).

    Checks: every text-encoder key is ``text_model.*`` (4.x names; 5.x drops the prefix on load);
    ``vocab.json`` and ``merges.txt`` exist (4.x's slow tokenizer, optimum's exporter), with the
    merges header the slow tokenizer skips, and hold the same vocabulary and merges as
    ``tokenizer.json`` (5.x).
    """
    from safetensors import safe_open

    root = _model_dir(model_dir)
    problems: List[str] = []
    with safe_open(str(root / TEXT_ENCODER_WEIGHTS), framework="pt") as f:
        bare = [k for k in f.keys() if not k.startswith(TEXT_MODEL_PREFIX)]
    if bare:
        problems.append(f"{len(bare)} text-encoder keys lack the {TEXT_MODEL_PREFIX!r} prefix (e.g. {bare[0]})")
    tok = root / "tokenizer"
    missing = [n for n in TOKENIZER_FILES if not (tok / n).is_file()]
    if missing:
        problems.append(f"tokenizer/ lacks {', '.join(missing)}")
        return problems
    vocab, merges = _vocab_and_merges(tok / "tokenizer.json")
    if json.loads((tok / "vocab.json").read_text(encoding="utf-8")) != vocab:
        problems.append("tokenizer/vocab.json differs from tokenizer.json's vocabulary")
    lines = (tok / "merges.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    if lines[0] != MERGES_HEADER:
        problems.append(f"tokenizer/merges.txt does not start with {MERGES_HEADER!r}")
    if lines[1:] != merges:
        problems.append("tokenizer/merges.txt differs from tokenizer.json's merges")
    return problems


__all__ = ["TEXT_MODEL_PREFIX", "make_portable", "portability_problems", "portable_text_encoder_keys",
           "rewrite_text_encoder", "write_slow_tokenizer_files"]
