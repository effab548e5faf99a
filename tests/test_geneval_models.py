"""GenEval's model parts on tiny random models: Mask2Former post-processing, class mapping, colour crops/CLIP,
and ``flowbp eval --suite geneval`` end to end (folder, GenEval's own layout, and a sampled backbone).

References: transformers' own ``post_process_instance_segmentation`` (same scores and masks where both
are defined), mmdet's ``mask2bbox`` by hand, transformers' ``CLIPModel.forward`` for the colour
classifier, PIL by hand for the crops.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rewards_tiny import clip_folder

from flowbp.cli import main
from flowbp.geneval.colour import ColourClassifier, clip_pixels, crop_object, load_colour_classifier
from flowbp.geneval.detectors import (
    COCO_CLASSES,
    geneval_name_map,
    instance_postprocess,
    load_mask2former,
    mask2bbox,
)
from flowbp.geneval.prompts import load_metadata, object_names
from flowbp.geneval.rules import COLORS, Detection
from flowbp.geneval.score import GenEvalScorer
from flowbp.rewards.weights import RewardWeightsError

NUM_QUERIES = 10
BENCH = COCO_CLASSES.index("bench")


def tiny_mask2former(folder: Path, favour: int | None = BENCH, seed: int = 0) -> Path:
    """A saved random Mask2Former with COCO's labels (shuffled ids) and a 64-px PIL image processor.

    ``favour``: every query's class logits strongly prefer this COCO class and masks are sharpened, so
    each query is a confident instance of it (deterministic verdicts end to end).
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former import Mask2FormerImageProcessorPil

    torch.manual_seed(seed)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    order = np.random.default_rng(seed).permutation(80)  # ids in another order than COCO's: mapping is by name
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=80, hidden_dim=32, feature_size=32, mask_feature_size=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, encoder_feedforward_dim=32, dim_feedforward=32,
        num_queries=NUM_QUERIES, use_pretrained_backbone=False,
        id2label={int(i): COCO_CLASSES[c] for i, c in enumerate(order)},
    )
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if favour is not None:
        with torch.no_grad():
            head = model.class_predictor
            head.weight.zero_()
            head.bias.fill_(-10.0)
            head.bias[int(np.where(order == favour)[0][0])] = 10.0
            # sharp masks (mean sigmoid inside ≈ 1, so scores ≈ 1): the mask logits are linear in the last mask
            # embedder layer, so scale it until their mean magnitude is 6. A fixed factor does not do: the random
            # init differs between transformers versions (5.5's mask logits are ~100× smaller than 5.24's)
            last = model.model.transformer_module.decoder.mask_predictor.mask_embedder.layers[-1].layers[0]
            probe = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            scale = 6.0 / model(pixel_values=probe).masks_queries_logits.abs().mean()
            last.weight.mul_(scale)
            last.bias.mul_(scale)
    model.save_pretrained(folder)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    return {"detector": tiny_mask2former(root / "detector"), "clip": clip_folder(root / "clip", projection=16)}


# ------------------------------------------------------------------------------- detector parts


def test_instance_postprocess_matches_transformers_where_both_apply():
    """384×384 image, no padding: transformers' post-processing (fixed 384 size) sees the same masks and scores."""
    from transformers.models.mask2former import Mask2FormerImageProcessorPil

    g = torch.Generator().manual_seed(0)
    cls = torch.randn(1, NUM_QUERIES, 81, generator=g) * 3
    masks = torch.randn(1, NUM_QUERIES, 96, 96, generator=g) * 4
    ours = instance_postprocess(cls[0], masks[0], (384, 384), (384, 384), (384, 384))
    ours = [o for o in ours if o[3].any()]  # transformers skips empty masks
    theirs = Mask2FormerImageProcessorPil().post_process_instance_segmentation(
        SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks), threshold=0.0,
        target_sizes=[(384, 384)], return_binary_maps=True,
    )[0]
    assert len(ours) == len(theirs["segments_info"]) > 0
    ours_sorted = sorted(ours, key=lambda o: -o[1])
    info = sorted(range(len(theirs["segments_info"])), key=lambda j: -theirs["segments_info"][j]["score"])
    for o, j in zip(ours_sorted, info, strict=True):
        seg = theirs["segments_info"][j]
        assert o[0] == seg["label_id"] and o[1] == pytest.approx(seg["score"], abs=1e-6)
        assert torch.equal(o[3], theirs["segmentation"][seg["id"]].bool())


