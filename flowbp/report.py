"""What a person looks at after ``flowbp eval``: a contact sheet PNG and a self-contained ``report.html``.

Both read the images the run wrote (``RUN/images/…``). The report has no external resource: its style
and its table-sorting script are inline; images are referenced relative to the run directory (open
``RUN/report.html`` in place) or, with ``embed_images``, embedded as base64 data URIs (one portable file).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CELL = 160  # contact-sheet image side in pixels


def _fmt(value: float | None) -> str:
    if value is None:  # a missing score (a judge's answer without a parsable score)
        return "missing"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def contact_sheet(
    run_dir: Path,
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    path: Path,
    max_images: int = 64,
    columns: int = 8,
) -> Path:
    """A grid of the first ``max_images`` images, each captioned with its prompt, seed and scores."""
    from PIL import Image, ImageDraw, ImageFont

    shown = list(records[:max_images])
    font = ImageFont.load_default()
    line_h = 12
    caption_lines = 2 + len(metrics)
    cols = min(columns, len(shown))
    rows = -(-len(shown) // cols)
    cell_h = CELL + 6 + caption_lines * line_h
    sheet = Image.new("RGB", (cols * (CELL + 8) + 8, rows * (cell_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    max_chars = CELL // 6
    for k, rec in enumerate(shown):
        r, c = divmod(k, cols)
        x0, y0 = 8 + c * (CELL + 8), 8 + r * (cell_h + 8)
        with Image.open(run_dir / rec["image"]) as im:
            im = im.convert("RGB")
            # small images (the 16×16 digits) are enlarged with visible pixels, large ones reduced smoothly
            resample = Image.Resampling.NEAREST if max(im.size) <= CELL // 2 else Image.Resampling.LANCZOS
            scale = CELL / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
            sheet.paste(im, (x0 + (CELL - im.width) // 2, y0 + (CELL - im.height) // 2))
        lines = [f"p{rec['prompt_index']} s{rec['seed']}", rec["prompt"][:max_chars]]
        lines += [f"{m[:max_chars - 9]} = {_fmt(rec['scores'][m])}" for m in metrics]
        for n, text in enumerate(lines):
            draw.text((x0, y0 + CELL + 4 + n * line_h), text, fill="black", font=font)
    sheet.save(path)
    return path


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td.text, th.text { text-align: left; }
#scores th { cursor: pointer; background: #f3f3f3; user-select: none; }
#scores th.asc::after { content: " \\25B2"; } #scores th.desc::after { content: " \\25BC"; }
img.thumb { width: 128px; height: auto; image-rendering: pixelated; display: block; }
.sig { font-weight: bold; color: #0a6b0a; } .ns { color: #777; }
"""

# Click a header to sort by that column (numbers by value); click again to reverse.
_SCRIPT = r"""
document.querySelectorAll('#scores th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = document.querySelector('#scores tbody');
    var asc = !th.classList.contains('asc');
    document.querySelectorAll('#scores th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
    th.classList.add(asc ? 'asc' : 'desc');
    var num = th.dataset.type === 'num';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
      var d = num ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return asc ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    history.replaceState(null, '', '#sort=' + col + (asc ? '' : '-desc'));
  });
});
// A link to a sorted view: report.html#sort=4 (column 4 ascending) or #sort=4-desc.
var wanted = /^#sort=(\d+)(-desc)?$/.exec(location.hash);
if (wanted) {
  var th = document.querySelectorAll('#scores th')[parseInt(wanted[1], 10)];
  if (th) { th.click(); if (wanted[2]) { th.click(); } }
}
// How many images the browser could show (read by the headless-browser test and visible in the page).
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('#scores img');
  var ok = Array.prototype.filter.call(imgs, function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = ok;
  document.getElementById('loaded').textContent = ok + ' of ' + imgs.length + ' images loaded.';
});
"""


def _value(score: float | None) -> str:
    # what the sorting script reads: a missing score sorts as NaN (parseFloat)
    return "NaN" if score is None else repr(score)


def _answer_title(rec: Mapping[str, Any], metric: str) -> str:
    """A judge's raw answer as the cell's tooltip: the reader sees why a score is what it is (or missing)."""
    text = (rec.get("answers") or {}).get(metric)
    return f' title="{html.escape(text, quote=True)}"' if text else ""


