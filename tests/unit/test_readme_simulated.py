"""The README's simulated-device table is the committed reports' figures, not hand-copied
numbers that can drift from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
HEADER = "| simulated device | 32-item requests: tokens/s |"
REPORTS = {
    "32": "docs/bench-cpu-2026-12-07-simulated-32.json",
    "8": "docs/bench-cpu-2026-12-07-simulated.json",
    "off": "docs/bench-cpu-2026-12-07-simulated-32-in-process.json",
}
RATES = {"100k": "100000", "300k": "300000", "1M": "1e+06", "3M": "3e+06"}


def table() -> list[list[str]]:
    lines = README.split(HEADER)[1].split("\n\n")[0].strip().splitlines()[2:]
    rows = [line.strip().strip("|").split("|") for line in lines]
    return [[cell.strip().strip("*") for cell in row] for row in rows]


def mixed(report: str, rate: str) -> dict[str, float]:
    data = json.loads((ROOT / REPORTS[report]).read_text())["simulated_device"]
    entry = data["rates"][rate]["mixed"]
    return {"tokens_per_s": entry["service"]["tokens_per_s"], "ratio": entry["ratio_to_device"]}


def test_the_reports_are_labelled_with_their_engine_mode() -> None:
    for report, mode in (("32", "on"), ("8", "on"), ("off", "off")):
        data = json.loads((ROOT / REPORTS[report]).read_text())["simulated_device"]
        assert data["engine_process"] == mode
        assert "SIMULATED" in data["label"]


@pytest.mark.parametrize("row", range(4))
def test_each_row_is_the_reports_figures(row: int) -> None:
    cells = table()[row]
    rate = RATES[cells[0].split()[0]]
    for report, (tokens, ratio) in (("32", (1, 2)), ("8", (3, 4))):
        got = mixed(report, rate)
        assert int(cells[tokens].replace(",", "")) == round(got["tokens_per_s"]), cells
        assert float(cells[ratio]) == round(got["ratio"], 2), cells
    assert float(cells[5]) == round(mixed("off", rate)["ratio"], 2), cells
