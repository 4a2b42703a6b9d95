"""The Markdown/HTML report writer: tables, figures linked in Markdown and inlined in HTML."""

import base64
import re

import numpy as np
import pytest

from jaxalign import report


def test_markdown_table_formats_cells_and_checks_widths():
    text = report.markdown_table(["name", "value"], [["a|b", 0.123456789], ["nan", float("nan")]])
    lines = text.splitlines()
    assert lines[0] == "| name | value |"
    assert lines[2] == "| a\\|b | 0.1235 |"
    assert lines[3] == "| nan | – |"
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 headers"):
        report.markdown_table(["a", "b"], [[1]])


def test_report_writes_markdown_and_self_contained_html(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots()
    ax.plot(np.arange(5), np.arange(5) ** 2)
    png = report.save_figure(fig, tmp_path / "figs" / "square.png")
    assert Image.open(png).size[0] > 100

    rep = report.Report("Title <x>").section("Numbers").text("Some *text*.")
    rep.table(["k", "v"], [["x", 1.5]]).figure(png, "squares")
    md_path, html_path = rep.write(tmp_path)
    md = md_path.read_text()
    assert md.startswith("# Title <x>\n") and "## Numbers" in md and "| x | 1.5 |" in md
    assert "![squares](figs/square.png)" in md
    page = html_path.read_text()
    assert "<h1>Title &lt;x&gt;</h1>" in page and "<td>1.5</td>" in page and "<em>text</em>" in page
    data = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(data) == png.read_bytes()
