"""bench/run.py keeps each kind of run to its own part of bench/RESULTS.md (S5 is written alone)."""

from __future__ import annotations

from pathlib import Path

from bench.run import S5_BEGIN, S5_END, _s5_section, replace_s5_section


def test_s5_section_is_appended_then_replaced_in_place(tmp_path: Path) -> None:
    first = f"{S5_BEGIN}\nS5 figures, first run\n{S5_END}"
    second = f"{S5_BEGIN}\nS5 figures, second run\n{S5_END}"
    text = replace_s5_section("# results\n\n| S1 | 1 |\n", first)
    assert text == f"# results\n\n| S1 | 1 |\n\n{first}\n"

    again = replace_s5_section(text + "trailing notes\n", second)
    assert again == f"# results\n\n| S1 | 1 |\n\n{second}\ntrailing notes\n"

    path = tmp_path / "RESULTS.md"
    path.write_text(again)
    assert _s5_section(path) == second


def test_a_results_file_without_s5_has_no_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    assert _s5_section(path) == ""
    path.write_text("# results\n")
    assert _s5_section(path) == ""
