"""Where reward weights come from: an explicit path, ``$FLOWBP_REWARD_DIR/<name>``, or the hub cache.

Nothing is ever downloaded unless the caller passes ``allow_download=True``: the hub is only asked
with ``local_files_only=True``. A reward whose weights are missing or unreadable raises
:class:`RewardWeightsError`, one line naming the file expected, where it was looked for and where
it comes from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Environment variable naming a directory with one sub-directory per reward (``$FLOWBP_REWARD_DIR/hpsv2``, …).
ENV_VAR = "FLOWBP_REWARD_DIR"


class RewardWeightsError(FileNotFoundError):
    """Weights of a reward are missing or malformed (the message is one line)."""


@dataclass(frozen=True)
class HubSource:
    """A hub repository holding (some of) a reward's files; ``files`` are glob patterns."""

    repo_id: str
    files: tuple[str, ...]


def locate(
    name: str,
    path: str | Path | None,
    *,
    accept: Callable[[Path], bool],
    expected: str,
    hub: Sequence[HubSource] = (),
    allow_download: bool = False,
) -> Path:
    """The directory (or file) holding ``name``'s weights.

    Order: ``path`` if given (it must be acceptable), else ``$FLOWBP_REWARD_DIR/<name>``, else each
    ``hub`` source from the local hub cache (downloaded only with ``allow_download``). ``accept``
    says whether a candidate holds what the reward needs; ``expected`` describes it for the error.
    """
    sources = ", ".join(f"hf.co/{h.repo_id}" for h in hub) or "see the README's Rewards section"
    if path is not None:
        candidate = Path(path).expanduser()
        if not candidate.exists():
            raise RewardWeightsError(f"{name}: {candidate} does not exist; expected {expected} (from {sources})")
        if not accept(candidate):
            raise RewardWeightsError(f"{name}: {candidate} lacks {expected} (from {sources})")
        return candidate
    env = os.environ.get(ENV_VAR)
    if env:
        candidate = Path(env).expanduser() / name
        if candidate.exists() and accept(candidate):
            return candidate
    for source in hub:
        found = hub_snapshot(source, allow_download)
        if found is not None and accept(found):
            return found
    where = f"${ENV_VAR}/{name} ({Path(env) / name})" if env else f"${ENV_VAR}/{name} (unset)"
    raise RewardWeightsError(
        f"{name}: no weights found; expected {expected} via path=, reward_paths.{name} in the config, "
        f"{where} or the hub cache of {sources} (nothing is downloaded unless allow_download=True)"
    )


def hub_snapshot(source: HubSource, allow_download: bool = False) -> Path | None:
    """The cached snapshot folder of ``source`` (None when not cached and downloads are not allowed)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        folder = snapshot_download(
            source.repo_id, allow_patterns=list(source.files), local_files_only=not allow_download
        )
    except Exception:  # not cached (LocalEntryNotFoundError), offline, or a hub error: try the next source
        return None
    return Path(folder)


def first_file(directory: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` present in ``directory``; a file given directly is taken whatever its name."""
    if directory.is_file():
        return directory
    for n in names:
        if (directory / n).is_file():
            return directory / n
    return None


def load_state_dict(file: Path, reward: str, source: str) -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file or a pickled state dict, without unpickling code.

    ``torch.load(weights_only=True)`` refuses any pickle that holds more than tensors and plain
    containers; a corrupt or foreign file becomes one :class:`RewardWeightsError` line.
    """
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(file)))
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=_is_zip(file))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RewardWeightsError(f"{reward}: cannot read {file} ({reason[:200]}); expected {source}") from exc


def _is_zip(file: Path) -> bool:
    # mmap only works for the zip format torch.save writes since 1.6; legacy pickles are read normally.
    with open(file, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
