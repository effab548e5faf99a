"""UnifiedReward judges: ``unifiedreward`` (overall), ``unifiedreward-align`` and ``unifiedreward-iq``.

A vision-language model (UnifiedReward-7b-v1.5: LLaVA-OneVision, Qwen2-7B + SigLIP) is asked one question
about an (image, caption) pair and answers with "Final Score: x", x on the 1–5 scale the FlowBP paper
reports as UR-Align / UR-IQ. A judge is an *evaluation metric*: its score is parsed from generated text,
so it has no gradient and is never a training reward (``reward: unifiedreward-align`` is a config error).

What follows the FlowBP release (``flowbp/eval/rewards/unifiedreward_scorer.py`` of RuoyuWang-2077/FlowBP):

- the three questions, word for word (``overall`` is also UnifiedReward's own sglang example; ``align`` and
  ``iq`` are the FlowBP authors' wording), each starting with ``"<image>\\n"``;
- the image: resized to 512×512 with PIL's default filter, sent as a PNG data URL, image part before text;
- greedy decoding (temperature 0); the score is the number after the first "Final Score:" (case-insensitive).

Where flowbp differs on purpose:

- the score stays on the 1–5 scale (the release divides by 5; the paper's tables print 1–5);
- the whole number is read and must lie in [1, 5] (the release's ``[1-5](?:\\.\\d+)?`` reads "10" as 1);
- an answer without a parsable score in [1, 5] is *missing* (NaN here, ``null`` in scores.jsonl, with the
  answer's text kept), where the release returns −10 and UnifiedReward's own client 0: never averaged in;
- requests run concurrently (a bounded pool) with bounded retries, where the release sends them one by one.

Backends (:mod:`flowbp.rewards.judge_served`, :mod:`flowbp.rewards.judge_local`): an OpenAI-compatible
chat-completions server (sglang / vLLM) at ``url=`` (or ``$FLOWBP_JUDGE_URL``), else a local transformers
folder at ``path=`` (or ``$FLOWBP_REWARD_DIR/unifiedreward``).
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

#: Registry name -> criterion.
CRITERIA = {"unifiedreward": "overall", "unifiedreward-align": "align", "unifiedreward-iq": "iq"}
#: The judge family: one set of weights answers all three questions ($FLOWBP_REWARD_DIR/unifiedreward).
FAMILY = "unifiedreward"
#: The served model name UnifiedReward's own sglang command serves (sglang's default name is --model-path).
DEFAULT_SERVED_MODEL = "CodeGoat24/UnifiedReward-7b-v1.5"
URL_ENV = "FLOWBP_JUDGE_URL"
MODEL_ENV = "FLOWBP_JUDGE_MODEL"
API_KEY_ENV = "FLOWBP_JUDGE_API_KEY"
IMAGE_SIDE = 512  # the release resizes every image to 512×512 before asking
SCORE_RANGE = (1.0, 5.0)

# The release's pattern is "Final Score:\s*([1-5](?:\.\d+)?)", which reads "Final Score: 10" as 1. flowbp takes
# the whole number and checks the range instead: 10, 0 and 5.5 are off the scale, hence missing.
_SCORE = re.compile(r"Final Score:\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
IMAGE_TAG = "<image>\n"


def question(criterion: str, caption: str) -> str:
    """The release's question for ``criterion`` (overall / align / iq) about ``caption``, verbatim."""
    if criterion == "overall":
        return (
            "<image>\n"
            "You are given a text caption and a generated image based on that caption. "
            "Your task is to evaluate this image based on two key criteria:\n"
            "1. Alignment with the Caption: Assess how well this image aligns with the provided "
            "caption. Consider the accuracy of depicted objects, their relationships, and "
            "attributes as described in the caption.\n"
            "2. Overall Image Quality: Examine the visual quality of this image, including clarity, "
            "detail preservation, color accuracy, and overall aesthetic appeal.\n"
            "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
            f"Your task is provided as follows:\nText Caption: [{caption}]"
        )
    if criterion == "align":
        return (
            "<image>\n"
            "You are given a text caption and a generated image based on that caption. "
            "Evaluate only the image-text alignment: how accurately the image depicts "
            "the objects, attributes, counts, spatial relationships, and actions in the caption. "
            "Ignore general image quality unless it prevents judging alignment. "
            "Assign an alignment score from 1 to 5 after 'Final Score:'.\n"
            f"Text Caption: [{caption}]"
        )
    if criterion == "iq":
        return (
            "<image>\n"
            "You are given a text caption and a generated image based on that caption. "
            "Evaluate only the overall image quality: visual fidelity, aesthetics, clarity, "
            "detail preservation, artifacts, composition, and color. Do not penalize caption "
            "mismatch except where it directly affects perceived image quality. "
            "Assign an image-quality score from 1 to 5 after 'Final Score:'.\n"
            f"Text Caption: [{caption}]"
        )
    raise ValueError(f"criterion: expected one of overall, align, iq, got {criterion!r}")


