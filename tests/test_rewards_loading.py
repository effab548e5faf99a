"""Where reward weights come from: path, reward_paths, $FLOWBP_REWARD_DIR, the hub cache; one-line errors;
nothing downloaded; no pickled code executed."""

from __future__ import annotations

import shutil
import socket

import huggingface_hub.constants
import pytest
import torch
from rewards_tiny import clip_folder, clip_tokenizer, smooth_images

from flowbp.config import load_config, validate_against_components
from flowbp.rewards import load_reward
from flowbp.rewards.weights import ENV_VAR, RewardWeightsError

# reward -> (file the message must name, where it comes from)
EXPECTED = {
    "pickscore": ("CLIPModel folder", "yuvalkirstain/PickScore_v1"),
    "clipscore": ("CLIP folder", "openai/clip-vit-large-patch14"),
    "hpsv2": ("HPS_v2.1_compressed.pt", "xswu/HPSv2"),
    "imagereward": ("ImageReward.pt", "THUDM/ImageReward"),
    "aesthetic": ("sac+logos+ava1-l14-linearMSE.pth", "improved-aesthetic-predictor"),
}


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty hub cache and a network that records any connection attempt."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv(ENV_VAR, raising=False)
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", connect)
    return cache, attempts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_weights_fail_in_one_line_without_download(name, empty_hub, tmp_path):
    cache, attempts = empty_hub
    with pytest.raises(RewardWeightsError) as err:
        load_reward(name)
    msg = str(err.value)
    expected, source = EXPECTED[name]
    assert "\n" not in msg and msg.startswith(f"{name}: ") and expected in msg and source in msg, msg
    assert ENV_VAR in msg and "allow_download" in msg
    with pytest.raises(RewardWeightsError) as err:  # an explicit path that does not exist
        load_reward(name, path=tmp_path / "nowhere")
    assert "\n" not in str(err.value) and "does not exist" in str(err.value) and expected in str(err.value)
    assert attempts == [] and not any(cache.iterdir())


def test_env_dir_and_hub_cache_are_found(tmp_path, empty_hub, monkeypatch):
    cache, attempts = empty_hub
    root = tmp_path / "rewards"
    clip_folder(root / "pickscore")
    images = smooth_images(1, 64, 64)
    with torch.no_grad():
        direct = load_reward("pickscore", path=root / "pickscore")(images, ["x"])
        monkeypatch.setenv(ENV_VAR, str(root))
        assert torch.equal(load_reward("pickscore")(images, ["x"]), direct)
        monkeypatch.delenv(ENV_VAR)
        # the hub cache layout: models--org--name/refs/main -> snapshots/<commit>/
        repo = cache / "models--yuvalkirstain--PickScore_v1"
        commit = "0" * 40
        shutil.copytree(root / "pickscore", repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        assert torch.equal(load_reward("pickscore")(images, ["x"]), direct)
    assert attempts == []


def test_a_folder_without_the_expected_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardWeightsError) as err:
        load_reward("pickscore", path=tmp_path / "empty")
    assert "lacks" in str(err.value) and "config.json" in str(err.value) and "\n" not in str(err.value)


class _Evil:
    """Unpickling this would create a file: weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "hps"
    folder.mkdir()
    torch.save({"state_dict": _Evil(str(marker))}, folder / "HPS_v2.1_compressed.pt")
    clip_tokenizer().save_pretrained(folder)
    with pytest.raises(RewardWeightsError) as err:
        load_reward("hpsv2", path=folder)
    assert "cannot read" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_malformed_aesthetic_mlp(tmp_path):
    folder = clip_folder(tmp_path / "aes")
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, folder / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(RewardWeightsError) as err:
        load_reward("aesthetic", path=folder)
    assert "not the predictor MLP" in str(err.value) and "\n" not in str(err.value)


def test_config_reward_paths_are_validated(tmp_path):
    config = load_config(overrides={"reward": "pickscore", "reward_paths": {"pickscore": str(tmp_path)}})
    assert config.reward_paths == {"pickscore": str(tmp_path)}
    validate_against_components(config)
    with pytest.raises(ValueError, match=r"reward_paths\.hpsv2: file or directory not found"):
        load_config(overrides={"reward_paths": {"hpsv2": str(tmp_path / "missing")}})
    with pytest.raises(ValueError, match=r"reward_paths: unknown reward"):
        validate_against_components(load_config(overrides={"reward_paths": {"hpsv9": str(tmp_path)}}))
    with pytest.raises(ValueError, match="reward_paths"):
        load_reward("pickscore", paths={"hpsv9": tmp_path})