def _image_src(run_dir: Path, rel: str, embed: bool) -> str:
    if not embed:
        return html.escape(rel, quote=True)
    data = base64.b64encode((run_dir / rel).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def _summary_table(summary: Mapping[str, Any]) -> list[str]:
    out = ['<table id="summary"><tr><th class="text">metric</th><th>mean</th><th>95% CI</th>'
           "<th>prompts</th><th>images</th><th>missing</th></tr>"]
    for name, s in summary["metrics"].items():
        out.append(
            f'<tr><td class="text">{html.escape(name)}</td><td>{_fmt(s["mean"])}</td>'
            f"<td>[{_fmt(s['ci95_low'])}, {_fmt(s['ci95_high'])}]</td><td>{s['n_prompts']}</td>"
            f"<td>{s['n_images']}</td><td>{s.get('n_missing', 0)}</td></tr>"
        )
    out.append("</table>")
    return out


def _comparison_table(comparison: Mapping[str, Any]) -> list[str]:
    out = [
        f"<h2>Paired comparison: this run (A) − {html.escape(str(comparison['b']))} (B)</h2>",
        f"<p>{html.escape(comparison['pairing'])}. Significant: the interval excludes 0.</p>",
        '<table id="comparison"><tr><th class="text">metric</th><th>mean A</th><th>mean B</th><th>A − B</th>'
        "<th>95% CI</th><th>prompts</th><th class=\"text\">significant</th></tr>",
    ]
    for name, c in comparison["metrics"].items():
        sig = '<span class="sig">yes</span>' if c["significant"] else '<span class="ns">no</span>'
        out.append(
            f'<tr><td class="text">{html.escape(name)}</td><td>{_fmt(c["mean_a"])}</td><td>{_fmt(c["mean_b"])}</td>'
            f"<td>{_fmt(c['diff'])}</td><td>[{_fmt(c['ci95_low'])}, {_fmt(c['ci95_high'])}]</td>"
            f'<td>{c["n_prompts"]}</td><td class="text">{sig}</td></tr>'
        )
    out.append("</table>")
    return out


def write_report(
    run_dir: Path,
    summary: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    comparison: Mapping[str, Any] | None = None,
    embed_images: bool = False,
) -> Path:
    """``run_dir/report.html``: run settings, summary with CIs, the comparison, a sortable per-image table."""
    info = {k: v for k, v in summary.items() if k not in {"metrics"}}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>flowbp eval report</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>flowbp eval</h1>",
        '<table id="info">',
        *(
            f'<tr><th class="text">{html.escape(str(k))}</th><td class="text">{html.escape(str(v))}</td></tr>'
            for k, v in info.items()
        ),
        "</table>",
        "<h2>Summary</h2>",
        *_summary_table(summary),
    ]
    if comparison is not None:
        parts += _comparison_table(comparison)
    parts += [
        f'<h2>Images ({len(records)})</h2><p>Click a column header to sort. <span id="loaded"></span></p>',
        '<table id="scores"><thead><tr><th class="text" data-type="text">image</th>'
        '<th data-type="num">prompt index</th><th class="text" data-type="text">prompt</th>'
        '<th data-type="num">seed</th>',
        *(f'<th data-type="num" data-metric="{html.escape(m, quote=True)}">{html.escape(m)}</th>' for m in metrics),
        "</tr></thead><tbody>",
    ]
    for rec in records:
        alt = html.escape(f"{rec['prompt']} (seed {rec['seed']})", quote=True)
        cells = [
            f'<td class="text" data-value="{html.escape(rec["image"], quote=True)}">'
            f'<img class="thumb" src="{_image_src(run_dir, rec["image"], embed_images)}" alt="{alt}"></td>',
            f'<td data-value="{rec["prompt_index"]}">{rec["prompt_index"]}</td>',
            f'<td class="text" data-value="{html.escape(rec["prompt"], quote=True)}">{html.escape(rec["prompt"])}</td>',
            f'<td data-value="{rec["seed"]}">{rec["seed"]}</td>',
        ]
        cells += [
            f'<td data-metric="{html.escape(m, quote=True)}" data-value="{_value(rec["scores"][m])}"'
            f"{_answer_title(rec, m)}>{_fmt(rec['scores'][m])}</td>"
            for m in metrics
        ]
        parts.append(
            f'<tr class="score-row" data-prompt-index="{rec["prompt_index"]}" data-seed="{rec["seed"]}">'
            + "".join(cells)
            + "</tr>"
        )
    parts += ["</tbody></table>", f"<script>{_SCRIPT}</script>", "</body></html>"]
    path = run_dir / "report.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
