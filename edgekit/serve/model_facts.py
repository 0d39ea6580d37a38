"""What the server says about its model: the id clients send, the variant, target and provider, and the
end-of-text ids that tell a finished answer (``stop``) from one cut short (``length``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.package.genai_config import read_genai_config
from edgekit.package.manifest import read_manifest
from edgekit.package.verify import variant_dir
from edgekit.runtimes.model import Model
from edgekit.serve.options import check_model_name
from edgekit.version import __version__


@dataclass(frozen=True)
class ModelFacts:
    """The served model as ``/v1/models`` and every response describe it."""

    model_id: str
    variant: str
    target: str | None
    provider: str
    context_length: int
    created: int
    eos_ids: frozenset[int]
    fingerprint: str
    """OpenAI's ``system_fingerprint``: changes when the package or edgekit changes."""

    def model_object(self) -> dict[str, Any]:
        """An OpenAI model object, with edgekit's facts as extra fields."""
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgekit",
                "variant": self.variant, "target": self.target, "provider": self.provider,
                "context_length": self.context_length}  # fmt: skip


def model_facts(model: Model, model_name: str | None, target: str | None) -> ModelFacts:
    """The facts of a loaded ``model``, read from its package's manifest and genai_config.json."""
    root = Path(model.info.package)
    manifest = read_manifest(root)
    _, folder = variant_dir(root, manifest, model.info.variant)
    eos = read_genai_config(folder).model.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
    if target is None:  # the targets that deploy this variant: the package's own first
        deploying = [name for name, entry in manifest.get("targets", {}).items()
                     if entry.get("variant") == model.info.variant]  # fmt: skip
        target = manifest.get("target") if manifest.get("target") in deploying else next(iter(deploying), None)
    return ModelFacts(
        model_id=model_name or _folder_name(root),
        variant=model.info.variant,
        target=target,
        provider=model.info.provider,
        context_length=model.context_length,
        created=int((root / "manifest.json").stat().st_mtime),
        eos_ids=eos_ids,
        fingerprint=f"edgekit-{__version__}-{model.info.manifest_sha256[:12]}",
    )


def _folder_name(root: Path) -> str:
    """The package folder's name as the user wrote it (a link keeps its own name), never ``.`` or ``..``."""
    name = root.absolute().name
    name = name if name not in ("", ".", "..") else root.resolve().name
    check_model_name(name, "the package folder's name", "pass --model-name NAME (model_name= in create_app)")
    return name
