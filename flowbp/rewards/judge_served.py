"""A judge served behind an OpenAI-compatible chat-completions endpoint (sglang, vLLM), via the ``openai`` client.

One request per image, as the FlowBP release sends it: a user message holding the image (PNG data URL)
then the question, ``temperature=0`` (greedy). flowbp adds what a long evaluation needs:

- a pool of ``concurrency`` requests in flight (the server batches them);
- the ``openai`` client's bounded retries with exponential back-off (0.5 s doubling, capped at 8 s, with
  jitter) on connection errors, timeouts, 408/409/429 and 5xx, and a per-request ``timeout``;
- a check before any image is scored: the server answers ``GET /models`` and serves the model name asked
  for (a mismatch is the usual reason a judge "does not work": the name must be the server's);
- one-line errors naming the URL when the server cannot be reached after the retries.

The API key is read from the environment variable ``api_key_env`` (default ``FLOWBP_JUDGE_API_KEY``; a
server started without ``--api-key`` accepts any key, so "EMPTY" is sent when the variable is unset).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from flowbp.rewards.unifiedreward import API_KEY_ENV, JudgeError, png_data_url

EXTRA = "judges"  # pip install 'flowbp[judges]'


def _openai() -> Any:
    try:
        import openai
    except ImportError:
        raise JudgeError(
            f"a served judge needs the openai client package: pip install 'flowbp[{EXTRA}]' (or pip install openai)"
        ) from None
    return openai


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


class ServedJudge:
    """``answer(images, questions) -> texts`` through ``POST {url}/chat/completions``."""

    OPTIONS: ClassVar[tuple[str, ...]] = ("timeout", "max_retries", "concurrency", "api_key_env", "max_tokens", "check")

    def __init__(
        self,
        url: str,
        model: str,
        name: str = "judge",
        timeout: float = 120.0,
        max_retries: int = 3,
        concurrency: int = 8,
        api_key_env: str = API_KEY_ENV,
        max_tokens: int | None = None,
        check: bool = True,
    ) -> None:
        openai = _openai()
        if not url.startswith(("http://", "https://")):
            raise JudgeError(f"{name}: url must start with http:// or https://, got {url!r} (e.g. http://HOST:PORT/v1)")
        limits = (("timeout", timeout, 0), ("max_retries", max_retries, 0), ("concurrency", concurrency, 1))
        for field, value, low in limits:
            if not value >= low:
                raise JudgeError(f"{name}: {field} must be >= {low}, got {value}")
        self.name, self.url, self.model = name, url.rstrip("/"), model
        self.concurrency, self.max_tokens = int(concurrency), max_tokens
        self.description = f"served {self.model!r} at {self.url}"
        self._openai = openai
        self.client = openai.OpenAI(
            base_url=self.url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            timeout=float(timeout),
            max_retries=int(max_retries),
        )
        self._retries = int(max_retries)
        if check:
            self.check()

    # ------------------------------------------------------------------------------------------------
    def _unreachable(self, exc: BaseException) -> JudgeError:
        return JudgeError(
            f"{self.name}: cannot reach the judge server at {self.url} after {self._retries} retries "
            f"({_first_line(exc)}); start it (see docs/unifiedreward.md) or fix the url"
        )

    def _wrong_model(self, served: Sequence[str] | None = None) -> JudgeError:
        listed = f" (it serves: {', '.join(served)})" if served else ""
        return JudgeError(
            f"{self.name}: the server at {self.url} does not serve a model named {self.model!r}{listed}; the model "
            "name must match the one the server was started with (sglang: --served-model-name, default the "
            "--model-path; vLLM: --served-model-name): pass model=NAME / --judge-model NAME"
        )

    def check(self) -> None:
        """Before any scoring: the server answers and serves ``model`` (skipped if it lacks ``GET /models``)."""
        openai = self._openai
        try:
            served = [m.id for m in self.client.models.list()]
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise self._unreachable(exc) from None
        except openai.NotFoundError:
            return  # no model listing on this server: a wrong name shows up as a 404 on the first request
        except openai.AuthenticationError as exc:
            where = f"{self.name}: the server at {self.url}"
            raise JudgeError(f"{where} refused the API key ({_first_line(exc)})") from None
        except openai.APIStatusError as exc:
            where = f"{self.name}: the server at {self.url}"
            raise JudgeError(f"{where} answered {exc.status_code} to GET /models") from None
        if self.model not in served:
            raise self._wrong_model(served)

    def _ask(self, image: Any, text: str) -> str:
        openai = self._openai
        content = [{"type": "image_url", "image_url": {"url": png_data_url(image)}}, {"type": "text", "text": text}]
        extra = {"max_tokens": self.max_tokens} if self.max_tokens is not None else {}
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": content}], temperature=0.0, **extra
            )
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise self._unreachable(exc) from None
        except openai.NotFoundError:
            raise self._wrong_model() from None
        except openai.APIStatusError as exc:
            raise JudgeError(
                f"{self.name}: the server at {self.url} answered {exc.status_code} after {self._retries} retries "
                f"({_first_line(exc)})"
            ) from None
        choices = getattr(response, "choices", None) or []
        text = choices[0].message.content if choices else None
        return text if isinstance(text, str) else ""

    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        if len(images) <= 1 or self.concurrency == 1:
            return [self._ask(im, q) for im, q in zip(images, questions, strict=True)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(images))) as pool:
            return list(pool.map(self._ask, images, questions))
