"""report.html: report.md rendered by markdown-it with plots embedded as data URIs; figures drawn with
matplotlib's object API (no pyplot state, no backend switch)."""

from __future__ import annotations

import base64
import sys

from stardomain.report.study import _md_to_html, plot_curves

MD = """# Title

**Verdict: 0.21× lower, p < 0.05 & train_loss kept**

| pair kind | mean |
|---|---|
| star – held-out | **0.0230** |
| regular – regular | 0.1100 |

![curves](plots/curves.png)

![missing](plots/other.png)
"""
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))


def test_html_renders_table_bold_and_embedded_image():
    html = _md_to_html(MD, {"curves": PNG}, {"curves": "plots/curves.png"})
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<h1>Title</h1>" in html
    first_p = html.split("<p>")[1].split("</p>")[0]
    assert first_p == "<strong>Verdict: 0.21× lower, p &lt; 0.05 &amp; train_loss kept</strong>"
    table = html.split("<table>")[1].split("</table>")[0]
    assert "<th>pair kind</th>" in table and "<th>mean</th>" in table
    assert "<td>star – held-out</td>" in table and "<td><strong>0.0230</strong></td>" in table
    assert table.count("<tr>") == 3
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert f'<img src="{uri}" alt="curves" />' in html
    assert html.count("data:image/png") == 1 and 'src="plots/other.png"' in html  # only known plots inlined


def test_raw_html_in_the_markdown_is_escaped():
    html = _md_to_html("a <script>x</script> b\n", {}, {})
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_figures_leave_pyplot_alone():
    t = [0.0, 0.5, 1.0]
    rec = {"t": t, "train": {"loss": [0.1, 0.3, 0.1]}, "test": {"loss": [0.2, 0.4, 0.2]}}
    png = plot_curves({"pairs": {"star_heldout": [rec, rec]}})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
