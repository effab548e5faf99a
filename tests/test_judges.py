"""UnifiedReward judges: the served client against a chat-completions server started here, strict parsing,
errors, ``flowbp eval`` with missing scores, the judge refused as a training reward, and the local backend
end to end on a tiny random LLaVA-OneVision folder built offline.

References: the release's question text (copied below from RuoyuWang-2077/FlowBP
``flowbp/eval/rewards/unifiedreward_scorer.py``), PIL's own resize / PNG decoding for the image the server
receives, and for the local backend transformers' model called token by token on one unpadded prompt.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from judge_server import FakeJudgeServer
from PIL import Image

from flowbp.cli import main
from flowbp.rewards import load_reward
from flowbp.rewards.unifiedreward import JudgeError, parse_score

MODEL = "UnifiedReward-test"
# The release's alignment question, verbatim (flowbp/eval/rewards/unifiedreward_scorer.py, _build_alignment_question)
RELEASE_ALIGN = (
    "<image>\n"
    "You are given a text caption and a generated image based on that caption. "
    "Evaluate only the image-text alignment: how accurately the image depicts "
    "the objects, attributes, counts, spatial relationships, and actions in the caption. "
    "Ignore general image quality unless it prevents judging alignment. "
    "Assign an alignment score from 1 to 5 after 'Final Score:'.\n"
    "Text Caption: [{caption}]"
)


def _images(n: int, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


@pytest.fixture
def server():
    with FakeJudgeServer(MODEL) as s:
        yield s


def _judge(name: str, url: str, **kw):
    return load_reward(name, url=url, model=MODEL, **kw)


def test_request_shape_image_and_caption(server, monkeypatch) -> None:
    monkeypatch.setenv("FLOWBP_JUDGE_API_KEY", "secret-key")
    judge = _judge("unifiedreward-align", server.url)
    images = _images(2)
    scores = judge(images, ["a red car", "say:Final Score: 4"])
    assert scores.tolist() == [3.0, 4.0]
    assert judge.last_answers == ["Final Score: 3", "Final Score: 4"]
    # first the model check (GET /models), then one request per image
    assert server.requests[0]["method"] == "GET" and server.requests[0]["path"] == "/v1/models"
    chats = sorted(server.chat_requests(), key=lambda r: r["body"]["messages"][0]["content"][1]["text"])
    assert len(chats) == 2
    for req, caption, img in zip(chats, ["a red car", "say:Final Score: 4"], images, strict=True):
        body = req["body"]
        assert req["path"] == "/v1/chat/completions"
        assert req["headers"]["authorization"] == "Bearer secret-key"
        assert body["model"] == MODEL and body["temperature"] == 0.0 and "max_tokens" not in body
        (message,) = body["messages"]
        assert message["role"] == "user"
        image_part, text_part = message["content"]  # image before text, as the release sends it
        assert text_part == {"type": "text", "text": RELEASE_ALIGN.format(caption=caption)}
        url = image_part["image_url"]["url"]
        assert image_part["type"] == "image_url" and url.startswith("data:image/png;base64,")
        sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert sent.format == "PNG" and sent.mode == "RGB" and sent.size == (512, 512)
        # reference: the 8-bit image resized by PIL's default filter (the release's image.resize((512, 512)))
        u8 = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        expected = np.asarray(Image.fromarray(u8).resize((512, 512)))
        assert np.array_equal(np.asarray(sent), expected)


def test_answers_without_a_score_in_range_are_missing(server) -> None:
    judge = _judge("unifiedreward-iq", server.url)
    answers = {
        "say:The image is good. Final Score: 4.5": 4.5,
        "say:final score:2": 2.0,
        "say:Final Score: 5": 5.0,
        "say:Final Score: 1": 1.0,
        "say:I cannot judge this image.": None,
        "say:Final Score: 7": None,
        "say:Final Score: 10": None,  # the release's pattern would read 1
        "say:Final Score: 0": None,
        "say:Final Score: 5.5": None,
        "say:Final Score: -2": None,
        "say:": None,
    }
    captions = list(answers)
    scores = judge(_images(len(captions)), captions)
    for caption, got, text in zip(captions, scores.tolist(), judge.last_answers, strict=True):
        want = answers[caption]
        assert (math.isnan(got) if want is None else got == want), (caption, got)
        assert text == caption[4:]  # the raw answer is kept
    assert parse_score(None) is None and parse_score("Final Score: 3 then Final Score: 5") == 3.0


def test_retries_on_5xx_then_one_line_error_naming_the_url(server) -> None:
    judge = _judge("unifiedreward-align", server.url, max_retries=2)
    assert judge(_images(1), ["fail:2:Final Score: 2"]).tolist() == [2.0]
    assert len(server.chat_requests()) == 3  # two 500s, then the answer
    stingy = _judge("unifiedreward-align", server.url, max_retries=1)
    with pytest.raises(JudgeError) as info:
        stingy(_images(1), ["fail:5:Final Score: 2"])
    message = str(info.value)
    assert server.url in message and "500" in message and "\n" not in message
    assert len(server.chat_requests()) == 3 + 2  # the first try and one retry


def test_timeout_then_one_line_error(server) -> None:
    judge = _judge("unifiedreward-align", server.url, timeout=0.3, max_retries=1)
    with pytest.raises(JudgeError) as info:
        judge(_images(1), ["sleep:1.5:Final Score: 4"])
    message = str(info.value)
    assert f"cannot reach the judge server at {server.url} after 1 retries" in message and "\n" not in message
    assert len(server.chat_requests()) == 2


def test_wrong_served_model_name(server) -> None:
    with pytest.raises(JudgeError) as info:
        load_reward("unifiedreward-align", url=server.url, model="CodeGoat24/UnifiedReward-7b-v1.5")
    message = str(info.value)
    assert "must match the one the server was started with" in message and MODEL in message and "\n" not in message
    # a server without GET /models: the 404 of the first request says the same
    with FakeJudgeServer(MODEL, models_endpoint=False) as bare:
        judge = load_reward("unifiedreward-align", url=bare.url, model="other-name")
        with pytest.raises(JudgeError, match="must match the one the server was started with"):
            judge(_images(1), ["a cat"])


def test_unreachable_endpoint_fails_after_bounded_retries() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(JudgeError) as info:
        load_reward("unifiedreward-iq", url=url, max_retries=1)
    message = str(info.value)
    assert message.startswith(f"unifiedreward-iq: cannot reach the judge server at {url} after 1 retries")
    assert "\n" not in message


def test_flowbp_eval_with_an_unreachable_judge_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "p0000_s0.png")
    (tmp_path / "p.txt").write_text("a cat\n")
    out = tmp_path / "run"
    code = main(["eval", "--images", str(folder), "--prompts", str(tmp_path / "p.txt"), "--metrics",
                 "unifiedreward-iq", "--judge-url", url, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists(), err
    expected = f"flowbp eval: error: unifiedreward-iq: cannot reach the judge server at {url} after 3 retries"
    assert err.startswith(expected), err


def test_concurrency_is_bounded(server) -> None:
    judge = _judge("unifiedreward-align", server.url, concurrency=3)
    scores = judge(_images(8), ["sleep:0.3:Final Score: 4"] * 8)
    assert scores.tolist() == [4.0] * 8
    assert 2 <= server.peak <= 3


def test_missing_openai_package_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(JudgeError, match=r"flowbp\[judges\]"):
        load_reward("unifiedreward", url="http://127.0.0.1:9/v1")


def test_judge_is_not_a_training_reward(tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    code = main(["train", "--output-dir", str(out), "--set", "reward=unifiedreward-align"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "reward: unifiedreward-align is an evaluation metric" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()
    with pytest.raises(ValueError, match="cannot be weighted or summed"):
        load_reward("hpsv2+unifiedreward-iq")


def test_flowbp_eval_keeps_missing_scores_and_raw_answers(server, tmp_path: Path, capsys) -> None:
    prompts = ["say:Final Score: 4", "say:no idea", "say:Final Score: 2", "a lighthouse"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(len(prompts)):
        for s in (0, 1):
            u8 = (_images(1, 24, 24, seed=10 * i + s)[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(u8).save(folder / f"p{i:04d}_s{s}.png")
    out = tmp_path / "run"
    args = ["eval", "--images", str(folder), "--prompts", str(tmp_path / "p.txt"), "--metrics",
            "unifiedreward-align,digit-ink", "--judge-url", server.url, "--judge-model", MODEL, "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    by_prompt = {r["prompt_index"]: r for r in records if r["seed"] == 0}
    assert by_prompt[1]["scores"]["unifiedreward-align"] is None  # null, not 0 / 1 / NaN
    assert by_prompt[1]["answers"]["unifiedreward-align"] == "no idea"
    assert by_prompt[0]["scores"]["unifiedreward-align"] == 4.0
    assert "NaN" not in (out / "scores.jsonl").read_text()
    s = json.loads((out / "summary.json").read_text())["metrics"]["unifiedreward-align"]
    # prompt 1 has no score at all: the mean is over prompts 0, 2, 3 with scores 4, 2, 3
    assert s["n_missing"] == 2 and s["n_images"] == 6 and s["n_prompts"] == 3
    assert s["mean"] == pytest.approx(3.0)
    assert "(2 of 8 missing)" in printed
    report = (out / "report.html").read_text()
    assert ">missing</td>" in report and 'title="no idea"' in report
    # a comparison with itself pairs only the images scored on both sides
    capsys.readouterr()
    assert main(["eval", "--compare", str(out), str(out)]) == 0
    assert "unifiedreward-align" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- local backend
def _tiny_llava_folder(folder: Path) -> Path:
    """A random LLaVA-OneVision (Qwen2 + SigLIP, a few thousand parameters) with processor files, saved."""
    from tiny_pipelines import tiny_qwen_tokenizer
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = tiny_qwen_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16,
         "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}))
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8),
        text_config=Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
    )
    LlavaOnevisionForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


def test_local_backend_matches_greedy_decoding_of_each_prompt_alone(tmp_path: Path) -> None:
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    from flowbp.rewards.judge_local import build_processor

    folder = _tiny_llava_folder(tmp_path / "ur")
    judge = load_reward("unifiedreward-iq", path=folder, batch_size=2, max_new_tokens=4, device="cpu")
    captions = ["a red car", "two cats on a long sofa"]  # prompts of different lengths: left padding in the batch
    images = _images(2, 48, 40, seed=3)
    scores = judge(images, captions)
    assert scores.shape == (2,) and len(judge.last_answers) == 2
    # a random model does not write "Final Score: x": every score is missing, never a stand-in number
    assert all(math.isnan(v) for v in scores.tolist())

    # reference: each prompt alone (no padding), the chatml-llava conversation written out here, greedy by hand
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval()
    processor = build_processor(folder, AutoConfig.from_pretrained(folder))
    tok = processor.tokenizer
    for img, caption, answer in zip(images, captions, judge.last_answers, strict=True):
        u8 = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        pil = Image.fromarray(u8).resize((512, 512))
        asked = judge_question(caption)
        assert asked.startswith("<image>\nYou are given a text caption") and "overall image quality" in asked
        full = (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            + asked + "<|im_end|>\n<|im_start|>assistant\n"
        )
        assert judge.backend.prompt(asked) == full
        inputs = processor(images=[pil], text=[full], return_tensors="pt")
        assert tok.decode(inputs["input_ids"][0]).count("<image>") > 1  # expanded to the image's tokens
        ids = inputs["input_ids"]
        new: list[int] = []
        with torch.no_grad():
            for _ in range(4):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                               image_sizes=inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]).logits
                nxt = int(logits[0, -1].argmax())
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert answer == tok.decode(new, skip_special_tokens=True)


def judge_question(caption: str) -> str:
    from flowbp.rewards.unifiedreward import question

    return question("iq", caption)


def test_missing_local_weights_name_the_expected_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FLOWBP_JUDGE_URL", raising=False)
    monkeypatch.setenv("FLOWBP_REWARD_DIR", str(tmp_path))
    from flowbp.rewards.weights import RewardWeightsError

    with pytest.raises(RewardWeightsError) as info:
        load_reward("unifiedreward-align")
    message = str(info.value)
    assert "config.json" in message and "model.safetensors" in message and "url=" in message and "\n" not in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardWeightsError, match="lacks"):
        load_reward("unifiedreward-align", path=tmp_path / "empty")


def _tiny_qwen25vl_folder(folder: Path) -> Path:
    """A random Qwen2.5-VL (the newer UnifiedReward judges' class) with its image processor, saved."""
    from tiny_pipelines import tiny_qwen_tokenizer
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tiny_qwen_tokenizer()
    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": special})
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [1]},
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
                     "bos_token_id": tok.pad_token_id, "eos_token_id": ids["<|im_end|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


def test_local_qwen25vl_backend_batched_equals_one_by_one(tmp_path: Path) -> None:
    folder = _tiny_qwen25vl_folder(tmp_path / "ur-qwen")
    captions = ["a red car", "two cats on a long sofa"]
    images = _images(2, 40, 48, seed=5)
    batched = load_reward("unifiedreward-align", path=folder, batch_size=2, max_new_tokens=4, device="cpu")
    alone = load_reward("unifiedreward-align", path=folder, batch_size=1, max_new_tokens=4, device="cpu")
    assert all(math.isnan(v) for v in batched(images, captions).tolist())  # random model: no score, missing
    alone(images, captions)
    assert batched.last_answers == alone.last_answers and all(batched.last_answers)
    asked = judge_question("a red car").replace("overall image quality", "")  # any question
    assert batched.backend.prompt(asked) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>" + asked.removeprefix("<image>\n")
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
