"""HPS v2.1: open_clip → transformers conversion against a reference forward of open_clip's layout, the
pad-not-crop preprocessing against a reference written from HPSv2's ResizeMaxSize, and the reward end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from rewards_tiny import (
    IMAGE,
    PATCH,
    assert_pixel_gradient_matches_finite_differences,
    byte_vocab,
    clip_tokenizer,
    smooth_images,
)

from flowbp.cli import main as cli_main
from flowbp.rewards import load_reward
from flowbp.rewards.convert import build_clip_model, openclip_clip_config
from flowbp.rewards.preprocess import HPS_PAD, OPENAI_MEAN, OPENAI_STD, ImageTransform
from flowbp.rewards.tokenizers import clip_tokenizer as clip_tokenizer_from
from flowbp.rewards.tokenizers import open_clip_clean
from flowbp.rewards.weights import RewardWeightsError

V_WIDTH, V_LAYERS, V_HEADS, V_MLP = 48, 2, 4, 96  # vision tower: head width 12 (open_clip's head_width)
T_WIDTH, T_LAYERS, T_HEADS, T_MLP = 32, 2, 4, 64
EMBED = 32  # = T_WIDTH: a square text_projection, where a missing transpose would load silently
CTX, VOCAB = 77, 514
PROMPTS = ["a photo of an astronaut riding a horse", "pixel art, a castle"]


def openclip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with open_clip ``CLIP``'s keys and shapes (VisionTransformer + text transformer)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix, width):
        return {f"{prefix}.weight": 1 + r(width, scale=0.1), f"{prefix}.bias": r(width, scale=0.1)}

    def blocks(prefix, n, width, mlp):
        sd = {}
        for i in range(n):
            p = f"{prefix}.resblocks.{i}"
            sd |= ln(f"{p}.ln_1", width) | ln(f"{p}.ln_2", width)
            sd |= {f"{p}.attn.in_proj_weight": r(3 * width, width), f"{p}.attn.in_proj_bias": r(3 * width),
                   f"{p}.attn.out_proj.weight": r(width, width), f"{p}.attn.out_proj.bias": r(width),
                   f"{p}.mlp.c_fc.weight": r(mlp, width), f"{p}.mlp.c_fc.bias": r(mlp),
                   f"{p}.mlp.c_proj.weight": r(width, mlp), f"{p}.mlp.c_proj.bias": r(width)}
        return sd

    grid = IMAGE // PATCH
    sd = {"visual.conv1.weight": r(V_WIDTH, 3, PATCH, PATCH, scale=0.05), "visual.class_embedding": r(V_WIDTH),
          "visual.positional_embedding": r(grid * grid + 1, V_WIDTH), "visual.proj": r(V_WIDTH, EMBED),
          "token_embedding.weight": r(VOCAB, T_WIDTH), "positional_embedding": r(CTX, T_WIDTH),
          "text_projection": r(T_WIDTH, EMBED), "logit_scale": torch.tensor(math.log(1 / 0.07))}
    sd |= ln("visual.ln_pre", V_WIDTH) | ln("visual.ln_post", V_WIDTH) | ln("ln_final", T_WIDTH)
    sd |= blocks("visual.transformer", V_LAYERS, V_WIDTH, V_MLP) | blocks("transformer", T_LAYERS, T_WIDTH, T_MLP)
    return sd


# ----------------------------------------------------------- reference forward in open_clip's layout


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _block(x, sd, p, heads, mask):
    """open_clip ResidualAttentionBlock: x + MHA(ln_1 x) with fused in_proj, then x + c_proj(GELU(c_fc(ln_2 x)))."""
    b, n, w = x.shape
    h = _ln(x, sd, f"{p}.ln_1")
    q, k, v = (h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, w // heads).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / math.sqrt(w // heads)
    if mask is not None:
        att = att + mask
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
    x = x + o @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
    h = F.gelu(_ln(x, sd, f"{p}.ln_2") @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"])
    return x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]


def ref_encode_image(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(V_LAYERS):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}", V_HEADS, None)
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def ref_encode_text(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    mask = torch.full((CTX, CTX), float("-inf")).triu(1)  # open_clip's build_attention_mask
    for i in range(T_LAYERS):
        x = _block(x, sd, f"transformer.resblocks.{i}", T_HEADS, mask)
    x = _ln(x, sd, "ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


def open_clip_ids(prompts):
    """open_clip's tokenize: [sot] tokens [eot], zero-padded to 77 (no attention mask)."""
    tok = clip_tokenizer()
    ids = torch.zeros(len(prompts), CTX, dtype=torch.long)
    for row, p in enumerate(prompts):
        t = tok(p)["input_ids"]
        ids[row, : len(t)] = torch.tensor(t)
    return ids


