"""A model's files: a local folder, a `.gguf` file or a hub repository fetched lazily, and its fingerprint.

What nodes (a span of layers) and clients (embeddings, norm, head) both open before reading any weight."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from common.weights import gguf
from common.weights.errors import ModelLoadError

SAFETENSORS_INDEX = "model.safetensors.index.json"


SAFETENSORS_SINGLE = "model.safetensors"


# Files a node or client needs besides weights (config, tokenizer, generation defaults).
METADATA_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
    "vocab*",
    "merges.txt",
    "*.model",
    SAFETENSORS_INDEX,
]


def split_revision(model: str, revision: str | None = None) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev') for hub ids; local paths (even with an '@') are kept whole.

    A revision given both ways must agree."""
    if "@" not in model or Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return model, revision
    name, _, pinned = model.rpartition("@")
    if name.count("/") != 1 or not pinned:
        return model, revision
    if revision is not None and revision != pinned:
        raise ModelLoadError(f"{model!r} pins revision {pinned!r} but --revision says {revision!r}")
    return name, pinned


@dataclass
class ModelFiles:
    """A model's files: a local folder, or a hub repository fetched lazily, shard by shard."""

    root: Path
    model_id: str
    repo_id: str | None = None  # set when the files come from the hub
    revision: str | None = None
    gguf: Path | None = None  # a GGUF file: its weights; `root` then holds its config.json and tokenizer

    @classmethod
    def open(cls, path_or_id: str, revision: str | None = None) -> "ModelFiles":
        """A model folder (config.json + safetensors), a hub id, or a `.gguf` file (model_id: its stem)."""
        path_or_id, revision = split_revision(path_or_id, revision)
        path = Path(path_or_id).expanduser()
        if path.suffix.lower() == ".gguf":


            if not path.is_file():
                raise ModelLoadError(f"{path}: no such GGUF file")
            header = gguf.read_header(path.resolve())
            gguf.check_supported(header)
            return cls(root=gguf.sidecar_folder(header), model_id=path.stem, gguf=header.path)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} has no config.json: is it a transformers model folder?")
            return cls(root=path.resolve(), model_id=path.name)
        if path.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
            raise ModelLoadError(f"{path_or_id!r} is neither a model folder nor a hub id like 'org/name'")
        from huggingface_hub import snapshot_download

        try:
            root = snapshot_download(path_or_id, revision=revision, allow_patterns=METADATA_PATTERNS)
        except Exception as error:  # network, auth, missing repo: all end up here
            raise ModelLoadError(f"cannot fetch {path_or_id!r} from the hub: {error}") from error
        return cls(root=Path(root), model_id=path_or_id, repo_id=path_or_id, revision=revision)

    def config(self) -> PretrainedConfig:
        if self.gguf is not None:


            gguf.ensure_config(gguf.read_header(self.gguf), self.root)
        try:
            return AutoConfig.from_pretrained(self.root)
        except (ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot read the config of {self.model_id}: {error}") from error

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name."""
        if self.gguf is not None:
            raise ModelLoadError(f"{self.model_id} is a GGUF file: it has no safetensors weight map")
        index = self.root / SAFETENSORS_INDEX
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        single = self.fetch(SAFETENSORS_SINGLE)
        with safe_open(single, framework="pt") as handle:
            return {key: SAFETENSORS_SINGLE for key in handle.keys()}

    def fetch(self, filename: str) -> Path:
        local = self.root / filename
        if local.is_file() or self.repo_id is None:
            if not local.is_file():
                raise ModelLoadError(f"{self.model_id} has no {filename} (only safetensors weights are supported)")
            return local
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo_id, filename, revision=self.revision))


def config_hash(config: PretrainedConfig) -> str:
    """A stable fingerprint of the architecture, shared by nodes and clients of one model."""
    data = config.to_dict()
    for volatile in (
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "use_cache",
    ):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
