"""``flowbp eval`` end to end on the digits testbed: files, scores, CIs, paired comparisons, report, bad input.

Every expected number is derived here independently of flowbp.stats: per-prompt means by hand, intervals
from scipy's t distribution, significance from scipy's paired t-test, and two comparisons whose outcome is
known by construction (inverted images: ink(1 − x) = 1 − ink(x) > ink(x) for every digit; prompts
permuted on a prompt-independent metric: the mean difference is exactly 0).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats as sps

from flowbp.cli import main
from flowbp.evaluate import load_image
from flowbp.rewards import load_reward

PROMPTS = ["digit 0", "digit 3", "digit 7", "digit 9"]
REWARDS = ["digit-alignment", "digit-contrast", "digit-ink", "digit-alignment+5*digit-contrast"]
METRICS = [*REWARDS, "heldout-correct"]
COMMON = ["--no-progress", "--images-per-prompt", "2", "--steps", "6"]


def _eval(*args: str) -> int:
    return main(["eval", *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base, short = root / "base", root / "short"
    metrics = ",".join(METRICS)
    model = ["--backbone", "digits", "--prompts", str(prompts), "--metrics", metrics]
    assert _eval(*model, "--out", str(base), *COMMON) == 0
    # the same prompts and seeds sampled with 2 steps instead of 6, compared with the base run on the way
    short_args = ["--no-progress", "--images-per-prompt", "2", "--steps", "2", "--baseline", str(base)]
    assert _eval(*model, "--out", str(short), *short_args, "--embed-images") == 0
    return {"root": root, "prompts": prompts, "base": base, "short": short}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]


def _per_prompt(records: list[dict], metric: str) -> np.ndarray:
    # averages within prompt by hand, in prompt order
    return np.array([np.mean([r["scores"][metric] for r in records if r["prompt_index"] == i]) for i in range(4)])


def _expected_paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, bool]:
    d = a - b
    if np.ptp(d) == 0:
        return d.mean(), float("nan"), float("nan"), False
    low, high = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
    return d.mean(), low, high, bool(sps.ttest_rel(a, b).pvalue < 0.05)


def test_eval_writes_scores_equal_to_the_rewards_called_directly(runs) -> None:
    base = runs["base"]
    for name in ("scores.jsonl", "summary.json", "contact_sheet.png", "report.html"):
        assert (base / name).is_file(), name
    records = _records(base)
    # image k of every prompt uses seed k: (prompt index, seed) in prompt order
    assert [(r["prompt_index"], r["seed"], r["prompt"]) for r in records] == [
        (i, s, PROMPTS[i]) for i in range(4) for s in (0, 1)
    ]
    images = torch.stack([load_image(base / r["image"]) for r in records]).float() / 255
    assert images.shape == (8, 3, 16, 16)
    prompts = [r["prompt"] for r in records]
    for spec in REWARDS:
        direct = load_reward(spec)(images, prompts).double()
        got = torch.tensor([r["scores"][spec] for r in records], dtype=torch.float64)
        torch.testing.assert_close(got, direct, rtol=1e-6, atol=1e-7)
    from flowbp.testbed.heldout_metrics import heldout_accuracy

    assert np.mean([r["scores"]["heldout-correct"] for r in records]) == pytest.approx(
        heldout_accuracy(images, prompts)
    )
    # summary: mean and Student-t interval over the 4 per-prompt means
    summary = json.loads((base / "summary.json").read_text())
    assert summary["n_prompts"] == 4 and summary["n_images"] == 8
    for spec in ("digit-alignment", "digit-contrast"):
        p = _per_prompt(records, spec)
        low, high = sps.t.interval(0.95, 3, loc=p.mean(), scale=sps.sem(p))
        got = summary["metrics"][spec]
        assert (got["mean"], got["ci95_low"], got["ci95_high"]) == pytest.approx((p.mean(), low, high), rel=1e-9)
        assert got["n_prompts"] == 4 and got["n_images"] == 8


def test_an_image_depends_only_on_its_prompt_and_seed(runs, tmp_path: Path) -> None:
    # "digit 3" alone with seed 1 is the base run's prompt 1, seed 1, although sampled in another batch
    single = tmp_path / "p.txt"
    single.write_text("digit 3\n")
    out = tmp_path / "one"
    assert _eval("--backbone", "digits", "--prompts", str(single), "--metrics", "digit-ink", "--seed", "1",
                 "--steps", "6", "--out", str(out), "--no-progress") == 0
    a = np.asarray(Image.open(out / "images" / "p0000_s1.png"))
    b = np.asarray(Image.open(runs["base"] / "images" / "p0001_s1.png"))
    assert np.array_equal(a, b)


class _ReportParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[dict] = []
        self.cells: dict[str, str] = {}
        self.summary_metrics: list[str] = []
        self._table: str | None = None
        self._cell = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "tr" and a.get("class") == "score-row":
            self.rows.append({"prompt_index": int(a["data-prompt-index"]), "seed": int(a["data-seed"]), "scores": {}})
        elif tag == "td" and self._table == "scores" and "data-metric" in a:
            self.rows[-1]["scores"][a["data-metric"]] = float(a["data-value"])
        elif tag == "td" and self._table == "summary":
            self._cell += 1

    def handle_data(self, data: str) -> None:
        if self._table == "summary" and self._cell == 1 and data.strip():
            self.summary_metrics.append(data.strip())

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._cell = 0


def _parse(run: Path) -> _ReportParser:
    parser = _ReportParser()
    parser.feed((run / "report.html").read_text())
    return parser


@pytest.mark.parametrize("run", ["base", "short"])
def test_report_shows_every_image_and_every_score(runs, run: str) -> None:
    run_dir = runs[run]
    records, report = _records(run_dir), _parse(runs[run])
    assert report.summary_metrics == METRICS
    assert len(report.images) == len(records) == len(report.rows) == 8
    for src, rec in zip(report.images, records, strict=True):
        png = (run_dir / rec["image"]).read_bytes()
        if run == "short":  # --embed-images: data URIs holding exactly the saved PNG
            assert src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1]) == png
        else:  # relative paths to files that exist
            assert src == rec["image"] and (run_dir / src).is_file()
        Image.open(io.BytesIO(png)).verify()
    for row, rec in zip(report.rows, records, strict=True):
        assert (row["prompt_index"], row["seed"]) == (rec["prompt_index"], rec["seed"])
        assert row["scores"] == rec["scores"]
    sheet = Image.open(run_dir / "contact_sheet.png")
    assert sheet.format == "PNG" and sheet.width > 8 * 100


def test_paired_comparison_matches_scipy(runs, tmp_path: Path, capsys) -> None:
    base, short = runs["base"], runs["short"]
    saved = json.loads((short / "comparison.json").read_text())["metrics"]
    out = tmp_path / "cmp.json"
    assert _eval("--compare", str(short), str(base), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["metrics"] == saved
    a, b = _records(short), _records(base)
    for spec in METRICS:
        mean, low, high, significant = _expected_paired(_per_prompt(a, spec), _per_prompt(b, spec))
        got = saved[spec]
        if not np.isfinite(low):  # zero spread (heldout-correct 1 everywhere): scipy has no interval
            assert got["diff"] == mean and got["ci95_low"] == got["ci95_high"] == mean
            continue
        assert (got["diff"], got["ci95_low"], got["ci95_high"]) == pytest.approx((mean, low, high), rel=1e-9)
        assert got["significant"] == significant and got["n_prompts"] == 4
        assert spec in printed


def _folder_from(records: list[dict], run: Path, folder: Path, transform, source) -> None:
    """A manifest folder whose image for (i, s) is ``transform`` of the run's image for ``source(i, s)``."""
    folder.mkdir()
    by_key = {(r["prompt_index"], r["seed"]): r for r in records}
    lines = []
    for r in records:
        src = by_key[source(r["prompt_index"], r["seed"])]
        img = np.asarray(Image.open(run / src["image"]).convert("RGB"))
        name = f"img_{r['prompt_index']}_{r['seed']}.png"
        Image.fromarray(transform(img)).save(folder / name)
        lines.append(json.dumps({"image": name, "prompt_index": r["prompt_index"], "seed": r["seed"],
                                 "prompt": r["prompt"]}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def test_folder_mode_and_comparisons_known_by_construction(runs, tmp_path: Path) -> None:
    base, prompts = runs["base"], str(runs["prompts"])
    records = _records(base)
    # 1. the run's own images/ folder (p<i>_s<seed>.png) scores exactly as when sampled
    again = tmp_path / "again"
    assert _eval("--images", str(base / "images"), "--prompts", prompts, "--metrics", ",".join(METRICS),
                 "--out", str(again), "--no-progress") == 0
    assert [r["scores"] for r in _records(again)] == [r["scores"] for r in records]
    # 2. inverted images (manifest layout): ink(1 − x) − ink(x) = 1 − 2 ink(x) > 0 for every digit
    inverted = tmp_path / "inverted"
    _folder_from(records, base, inverted, lambda x: 255 - x, lambda i, s: (i, s))
    inv_run = tmp_path / "inv_run"
    assert _eval("--images", str(inverted), "--prompts", prompts, "--metrics", "digit-ink,digit-contrast",
                 "--out", str(inv_run), "--baseline", str(base), "--no-progress") == 0
    cmp = json.loads((inv_run / "comparison.json").read_text())["metrics"]
    ink = np.array([r["scores"]["digit-ink"] for r in records])
    assert ink.max() < 0.5
    assert cmp["digit-ink"]["diff"] == pytest.approx(1 - 2 * ink.mean(), abs=1e-6)
    assert cmp["digit-ink"]["significant"] and cmp["digit-ink"]["ci95_low"] > 0
    # 3. prompts permuted (prompt i shows prompt i+1's image, same seed) on prompt-independent contrast:
    #    the per-prompt differences cancel exactly, so the mean difference is 0 and nothing is significant
    shifted = tmp_path / "shifted"
    _folder_from(records, base, shifted, lambda x: x, lambda i, s: ((i + 1) % 4, s))
    sh_run = tmp_path / "sh_run"
    assert _eval("--images", str(shifted), "--prompts", prompts, "--metrics", "digit-contrast",
                 "--out", str(sh_run), "--baseline", str(base), "--no-progress") == 0
    got = json.loads((sh_run / "comparison.json").read_text())["metrics"]["digit-contrast"]
    assert got["diff"] == pytest.approx(0.0, abs=1e-12)
    assert got["ci95_low"] < 0 < got["ci95_high"] and not got["significant"]


def _bad_cases(runs: dict[str, Path], tmp: Path) -> list[tuple[list[str], str]]:
    prompts = str(runs["prompts"])
    empty = tmp / "empty.txt"
    empty.write_text("\n \n")
    extra = tmp / "extra_images"
    extra.mkdir()
    shutil.copy(runs["base"] / "images" / "p0000_s0.png", extra / "p0009_s0.png")
    badname = tmp / "badname"
    badname.mkdir()
    shutil.copy(runs["base"] / "images" / "p0000_s0.png", badname / "cat.png")
    other = tmp / "other_run"  # the base run with one seed changed: not pairable
    other.mkdir()
    recs = _records(runs["base"])
    recs[3]["seed"] = 7
    (other / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    model = ["--backbone", "digits", "--prompts", prompts, "--no-progress", "--steps", "2"]
    return [
        (["--backbone", "digits", "--prompts", str(tmp / "nope.txt"), "--metrics", "digit-ink"],
         "--prompts: prompts file not found"),
        (["--backbone", "digits", "--prompts", str(empty), "--metrics", "digit-ink"], "holds no prompts"),
        ([*model, "--metrics", "digit-ink,sharpness"], "--metrics: 'sharpness' is not a metric"),
        ([*model, "--metrics", "digit-ink", "--images-per-prompt", "0"], "--images-per-prompt: must be >= 1, got 0"),
        (["--prompts", prompts, "--metrics", "digit-ink"], "give exactly one of --backbone"),
        (["--images", str(extra), "--prompts", prompts, "--metrics", "digit-ink"],
         "has prompt index 9, but the prompts file has 4 prompts"),
        (["--images", str(badname), "--prompts", prompts, "--metrics", "digit-ink"],
         "cat.png is not named p<prompt index>_s<seed>.png"),
        ([*model, "--metrics", "digit-ink", "--baseline", str(other)], "--baseline: the runs have different"),
        ([*model, "--metrics", "digit-ink", "--out", str(runs["base"])], "exists (pass --overwrite"),
        ([*model, "--images-per-prompt", "2", "--metrics", "heldout-logprob", "--baseline", str(runs["base"])],
         "shares no metric with --metrics"),
        (["--compare", str(runs["base"]), str(other)], "--compare: the runs have different prompts/seeds"),
        (["--compare", str(runs["base"]), str(tmp / "missing")], "--compare: not a directory"),
    ]


def test_bad_input_is_one_clear_line_and_writes_nothing(runs, tmp_path: Path, capsys) -> None:
    for args, message in _bad_cases(runs, tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir())
        out = tmp_path / "out"
        argv = args if "--out" in args else [*args, "--out", str(out)]
        if argv[0] == "--compare":
            argv = args
        assert _eval(*argv) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (args, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args  # nothing written, no temp dir left
    assert sorted(p.name for p in runs["root"].iterdir()) == ["base", "prompts.txt", "short"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed (optional check)")
@pytest.mark.parametrize("run", ["base", "short"])
def test_report_in_headless_chromium_loads_every_image_and_sorts(runs, run: str) -> None:
    import re
    import subprocess

    run_dir = runs[run]
    url = (run_dir / "report.html").resolve().as_uri() + "#sort=5-desc"  # column 5: digit-contrast, descending
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert 'data-images-loaded="8"' in dom  # the browser decoded all 8 images (relative files or data URIs)
    row = r'class="score-row" data-prompt-index="(\d+)" data-seed="(\d+)"'
    shown = [(int(i), int(s)) for i, s in re.findall(row, dom)]
    ranked = sorted(_records(run_dir), key=lambda r: -r["scores"]["digit-contrast"])
    assert shown == [(r["prompt_index"], r["seed"]) for r in ranked]


def test_real_rewards_score_a_folder_of_mixed_sizes(tmp_path: Path) -> None:
    """pickscore / clipscore (tiny random CLIP, weights given with --reward-path) on photo-like images."""
    from rewards_tiny import clip_folder, smooth_images

    clip_dir = clip_folder(tmp_path / "clip")
    prompts = ["a red car", "a bowl of fruit", "a lighthouse at dusk"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {0: (64, 48), 1: (48, 64), 2: (64, 64)}  # non-square, portrait and square: scored in size batches
    for i, (h, w) in sizes.items():
        for s in (0, 1):
            img = (smooth_images(1, h, w, seed=10 * i + s)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(img).save(folder / f"p{i:04d}_s{s}.png")
    out = tmp_path / "run"
    assert _eval("--images", str(folder), "--prompts", str(tmp_path / "p.txt"), "--metrics",
                 "pickscore,clipscore,pickscore-0.5*clipscore", "--reward-path", f"pickscore={clip_dir}",
                 "--reward-path", f"clipscore={clip_dir}", "--out", str(out), "--no-progress") == 0
    records = _records(out)
    paths = {"pickscore": clip_dir, "clipscore": clip_dir}
    for spec in ("pickscore", "clipscore", "pickscore-0.5*clipscore"):
        reward = load_reward(spec, paths=paths)
        for i in sizes:  # the two images of a prompt share a size: one batch, as eval forms them
            mine = [r for r in records if r["prompt_index"] == i]
            x = torch.stack([load_image(out / r["image"]) for r in mine]).float() / 255
            direct = reward(x, [r["prompt"] for r in mine]).double()
            torch.testing.assert_close(torch.tensor([r["scores"][spec] for r in mine], dtype=torch.float64), direct)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["pickscore"]["n_prompts"] == 3 and summary["n_images"] == 6


def test_eval_of_a_real_backbone_with_a_real_reward(tiny_sd3_dir, tmp_path: Path, capsys) -> None:
    """The tiny random SD3 pipeline sampled at 32 px and scored with pickscore (tiny random CLIP)."""
    from rewards_tiny import clip_folder

    clip_dir = clip_folder(tmp_path / "clip")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red car\na bowl of fruit\n")
    common = ["--backbone", "sd3", "--backbone-path", str(tiny_sd3_dir), "--resolution", "32", "--steps", "2",
              "--metrics", "pickscore", "--reward-path", f"pickscore={clip_dir}", "--no-progress"]
    out = tmp_path / "run"
    assert _eval(*common, "--prompts", str(prompts), "--images-per-prompt", "2", "--out", str(out)) == 0
    records = _records(out)
    images = torch.stack([load_image(out / r["image"]) for r in records]).float() / 255
    assert images.shape == (4, 3, 32, 32)
    direct = load_reward("pickscore", path=clip_dir)(images, [r["prompt"] for r in records]).double()
    torch.testing.assert_close(torch.tensor([r["scores"]["pickscore"] for r in records], dtype=torch.float64), direct)
    # prompt 1, seed 1 sampled alone (another batch, another prompts file) is the same image, to 1/255
    single = tmp_path / "single.txt"
    single.write_text("a bowl of fruit\n")
    one = tmp_path / "one"
    assert _eval(*common, "--prompts", str(single), "--seed", "1", "--out", str(one)) == 0
    a = np.asarray(Image.open(one / "images" / "p0000_s1.png"), dtype=int)
    b = np.asarray(Image.open(out / "images" / "p0001_s1.png"), dtype=int)
    assert np.abs(a - b).max() <= 1
    # a missing pipeline folder is one line naming --backbone-path, and nothing is written
    capsys.readouterr()
    bad = [*common, "--prompts", str(prompts), "--backbone-path", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]
    assert _eval(*bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowbp eval: error: --backbone-path:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
