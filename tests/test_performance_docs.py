"""docs/performance.md's training-throughput and loss tables are what the committed bench JSON files hold."""

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _table(heading: str) -> list[list[str]]:
    """The cells of each table row in docs/performance.md's section ``heading``, the first (header) row left out."""
    section = (DOCS / "performance.md").read_text().split(heading, 1)[1].split("\n### ", 1)[0]
    lines = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")][1:]
    return [list(map(str.strip, line)) for line in lines]


def test_the_pipeline_table_is_the_committed_json():
    checked = 0
    for cells in _table("### Measured: one H100"):
        if cells[0]:  # a run's first row names its JSON
            name = cells[0].split("(`", 1)[1].split("`)", 1)[0]
            report = json.loads((DOCS / "benchmarks" / name).read_text())
            rows = {r["row"]: r for r in report["rows"]}
            assert report["environment"]["device"] == "NVIDIA H100 80GB HBM3" and report["same_batches"], name
            assert report["loss_check"]["passed"], name
        r = rows[cells[1]]
        expected = [f"{r['step_s']:.3f}", f"{r['real_tokens_per_s']:.0f}", f"{r['x_stock']:.3f}",
                    f"{r['padding_share'] * 100:.1f}%", f"{r['mfu'] * 100:.1f}%", f"{r['peak_memory_gib']:.2f}"]
        assert cells[2:] == expected, (name, cells[1])
        checked += 1
    assert checked == 21


def _short(x: float) -> str:
    """A distance as the loss table writes it: three significant digits, 0 as 0."""
    return "0" if x == 0 else f"{x:.2e}".replace("e-0", "e-").replace("e+0", "e")


def test_the_loss_table_is_the_committed_json():
    checked = 0
    for cells in _table("### Packing and the loss curve"):
        name = cells[0].split("(`", 1)[1].split("`)", 1)[0]
        check = json.loads((DOCS / "benchmarks" / name).read_text())["check"]
        worst = check["max"]
        expected = [_short(worst["bf16_noise"]), _short(worst["packing_bf16"]), _short(worst["packing_fp32"]),
                    "within" if check["passed"] else "not within"]
        assert cells[1:] == expected, name
        checked += 1
    assert checked >= 2
