"""`--calibration-text FILE`: the text the quality gate measures FP8 / 2:4 on (and SparseGPT calibrates on), as
token ids for the model at hand.

Byte-level models (vocab 256) read the file as UTF-8 bytes; other models need a tokenizer saved in the MODEL
directory (`tokenizer.json` / `tokenizer_config.json` / `tokenizer.model`), loaded locally. The gate measures
perplexity over non-overlapping windows of `quality.eval.SEQ_LEN` tokens, so the text must be longer than one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from moe_compile.errors import MoECompileError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def calibration_ids(path: Path, model: nn.Module, model_dir: Optional[Path],
                    trust_remote_code: bool = False) -> Union[bytes, torch.Tensor]:
    """The file at `path` as what `optimize(calibration_text=...)` takes: bytes for byte-level models, else ids."""
    from moe_compile.quality.eval import SEQ_LEN

    if not path.is_file():
        raise MoECompileError(f"--calibration-text {path}: no such file")
    if model_dir is not None and model_dir.is_file():  # MODEL given as a config.json: look beside it
        model_dir = model_dir.parent
    text = path.read_text(encoding="utf-8", errors="replace")
    if getattr(getattr(model, "config", None), "vocab_size", None) == 256:
        data: Union[bytes, torch.Tensor] = text.encode("utf-8")
        count = len(data)
    else:
        data = torch.tensor(_tokenizer(model_dir, path, trust_remote_code)(text)["input_ids"], dtype=torch.long)
        count = data.numel()
    if count <= SEQ_LEN:
        raise MoECompileError(f"--calibration-text {path} gives {count} tokens; the quality gate measures "
                              f"perplexity over windows of {SEQ_LEN}, so give it more text (a few thousand tokens)")
    return data


def _tokenizer(model_dir: Optional[Path], path: Path, trust_remote_code: bool):
    if model_dir is None or not model_dir.is_dir() or not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        where = "this MODEL" if model_dir is None else f"{model_dir}"
        raise MoECompileError(f"--calibration-text {path} needs a tokenizer, and {where} has none "
                              f"({', '.join(TOKENIZER_FILES)}); save the model's tokenizer into its directory "
                              f"(tokenizer.save_pretrained(DIR)), or use the Python API with token ids "
                              f"(optimize(model, calibration_text=ids))")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