def ref_hps_transform(images: torch.Tensor) -> torch.Tensor:
    """HPSv2's ResizeMaxSize(224, BICUBIC, fill=0) + Normalize, written from its code, one image at a time.

    hpsv2x 1.2.0 ``open_clip/transform.py`` ``image_transform(is_train=False, resize_longest_max=True)``:
    Compose([RGB, ToTensor(), ResizeMaxSize(224), Normalize]): the resize gets a float C×H×W tensor
    (``height, width = img.shape[1:]``). scale = max_size / max(h, w); new = round(dim * scale);
    torchvision F.resize on a float tensor is interpolate(bicubic, antialias=True) with no clamp;
    F.pad(img, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], 0) pads [left, top, right, bottom].
    """
    out = []
    for img in images:
        height, width = img.shape[-2:]
        scale = 224 / float(max(height, width))
        new_size = tuple(round(dim * scale) for dim in (height, width))
        x = F.interpolate(img[None], size=new_size, mode="bicubic", align_corners=False, antialias=True)
        ph, pw = 224 - new_size[0], 224 - new_size[1]
        canvas = torch.zeros(1, 3, 224, 224)
        canvas[..., ph // 2 : ph // 2 + new_size[0], pw // 2 : pw // 2 + new_size[1]] = x
        mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
        out.append((canvas - mean) / std)
    return torch.cat(out)


# --------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("hw", [(100, 47), (64, 43), (47, 100), (300, 200)])
def test_hps_preprocessing_pads_instead_of_cropping(hw):
    images = smooth_images(2, *hw, seed=hw[1])
    ours = HPS_PAD(images)
    assert torch.allclose(ours, ref_hps_transform(images), atol=1e-6)
    # Nothing is cropped: the padding is the normalised black of zeros, and the image itself spans the longer side.
    h, w = hw
    new_w = round(w * 224 / max(h, w))
    if h > w:
        left = (224 - new_w) // 2  # e.g. 47 wide → 105 → pad 119 = 59 left + 60 right
        pad_value = ((0 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)).view(1, 3, 1)
        assert torch.allclose(ours[..., :, :left], pad_value.unsqueeze(-1).expand_as(ours[..., :, :left]))
        assert not torch.allclose(ours[..., :, left], pad_value.expand_as(ours[..., :, left]))


def test_hps_preprocessing_keeps_the_overshoot_and_its_gradient():
    """A sharp black/white edge: bicubic overshoots past [0, 1]; the official float resize keeps it (no clamp).

    The old transform clamped after the resize (as for PIL scorers), which zeroed the gradient of every
    overshooting pixel; HPSv2 resizes the float tensor, so the reward's gradient must reach those pixels.
    """
    images = torch.zeros(1, 3, 300, 200)
    images[..., :, 100:] = 1.0  # vertical edge; 300×200 → 224×149 (downsampling: antialiased bicubic)
    images.requires_grad_(True)
    ours = HPS_PAD(images)
    assert torch.allclose(ours, ref_hps_transform(images.detach()), atol=1e-6)
    pixels = ours * torch.tensor(OPENAI_STD).view(1, 3, 1, 1) + torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    over = pixels[0, 0].max()
    assert over > 1.0 + 1e-3, over  # bicubic ringing past white, kept as the official transform keeps it
    row, col = divmod(int(pixels[0, 0].argmax()), pixels.shape[-1])
    (grad,) = torch.autograd.grad(ours[0, 0, row, col], images)
    assert grad.abs().sum() > 0  # the gradient reaches the input through the overshooting pixel
    # the old behaviour (clamp after resize) zeroes exactly this gradient
    clamped = ImageTransform(layout="pad", clamp=True)(images)
    (old_grad,) = torch.autograd.grad(clamped[0, 0, row, col], images)
    assert old_grad.abs().sum() == 0


def test_hps_rounding_is_pythons():
    # 64×43 → width 43 · 3.5 = 150.5: Python's round gives 150 (half to even), as HPSv2's code; pad 74 = 37 + 37
    images = torch.ones(1, 3, 64, 43)
    out = HPS_PAD(images)
    black = (0 - OPENAI_MEAN[0]) / OPENAI_STD[0]
    row = out[0, 0, 100]
    assert torch.allclose(row[:37], torch.full((37,), black)) and not torch.isclose(row[37], torch.tensor(black))
    assert torch.allclose(row[187:], torch.full((37,), black)) and not torch.isclose(row[186], torch.tensor(black))


def test_openclip_conversion_reproduces_reference_forward():
    sd = openclip_state_dict()
    config = openclip_clip_config(sd, vision_heads=V_HEADS, text_heads=T_HEADS, eos_token_id=513, bos_token_id=512)
    model = build_clip_model(sd, config)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    tok = clip_tokenizer()
    hf_ids = tok(PROMPTS, padding="max_length", max_length=CTX, return_tensors="pt")["input_ids"]  # padded with eot
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=hf_ids).pooler_output)
        ref_img, ref_txt = ref_encode_image(sd, pixels), ref_encode_text(sd, open_clip_ids(PROMPTS))
    assert (img - ref_img).abs().max() <= 1e-5, (img - ref_img).abs().max()
    assert (txt - ref_txt).abs().max() <= 1e-5, (txt - ref_txt).abs().max()
    assert torch.equal(model.logit_scale, sd["logit_scale"])


