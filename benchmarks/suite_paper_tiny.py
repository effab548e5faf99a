"""The example ``flowbp eval --suite paper`` table of docs/unifiedreward.md, on tiny random models.

Nothing here is a real measurement: a tiny random SD3 pipeline (tests/tiny_pipelines.py) sampled at 32 px,
PickScore from a tiny random CLIP (tests/rewards_tiny.py), and the UnifiedReward judges answered by the
tests' stand-in chat-completions server (tests/judge_server.py) with 1 + 4 × the image's mean pixel value.
HPSv2.1 and ImageReward have no weights here, so the suite skips them. It shows the table's shape only.

    python benchmarks/suite_paper_tiny.py [WORKDIR]
"""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from judge_server import FakeJudgeServer  # noqa: E402
from rewards_tiny import clip_folder  # noqa: E402
from tiny_pipelines import build_tiny_sd3  # noqa: E402

from flowbp.cli import main  # noqa: E402


def run(root: Path) -> int:
    os.environ["FLOWBP_REWARD_DIR"] = str(root / "no-weights")  # hpsv2, imagereward: nowhere to be found
    os.environ.pop("FLOWBP_JUDGE_URL", None)
    build_tiny_sd3(root / "sd3")
    clip = clip_folder(root / "clip")
    prompts = (ROOT / "flowbp/assets/prompts/hpdv2_test_400.txt").read_text().splitlines()[:8]
    (root / "p.txt").write_text("\n".join(prompts) + "\n")
    with FakeJudgeServer("UnifiedReward-test", by_brightness=True) as server:
        common = ["eval", "--suite", "paper", "--backbone", "sd3", "--model", str(root / "sd3"), "--prompts",
                  str(root / "p.txt"), "--resolution", "32", "--reward-path", f"pickscore={clip}", "--judge-url",
                  server.url, "--judge-model", "UnifiedReward-test", "--no-progress", "--overwrite"]
        code = main([*common, "--steps", "2", "--out", str(root / "base")])
        baseline = ["--baseline", str(root / "base")]
        return code or main([*common, "--steps", "6", "--out", str(root / "six-steps"), *baseline])


if __name__ == "__main__":
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="suite-paper-tiny-"))
    sys.exit(run(workdir))
