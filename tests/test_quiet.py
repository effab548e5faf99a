"""No third-party warnings a user cannot act on: torchvision-missing notices and token dumps are filtered,
precisely (other messages of the same loggers pass unchanged)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowbp.quiet import quiet_third_party, shorten_prompt_truncation

ROOT = Path(__file__).resolve().parents[1]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def collect():
    """A handler on the exact loggers the messages come from (transformers' loggers do not propagate)."""
    handlers = []

    def attach(name: str) -> _Collect:
        handler = _Collect()
        logging.getLogger(name).addHandler(handler)
        handlers.append((name, handler))
        return handler

    yield attach
    for name, handler in handlers:
        logging.getLogger(name).removeHandler(handler)


def test_filters_drop_only_the_named_messages(collect) -> None:
    quiet_third_party()
    quiet_third_party()  # idempotent
    imports = collect("transformers.utils.import_utils")
    tokenizer = collect("transformers.tokenization_utils_base")
    log = logging.getLogger("transformers.utils.import_utils")
    log.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
    log.warning("something else entirely")
    logging.getLogger("transformers.tokenization_utils_base").warning(
        "Token indices sequence length is longer than the specified maximum sequence length for this model (9 > 7)."
    )
    torchao = collect("torchao")
    logging.getLogger("torchao").warning(
        "Skipping import of cpp extensions due to incompatible torch version 2.13.0+cpu for torchao version 0.16.0"
    )
    logging.getLogger("torchao").warning("a torchao message flowbp does not know")
    assert imports.messages == ["something else entirely"]
    assert tokenizer.messages == []
    assert torchao.messages == ["a torchao message flowbp does not know"]
    assert len([f for f in log.filters if "Drop" in type(f).__name__]) == 1


def test_truncation_warning_is_shortened(collect) -> None:
    name = "diffusers.pipelines.some_pipeline"
    shorten_prompt_truncation(name)
    out = collect(name)
    removed = ["ed red cat on a blue sofa next to a window, " * 200]
    logging.getLogger(name).warning(
        "The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens: "
        f"{removed}"
    )
    logging.getLogger(name).warning("an unrelated warning: %s", "kept")
    assert len(out.messages) == 2
    short = out.messages[0]
    assert short.startswith("The following part of your input was truncated because CLIP can only handle sequences")
    assert "ed red cat on a blue sofa" in short and len(short) < 200
    assert out.messages[1] == "an unrelated warning: kept"


LOAD_AND_ENCODE = """
import sys
from flowbp.backbones import load_backbone
backbone = load_backbone("sd3", path=sys.argv[1], resolution=32)
backbone.encode_prompts(["a photograph of " + ", ".join(["a very detailed red cat on a blue sofa"] * 30), "a cat"])
print("encoded")
"""


def test_real_backbone_loads_quietly(tiny_sd3_dir: Path) -> None:
    """A fresh process loads a tiny SD3 pipeline and encodes a long prompt: before the filters this printed
    two torchvision notices (torchvision is not installed here) and ~40 kB of truncated tokens."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_ENCODE, str(tiny_sd3_dir)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "encoded" in proc.stdout, proc.stderr[-2000:]
    err = proc.stderr
    assert "requires torchvision" not in err
    assert "Token indices sequence length" not in err
    truncated = [line for line in err.splitlines() if "was truncated" in line]
    assert truncated, err[-2000:]  # the user still learns that a prompt was cut
    assert all(len(line) < 300 for line in truncated)
    assert len(err) < 3000, err[-3000:]
