"""Resolve a --model-path (local folder or hub id) and load its components with their own classes."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch

from sglang.multimodal_gen.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

_LOADABLE_LIBRARIES = ("diffusers", "transformers")


# The trained reference models shipped inside the package, each selectable by its folder name.
BUILTIN_MODELS_DIR = Path(__file__).resolve().parents[2] / "builtin"


def builtin_model_names() -> list[str]:
    return sorted(p.name for p in BUILTIN_MODELS_DIR.iterdir() if (p / "model_index.json").is_file())


def resolve_model_path(model_path: str) -> Path:
    """A local folder as is; a built-in model by its folder name; otherwise a hub id looked up in
    the local cache, then on the hub."""
    local = Path(model_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"--model-path {model_path} is a file; pass the model folder")
        return local
    if "/" not in model_path and (BUILTIN_MODELS_DIR / model_path / "model_index.json").is_file():
        return BUILTIN_MODELS_DIR / model_path
    if model_path.count("/") != 1 or model_path.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model folder {model_path} does not exist (built-in models: {', '.join(builtin_model_names())})"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_path, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the local cache means "try the hub"
        pass
    try:
        return Path(snapshot_download(model_path))
    except Exception as exc:  # noqa: BLE001 - offline, gated or unknown id: one sentence for the user
        raise ModelNotFoundError(
            f"could not find {model_path!r} as a local folder, in the Hugging Face cache, or on the hub "
            f"({type(exc).__name__}); download it elsewhere (e.g. `hf download {model_path} "
            f"--local-dir DIR`) and pass --model-path DIR"
        ) from None


def load_component(model_dir: Path, name: str, torch_dtype: torch.dtype | None = None) -> Any:
    """Load ``model_dir/name`` with the class model_index.json names for it."""
    index = json.loads((model_dir / "model_index.json").read_text())
    if name not in index:
        raise ModelNotFoundError(f"{model_dir}/model_index.json names no {name!r} component")
    entry = index[name]
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
        raise ModelNotFoundError(f"{model_dir}/model_index.json: {name} must be [library, class name], got {entry!r}")
    library, class_name = entry
    if library not in _LOADABLE_LIBRARIES:
        raise ModelNotFoundError(f"component {name} comes from unsupported library {library!r}")
    module = importlib.import_module(library)
    if library == "transformers":
        module.utils.logging.disable_progress_bar()
    cls = getattr(module, _without_torchvision(module, class_name), None)
    if cls is None:
        raise ModelNotFoundError(f"component {name}: {library} has no class {class_name!r} (too old a version?)")
    sub = model_dir / name
    if not sub.is_dir():
        raise ModelNotFoundError(f"{model_dir} lacks the {name}/ folder that model_index.json lists")
    if library == "transformers" and _is_byte_level_llama_tokenizer(class_name, sub):
        cls = module.PreTrainedTokenizerFast
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None and hasattr(cls, "dtype"):
        kwargs["dtype"] = torch_dtype
    logger.debug("loading %s (%s.%s) from %s", name, library, class_name, sub)
    try:
        component = cls.from_pretrained(sub, **kwargs)
    except OSError as exc:  # diffusers and transformers say "missing weights / config" this way
        reason = " ".join(str(exc).split())  # their messages may span lines; the CLI prints one
        raise ModelNotFoundError(f"cannot load the {name} of {model_dir}: {reason}") from None
    if isinstance(component, torch.nn.Module):
        component.eval().requires_grad_(False)
    return component


def _without_torchvision(module: Any, class_name: str) -> str:
    """An image processor's class (Wan2.1 I2V's ``CLIPImageProcessor``) where torchvision is not
    installed: its PIL twin, which transformers falls back to anyway, named directly so that
    asking for the class does not print transformers' fallback warning on every load."""
    twin = f"{class_name}Pil"
    if importlib.util.find_spec("torchvision") is None and twin in dir(module):
        return twin
    return class_name


def _is_byte_level_llama_tokenizer(class_name: str, folder: Path) -> bool:
    """A Llama 3 (byte-level BPE) tokenizer that model_index.json calls ``LlamaTokenizerFast``.

    transformers 5's ``LlamaTokenizer`` rebuilds a SentencePiece-style (Metaspace) pipeline around
    the vocabulary, which garbles byte-level vocabularies such as HunyuanVideo's Llama 3 tokenizer;
    the generic tokenizer loads ``tokenizer.json`` as saved (transformers' AutoTokenizer does the same).
    """
    tokenizer_file = folder / "tokenizer.json"
    if class_name.removesuffix("Fast") != "LlamaTokenizer" or not tokenizer_file.is_file():
        return False
    pipeline = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    parts = [pipeline.get("pre_tokenizer") or {}]
    parts += parts[0].get("pretokenizers", [])
    return any(part.get("type") == "ByteLevel" for part in parts)
