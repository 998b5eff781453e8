"""docs/evidence.md and its full reports agree with the committed run records they were made from."""

from pathlib import Path

import numpy as np
import pytest

from llava_sgg.study.report import load_study, write_report

DOCS = Path(__file__).resolve().parent.parent / "docs"
METRICS = ["POPE F1", "GQA acc", "MMBench circular", "MMBench 1-round", "MME perception /400"]
OPTIMIZERS = {"AdamW": "adamw", "Adafactor": "adafactor", "LAMB": "lamb"}
RULES = {"none": "none", "mda": "mda", "mean_ratio": "mean_ratio", "decay only (control)": "decay_only"}


@pytest.mark.parametrize("study", [pytest.param("demo", marks=pytest.mark.slow), "lm"])  # demo: its many plots
def test_the_committed_report_is_what_report_writes_from_the_records(study, tmp_path):
    written = write_report(DOCS / "evidence" / study, tmp_path / "report.md").read_text()
    assert written == (DOCS / "evidence" / study / "report.md").read_text()


def seed_values(records, values: dict, metric: str) -> list[float]:
    return [r["result"]["metrics"][metric] for r in records
            if r["status"] == "finished" and all(r["values"][k] == v for k, v in values.items())]


def mean_std(values: list[float], digits: int) -> str:
    assert len(values) == 3  # every variant in the tables ran seeds 0, 1 and 2
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_the_tables_of_evidence_md_are_the_records_means():
    text = (DOCS / "evidence.md").read_text()
    _, demo = load_study(DOCS / "evidence" / "demo")
    checked = 0
    for row in table_rows(text, "## Table 8 on the demo"):
        if row[0] not in OPTIMIZERS:
            continue  # the baselines' row
        values = {"mode": "full", "optimizer": OPTIMIZERS[row[0]], "sgg": RULES[row[1]], "lr_scale": 1}
        for metric, cell in zip(METRICS, row[2:]):
            assert cell.startswith(mean_std(seed_values(demo, values, metric), 1)), (row[:2], metric, cell)
            checked += 1
    for row in table_rows(text, "## LoRA on the demo"):
        values = {"mode": "lora", "optimizer": OPTIMIZERS[row[0]], "sgg": RULES[row[1]], "lr_scale": 1}
        for metric, cell in zip(METRICS, row[2:]):
            assert cell.startswith(mean_std(seed_values(demo, values, metric), 1)), (row[:2], metric, cell)
            checked += 1
    for row in table_rows(text, "## Figure 5 on the demo"):
        values = {"mode": "full", "optimizer": "adamw", "sgg": row[0], "lr_scale": int(row[1].lstrip("×"))}
        for metric, cell in zip(METRICS, row[2:]):
            assert cell.startswith(mean_std(seed_values(demo, values, metric), 1)), (row[:2], metric, cell)
            checked += 1
    _, lm = load_study(DOCS / "evidence" / "lm")
    names = {"AdamW": "none", "AdamW+SGG, mda": "mda", "AdamW+SGG, mean_ratio": "mean_ratio"}
    for row in table_rows(text, "## Table 1 in small"):
        for metric, digits, cell in zip(["val_ppl", "val_loss", "final_train_loss"], [2, 3, 3], row[1:]):
            assert cell.startswith(mean_std(seed_values(lm, {"sgg": names[row[0]]}, metric), digits)), (row, cell)
            checked += 1
    assert checked == 10 * 5 + 3 * 5 + 7 * 5 + 3 * 3
