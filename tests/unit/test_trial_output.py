"""What an upgrade's refused trial shows of `fleet-ingress check` in its few lines
(config.check_report.shortened): the problems before the warnings, and of
many problems the first (often the cause of the rest) with the summary."""

from __future__ import annotations

from pathlib import Path

from fleet_ingress.config.check_report import WARNING, shortened


def test_of_many_problems_the_first_and_the_summary_are_shown() -> None:
    problems = [f"PROBLEM {n}: listen.wss ..." for n in range(1, 13)]
    lines = [*problems, "12 problem(s): not started", f"{WARNING}a warning"]
    shown = shortened(lines, 8, Path("/etc/fleet-ingress/ingress.toml")).splitlines()
    assert shown[:7] == problems[:7]
    assert shown[7] == "12 problem(s): not started"
    assert shown[8].startswith("(and 6 more line(s): `fleet-ingress check -c /etc/")


def test_warnings_fill_the_room_the_problems_leave() -> None:
    lines = ["PROBLEM 1: tls.cert ...", "1 problem(s)"] + [f"{WARNING}w{n}" for n in range(10)]
    shown = shortened(lines, 8, Path("c.toml")).splitlines()
    assert shown[:2] == lines[:2]
    assert shown[2:8] == [f"{WARNING}w{n}" for n in range(6)]
    assert "4 more line(s)" in shown[8]