def parse_score(answer: str | None) -> float | None:
    """The first "Final Score: x" of ``answer`` with x in [1, 5]; None when there is none (never a default)."""
    if not answer:
        return None
    match = _SCORE.search(answer)
    if match is None:
        return None
    value = float(match.group(1))
    # "Final Score: 5.7" matches the pattern but is off the scale: missing, not clipped to 5
    return value if SCORE_RANGE[0] <= value <= SCORE_RANGE[1] else None


def chat_prompt(text: str, placeholder: str = IMAGE_TAG) -> str:
    """The conversation the served judge sees (sglang ``chatml-llava`` = LLaVA's ``qwen_1_5``), as one string.

    ``text`` is a question; its leading ``<image>\\n`` becomes ``placeholder``, the model's one image slot
    (Qwen2.5-VL: ``<|vision_start|><|image_pad|><|vision_end|>``, as its own chat template writes it).
    """
    body = placeholder + text.removeprefix(IMAGE_TAG)
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    )


def to_pil(images: torch.Tensor) -> list[Any]:
    """B×3×H×W floats in [0, 1] -> RGB PIL images, quantised as a PNG stores them (round(255·x))."""
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arrays]


def judge_image(image: Any) -> Any:
    """The image the judge sees: the release's ``image.resize((512, 512))`` (PIL's default filter)."""
    return image if image.size == (IMAGE_SIDE, IMAGE_SIDE) else image.resize((IMAGE_SIDE, IMAGE_SIDE))


def png_data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class JudgeError(ValueError):
    """A judge cannot be reached, does not serve the model asked for, or is misconfigured (one-line message).

    A ValueError so that the CLI reports it as bad input (exit 2, one line): the fix is always in what was
    given (the URL, the served name, the key, a package to install), not in flowbp.
    """


class JudgeBackend(Protocol):
    description: str

    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]: ...


class UnifiedRewardJudge(nn.Module):
    """``(images B×3×H×W in [0, 1], prompts) -> Tensor[B]`` of 1–5 scores, NaN where the answer had none.

    ``last_answers`` holds the raw answer text of the last call, image by image (``flowbp eval`` writes it
    to scores.jsonl next to the score), so every missing score can be read back.
    """

    is_judge = True  # an evaluation metric: not differentiable, never a training reward

    def __init__(self, criterion: str, backend: JudgeBackend) -> None:
        super().__init__()
        question(criterion, "")  # validates the criterion
        self.criterion = criterion
        self.backend = backend
        self.last_answers: list[str] = []

    def extra_repr(self) -> str:
        return f"criterion={self.criterion}, backend={self.backend.description}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.shape[0] != len(prompts):
            raise ValueError(f"prompts: {len(prompts)} prompts for {images.shape[0]} images")
        pil = [judge_image(im) for im in to_pil(images)]
        answers = self.backend.answer(pil, [question(self.criterion, str(p)) for p in prompts])
        self.last_answers = list(answers)
        scores = [parse_score(a) for a in answers]
        return torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float64)


def _backend(
    name: str,
    url: str | None,
    path: str | Path | None,
    model: str | None,
    allow_download: bool,
    **options: Any,
) -> JudgeBackend:
    """``url`` (or ``$FLOWBP_JUDGE_URL`` when no ``path`` is given) -> served; else a local folder."""
    if url is None and path is None:
        url = os.environ.get(URL_ENV) or None
    if url is not None:
        from flowbp.rewards.judge_served import ServedJudge

        served = {k: v for k, v in options.items() if k in ServedJudge.OPTIONS}
        return ServedJudge(url, model or os.environ.get(MODEL_ENV) or DEFAULT_SERVED_MODEL, name=name, **served)
    from flowbp.rewards.judge_local import LocalJudge, locate_judge

    local = {k: v for k, v in options.items() if k in LocalJudge.OPTIONS}
    return LocalJudge(locate_judge(name, path, allow_download), name=name, **local)


def _loader(name: str) -> Callable[..., UnifiedRewardJudge]:
    def load(
        path: str | Path | None = None,
        url: str | None = None,
        model: str | None = None,
        allow_download: bool = False,
        dtype: Any = None,
        **options: Any,
    ) -> UnifiedRewardJudge:
        if dtype is not None:
            options["dtype"] = dtype
        return UnifiedRewardJudge(CRITERIA[name], _backend(name, url, path, model, allow_download, **options))

    load.__name__ = f"load_{name.replace('-', '_')}"
    load.__doc__ = (
        f"``{name}``: a served judge at ``url`` (OpenAI-compatible, e.g. ``http://HOST:PORT/v1``) or a local "
        f"``path``. Served options: ``model`` (the server's model name, default {DEFAULT_SERVED_MODEL}), "
        "``timeout``, ``max_retries``, ``concurrency``, ``api_key_env``, ``max_tokens``. Local options: "
        "``batch_size``, ``max_new_tokens``, ``device``; ``dtype`` applies to local weights."
    )
    return load


load_unifiedreward = _loader("unifiedreward")
load_unifiedreward_align = _loader("unifiedreward-align")
load_unifiedreward_iq = _loader("unifiedreward-iq")
