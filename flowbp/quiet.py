"""Third-party log messages a flowbp user cannot act on, filtered by logger and message (nothing else).

- transformers warns, once per class, that ``CLIPImageProcessor`` / ``SiglipImageProcessor`` "requires
  torchvision (not installed)" when diffusers resolves its pipeline classes. flowbp preprocesses images
  in torch and never uses those processors; torchvision is deliberately not a dependency.
- torchao (the optional memory modes, pinned to 0.16 for its tensor layouts) warns on import that it skips its
  C++ extensions when its build does not match torch; flowbp's weight-only modes use its Python paths only.
- transformers' tokenizer warns "Token indices sequence length is longer than the specified maximum"
  for every long prompt, although the pipelines truncate explicitly (so no indexing error can follow).
- diffusers' pipelines log the truncated part of a long prompt verbatim: with many long prompts that is
  thousands of tokens. The message is kept (a truncated prompt is worth knowing) but shortened to the
  first words of the dropped text.

Filters sit on the exact loggers that emit these records; every other message passes unchanged.
"""

from __future__ import annotations

import logging
import re

_DROPPED = (
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
    ("torchao", "Skipping import of cpp extensions due to incompatible torch version"),
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer than the specified maximum"),
)
_TRUNCATED = re.compile(r"(The following part of your input was truncated because .*?tokens)\s*:\s*(.*)", re.S)
SHOWN_CHARS = 60  # characters of the dropped text kept in the shortened message


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


class _ShortenTruncation(logging.Filter):
    """Rewrite diffusers' "truncated ... tokens: ['<the whole rest of the prompt>']" to one short line."""

    def filter(self, record: logging.LogRecord) -> bool:
        match = _TRUNCATED.match(record.getMessage())
        if match:
            head, dropped = match.group(1), match.group(2).strip()
            text = " ".join(dropped.strip("[]").split())
            shown = text[:SHOWN_CHARS] + ("…" if len(text) > SHOWN_CHARS else "")
            record.msg, record.args = f"{head}; the rest is dropped: {shown}", ()
        return True


def _add_once(logger: logging.Logger, kind: type, *args: str) -> None:
    if not any(type(f) is kind and getattr(f, "fragment", None) == (args[0] if args else None) for f in logger.filters):
        logger.addFilter(kind(*args))


def quiet_third_party() -> None:
    """Install the filters for the messages above (idempotent; imports nothing but :mod:`logging`)."""
    for name, fragment in _DROPPED:
        _add_once(logging.getLogger(name), _DropMessage, fragment)


def shorten_prompt_truncation(pipeline_module: str) -> None:
    """Shorten the prompt-truncation warnings of one diffusers pipeline module (its logger's name)."""
    _add_once(logging.getLogger(pipeline_module), _ShortenTruncation)