def test_mask2bbox_by_hand_and_boxes_of_instances():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:8] = True  # rows 2..4, cols 3..7 -> [3, 2, 8, 5] (mmdet: max + 1)
    assert mask2bbox(masks).tolist() == [[3.0, 2.0, 8.0, 5.0], [0.0, 0.0, 0.0, 0.0]]
    g = torch.Generator().manual_seed(1)
    out = instance_postprocess(torch.randn(4, 81, generator=g), torch.randn(4, 8, 8, generator=g), (32, 32),
                               (32, 32), (50, 70))
    for _, _, box, mask in out:
        assert mask.shape == (50, 70)
        if mask.any():
            ys, xs = torch.where(mask)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_min_score_skips_only_what_cannot_pass():
    g = torch.Generator().manual_seed(2)
    cls, masks = torch.randn(NUM_QUERIES, 81, generator=g) * 4, torch.randn(NUM_QUERIES, 16, 16, generator=g)
    full = instance_postprocess(cls, masks, (64, 64), (64, 64), (64, 64))
    fast = instance_postprocess(cls, masks, (64, 64), (64, 64), (64, 64), min_score=0.3)
    assert [(o[0], o[1]) for o in full if o[1] > 0.3] == [(o[0], o[1]) for o in fast if o[1] > 0.3]


def test_class_ids_are_mapped_by_name():
    shuffled = dict(enumerate(reversed(COCO_CLASSES)))
    mapping = geneval_name_map(shuffled)
    assert mapping[0] == "toothbrush" and mapping[79] == "person"
    assert mapping[79 - COCO_CLASSES.index("mouse")] == "computer mouse"  # GenEval's renames
    assert sorted(mapping.values()) == sorted(object_names())
    # Pascal-style / panoptic spellings, and extra non-COCO labels, are fine
    renamed = {i: {"motorcycle": "motorbike", "couch": "sofa"}.get(c, c) for i, c in enumerate(COCO_CLASSES)}
    assert geneval_name_map({**renamed, 80: "wall-other-merged"})[3] == "motorcycle"
    with pytest.raises(RewardWeightsError, match=r"lack GenEval class\(es\) \['zebra'\]"):
        geneval_name_map({i: c for i, c in enumerate(COCO_CLASSES) if c != "zebra"})


def test_detector_returns_geneval_names_boxes_and_masks_at_image_size(models):
    detector = load_mask2former(models["detector"])
    images = [Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)),
              Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 60, 3), dtype=np.uint8))]
    for image, found in zip(images, detector(images), strict=True):
        assert set(found) == {"bench"}
        for d in found["bench"]:
            assert d.mask.shape == (image.height, image.width) and 0.3 < d.score <= 1.0
            ys, xs = np.where(d.mask)
            assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_missing_or_wrong_detector_weights_are_one_line(tmp_path, models):
    from flowbp.geneval.score import locate_weights

    with pytest.raises(RewardWeightsError, match=r"geneval-detector: .*nope does not exist; expected a transformers"):
        locate_weights(tmp_path / "nope", models["clip"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardWeightsError, match=r"geneval-clip: .*empty lacks a transformers CLIP"):
        locate_weights(models["detector"], tmp_path / "empty")


# ------------------------------------------------------------------------------- colour


def test_crop_is_the_mask_over_grey_then_the_box():
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red image
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 4:12] = True
    mask[7, 4] = False  # a hole inside the box shows the grey
    crop = np.asarray(crop_object(Image.fromarray(rgb), Detection((4, 5, 12, 10), 0.9, mask)))
    assert crop.shape == (5, 8, 3)
    assert (crop[0, 0] == [200, 0, 0]).all() and (crop[2, 0] == [153, 153, 153]).all()  # #999