def _hps_dir(tmp_path, sd=None):
    """A folder as a user would assemble it: the checkpoint, open_clip's model config and a tokenizer."""
    folder = tmp_path / "hps"
    folder.mkdir()
    torch.save({"state_dict": sd if sd is not None else openclip_state_dict(), "epoch": 3},
               folder / "HPS_v2.1_compressed.pt")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": EMBED, "vision_cfg": {"width": V_WIDTH, "layers": V_LAYERS, "head_width": V_WIDTH // V_HEADS,
                                           "patch_size": PATCH, "image_size": IMAGE},
        "text_cfg": {"width": T_WIDTH, "heads": T_HEADS, "layers": T_LAYERS}}}))
    clip_tokenizer().save_pretrained(folder)
    return folder


def test_hpsv2_reward_end_to_end_and_convert_command(tmp_path, capsys):
    sd = openclip_state_dict()
    folder = _hps_dir(tmp_path, sd)
    reward = load_reward("hpsv2", path=folder)
    images = smooth_images(2, 160, 96, seed=2).requires_grad_(True)
    scores = reward(images, PROMPTS)
    with torch.no_grad():
        ref = (F.normalize(ref_encode_image(sd, ref_hps_transform(images)), dim=-1)
               * F.normalize(ref_encode_text(sd, open_clip_ids(PROMPTS)), dim=-1)).sum(-1)
    assert (scores.detach() - ref).abs().max() <= 1e-5
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # a checkpoint file given directly may have any name (the tokenizer is looked up beside it)
    (folder / "HPS_v2.1_compressed.pt").rename(folder / "my_hps.pt")
    with torch.no_grad():
        assert torch.equal(load_reward("hpsv2", path=folder / "my_hps.pt")(images, PROMPTS), scores.detach())
    (folder / "my_hps.pt").rename(folder / "HPS_v2.1_compressed.pt")

    out = tmp_path / "hps-converted"
    assert cli_main(["convert-reward", "hpsv2", "--src", str(folder / "HPS_v2.1_compressed.pt"),
                     "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and "wrote" in capsys.readouterr().out
    converted = load_reward("hpsv2", path=out)
    with torch.no_grad():
        assert torch.allclose(converted(images, PROMPTS), scores.detach(), atol=1e-6)
    # a second conversion into an existing folder is refused and leaves it as it was
    assert cli_main(["convert-reward", "hpsv2", "--src", str(folder / "HPS_v2.1_compressed.pt"),
                     "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_malformed_hps_checkpoints_fail_in_one_line(tmp_path, capsys):
    sd = openclip_state_dict()
    del sd["visual.ln_post.weight"]
    folder = _hps_dir(tmp_path, sd)
    with pytest.raises(RewardWeightsError) as err:
        load_reward("hpsv2", path=folder)
    msg = str(err.value)
    assert "\n" not in msg and "visual.ln_post.weight" in msg and "HPS_v2.1_compressed.pt" in msg
    assert "xswu/HPSv2" in msg
    (folder / "HPS_v2.1_compressed.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(RewardWeightsError) as err:
        load_reward("hpsv2", path=folder)
    assert "\n" not in str(err.value) and "cannot read" in str(err.value)
    # through the CLI: one line on stderr, exit 2, no output folder
    out = tmp_path / "never"
    assert cli_main(["convert-reward", "hpsv2", "--src", str(folder / "HPS_v2.1_compressed.pt"),
                     "--out", str(out)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "cannot read" in err_lines[0]
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_byte_vocab_is_what_bpe_file_builds(tmp_path):
    # open_clip's BPE file: a header line then merges; ids = bytes, bytes</w>, merges, specials
    import gzip

    from flowbp.rewards.convert import clip_vocab_from_bpe

    bpe = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "h o</w>\nt h\n")
    vocab, merges = clip_vocab_from_bpe(bpe)
    base = byte_vocab()
    assert merges == ["h o</w>", "t h"]
    assert vocab["ho</w>"] == 512 and vocab["th"] == 513
    assert vocab["<|startoftext|>"] == 514 and vocab["<|endoftext|>"] == 515
    assert all(vocab[t] == i for t, i in base.items() if i < 512)
    # the tokenizer built from that file applies the merges by rank: "tho" → t + "ho</w>" ("h o</w>" ranks first)
    tok = clip_tokenizer_from(tmp_path, "hpsv2", None)
    assert tok("tho")["input_ids"] == [514, vocab["t"], vocab["ho</w>"], 515]
    assert tok("th")["input_ids"] == [514, vocab["t"], vocab["h</w>"], 515]  # "t h" merges "t"+"h", not "h</w>"
    assert tok.model_max_length == 77


def test_open_clip_text_cleaning():
    # ftfy's quote uncurling, ligatures and full width, html.unescape twice, whitespace: written by hand
    assert open_clip_clean("  “Quotes” ‘and’ it\u02bcs\t &amp;amp; ﬁne ＡＢＣ\u3000x \n") == \
        '"Quotes" \'and\' it\'s & fine ABC x'
    assert open_clip_clean("e\u0301cole") == "\u00e9cole"  # NFC


def test_vit_h14_shapes_convert_to_the_hps_architecture():
    """At full size (meta tensors, no memory): ViT-H-14's open_clip shapes give HPS v2.1's transformers config."""
    meta = torch.device("meta")

    def blocks(prefix, n, w, mlp):
        sd = {}
        for i in range(n):
            p = f"{prefix}.resblocks.{i}"
            for ln in ("ln_1", "ln_2"):
                sd |= {f"{p}.{ln}.weight": torch.empty(w, device=meta), f"{p}.{ln}.bias": torch.empty(w, device=meta)}
            sd |= {f"{p}.attn.in_proj_weight": torch.empty(3 * w, w, device=meta),
                   f"{p}.attn.in_proj_bias": torch.empty(3 * w, device=meta),
                   f"{p}.attn.out_proj.weight": torch.empty(w, w, device=meta),
                   f"{p}.attn.out_proj.bias": torch.empty(w, device=meta),
                   f"{p}.mlp.c_fc.weight": torch.empty(mlp, w, device=meta),
                   f"{p}.mlp.c_fc.bias": torch.empty(mlp, device=meta),
                   f"{p}.mlp.c_proj.weight": torch.empty(w, mlp, device=meta),
                   f"{p}.mlp.c_proj.bias": torch.empty(w, device=meta)}
        return sd

    e = lambda *s: torch.empty(*s, device=meta, dtype=torch.float16)  # noqa: E731
    sd = {"visual.conv1.weight": e(1280, 3, 14, 14), "visual.class_embedding": e(1280),
          "visual.positional_embedding": e(257, 1280), "visual.proj": e(1280, 1024),
          "token_embedding.weight": e(49408, 1024), "positional_embedding": e(77, 1024),
          "text_projection": e(1024, 1024), "logit_scale": e(())}
    for p, w in (("visual.ln_pre", 1280), ("visual.ln_post", 1280), ("ln_final", 1024)):
        sd |= {f"{p}.weight": e(w), f"{p}.bias": e(w)}
    sd |= blocks("visual.transformer", 32, 1280, 5120) | blocks("transformer", 24, 1024, 4096)
    config = openclip_clip_config(sd)  # defaults: ViT-H-14's heads and exact GELU
    model = build_clip_model(sd, config)
    v, t = model.config.vision_config, model.config.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1280, 5120, 32, 16)
    assert (v.image_size, v.patch_size, v.hidden_act, v.layer_norm_eps) == (224, 14, "gelu", 1e-5)
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (1024, 4096, 24, 16)
    assert (t.vocab_size, t.max_position_embeddings, t.eos_token_id) == (49408, 77, 49407)
    assert model.config.projection_dim == 1024
    # open_clip ViT-H-14's parameter count; HPS_v2.1_compressed.pt is 1,972,490,005 B ≈ 2 B per parameter
    assert sum(p.numel() for p in model.parameters()) == 986_109_441


def test_hpsv2_pixel_gradient_matches_finite_differences(tmp_path):
    reward = load_reward("hpsv2", path=_hps_dir(tmp_path)).double()
    assert_pixel_gradient_matches_finite_differences(reward, smooth_images(1, 90, 150, seed=6), PROMPTS[:1], 2)