def test_clip_pixels_match_transformers_clip_processor_on_even_excess():
    """OpenAI's eval transform (resize shorter side 224 bicubic, centre crop) vs transformers' PIL processor.

    With an even excess both libraries crop at the same offset, so the two PIL paths agree exactly.
    """
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (120, 60, 3), dtype=np.uint8))  # -> 224×448
    ours = clip_pixels(image)
    theirs = CLIPImageProcessorPil()(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().max() < 1e-5


def test_colour_classifier_is_the_zero_shot_argmax_of_clip_forward(models):
    from transformers import CLIPModel

    clf = load_colour_classifier(models["clip"])
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    dets = [Detection((0, 0, 40, 30), 0.9, None), Detection((10, 20, 64, 64), 0.8, rng.random((64, 64)) > 0.5)]
    got = clf(image, dets, "bench")
    # reference: CLIPModel.forward's normalised embeddings; per colour the mean of its 3 templates, renormalised
    model = CLIPModel.from_pretrained(models["clip"]).eval()
    texts = [t.format(c=c) for c in COLORS for t in ("a photo of a {c} bench", "a photo of a {c}-colored bench",
                                                     "a photo of a {c} object")]
    tokens = clf.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = torch.stack([clip_pixels(crop_object(image, d)) for d in dets])
    with torch.no_grad():
        out = model(**tokens, pixel_values=pixels)
    weights = F.normalize(out.text_embeds.view(len(COLORS), 3, -1).mean(1), dim=-1)
    expected = [COLORS[i] for i in (out.image_embeds @ weights.T).argmax(1).tolist()]
    assert got == expected
    assert isinstance(clf, ColourClassifier) and clf(image, [], "bench") == []


# ------------------------------------------------------------------------------- end to end


def _meta(indices):
    all_meta = load_metadata()
    return [all_meta[i] for i in indices]


# prompts 0 ("a photo of a bench"), 80 (bench and sports ball), 254 (four benches), 255 (three benches)
SUBSET = [0, 80, 254, 255]


def test_scorer_end_to_end_verdicts(models):
    """Every query is a confident bench: single bench correct; bench + ball misses the ball; counting sees 10."""
    from flowbp.geneval.score import load_scorer

    meta = _meta(SUBSET)
    assert [m["tag"] for m in meta] == ["single_object", "two_object", "counting", "counting"]
    scorer = load_scorer(models["detector"], models["clip"])
    images = [torch.from_numpy(np.random.default_rng(k).integers(0, 255, (3, 64, 64), dtype=np.uint8))
              for k in range(4)]
    records = scorer.score(images, meta, [f"{k}.png" for k in range(4)])
    assert [r["correct"] for r in records] == [True, False, False, False]
    assert records[1]["reason"] == "expected sports ball>=1, found 0"
    found = len(json.loads(records[2]["details"])["bench"])  # queries whose score passes the 0.9 counting threshold
    assert 5 <= found <= NUM_QUERIES and records[2]["reason"] == f"expected bench<5, found {found}"
    assert len(json.loads(records[0]["details"])["bench"]) <= NUM_QUERIES


def _eval(*args):
    return main(["eval", *args])


def test_eval_suite_geneval_on_folders(models, tmp_path, capsys):
    meta = _meta(SUBSET)
    meta_file = tmp_path / "meta.jsonl"
    meta_file.write_text("".join(json.dumps(m) + "\n" for m in meta))
    # flowbp's folder layout, RGB PNGs
    flowbp_dir = tmp_path / "flowbp"
    flowbp_dir.mkdir()
    official = tmp_path / "official"
    for i in range(len(meta)):
        (official / f"{i:05d}" / "samples").mkdir(parents=True)
        (official / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(meta[i]) + "\n")
        for k in range(2):
            img = Image.fromarray(np.random.default_rng(10 * i + k).integers(0, 255, (64, 64, 3), dtype=np.uint8))
            img.save(flowbp_dir / f"p{i:04d}_s{k}.png")
            img.save(official / f"{i:05d}" / "samples" / f"{k:04d}.png")
    weights = ["--geneval-detector", str(models["detector"]), "--geneval-clip", str(models["clip"]), "--no-progress"]
    runs = {}
    for name, folder in (("flowbp", flowbp_dir), ("official", official)):
        out = tmp_path / f"run-{name}"
        assert _eval("--suite", "geneval", "--prompts", str(meta_file), "--images", str(folder), *weights,
                     "--out", str(out)) == 0
        runs[name] = out
    printed = capsys.readouterr().out
    assert "Overall score (avg. over tasks): 0.33333" in printed  # (2/2 + 0/2 + 0/4) / 3 tasks
    for out in runs.values():
        results = [json.loads(line) for line in (out / "geneval_results.jsonl").read_text().splitlines()]
        assert [r["correct"] for r in results] == [True, True, False, False, False, False, False, False]
        assert set(results[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
        assert (out / results[0]["filename"]).is_file()
        summary = json.loads((out / "geneval.json").read_text())
        assert summary["overall"] == pytest.approx((1 + 0 + 0) / 3)
        assert summary["tasks"]["counting"] == {"accuracy": 0.0, "correct": 0, "images": 4}
        assert json.loads((out / "summary.json").read_text())["geneval"] == summary
        scores = [json.loads(line)["scores"]["geneval"] for line in (out / "scores.jsonl").read_text().splitlines()]
        assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # a GenEval folder generated from other prompts is refused in one line, nothing written
    (official / "00001" / "metadata.jsonl").write_text(json.dumps(meta[0]) + "\n")
    assert _eval("--suite", "geneval", "--prompts", str(meta_file), "--images", str(official), *weights,
                 "--out", str(tmp_path / "bad")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not GenEval prompt 1" in err and not (tmp_path / "bad").exists()


def test_eval_suite_geneval_samples_a_backbone(models, tiny_sd3_dir, tmp_path, capsys):
    """The tiny SD3 sampled at 32 px, 4 images per prompt by default, fixed seeds 0..3, then GenEval-scored."""
    meta_file = tmp_path / "meta.jsonl"
    meta_file.write_text("".join(json.dumps(m) + "\n" for m in _meta([0, 80])))
    out = tmp_path / "run"
    assert _eval("--suite", "geneval", "--prompts", str(meta_file), "--backbone", "sd3", "--model", str(tiny_sd3_dir),
                 "--resolution", "32", "--steps", "2", "--geneval-detector", str(models["detector"]),
                 "--geneval-clip", str(models["clip"]), "--no-progress", "--out", str(out)) == 0
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["seed"]) for r in records] == [(p, s) for p in range(2) for s in range(4)]
    results = [json.loads(line) for line in (out / "geneval_results.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in results] == [True] * 4 + [False] * 4
    assert "Overall score (avg. over tasks): 0.50000" in capsys.readouterr().out


def test_geneval_scorer_rejects_float_images(models):
    scorer = GenEvalScorer(lambda ims: [{} for _ in ims], lambda *a: [])
    with pytest.raises(ValueError, match="expected a 3×H×W uint8 image"):
        scorer.score([torch.rand(3, 8, 8)], _meta([0]), ["x.png"])


def test_mmdet_backend_gets_bgr_arrays_and_parses_per_class_results(monkeypatch):
    """mmdet itself does not install here: a stand-in ``mmdet.apis`` records what the backend passes and returns
    an mmdet 2.x result (per-class ``[x1, y1, x2, y2, score]`` arrays, per-class mask lists)."""
    import sys
    import types

    from flowbp.geneval.detectors import MMDetDetector

    seen = []

    def inference_detector(model, image):
        seen.append(image)
        bbox = [np.zeros((0, 5), dtype=np.float32) for _ in range(80)]
        segm = [[] for _ in range(80)]
        bbox[13] = np.array([[1, 2, 5, 6, 0.8], [0, 0, 3, 3, 0.2]], dtype=np.float32)  # bench (COCO id 13)
        segm[13] = [np.ones((8, 10), dtype=bool), np.zeros((8, 10), dtype=bool)]
        bbox[64] = np.array([[2, 2, 4, 4, 0.9]], dtype=np.float32)  # COCO "mouse" = GenEval "computer mouse"
        segm[64] = [np.ones((8, 10), dtype=bool)]
        return bbox, segm

    apis = types.ModuleType("mmdet.apis")
    apis.inference_detector = inference_detector
    monkeypatch.setitem(sys.modules, "mmdet", types.ModuleType("mmdet"))
    monkeypatch.setitem(sys.modules, "mmdet.apis", apis)
    detector = object.__new__(MMDetDetector)
    detector.model, detector.names = None, geneval_name_map(dict(enumerate(COCO_CLASSES)))
    rgb = np.zeros((8, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    (found,) = detector([Image.fromarray(rgb)])
    assert seen[0].shape == (8, 10, 3) and (seen[0][..., 2] == 255).all() and (seen[0][..., 0] == 0).all()  # BGR
    assert set(found) == {"bench", "computer mouse"}
    assert [d.box for d in found["bench"]] == [(1.0, 2.0, 5.0, 6.0), (0.0, 0.0, 3.0, 3.0)]
    assert found["bench"][0].score == pytest.approx(0.8) and found["bench"][0].mask.shape == (8, 10)
