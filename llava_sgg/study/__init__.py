"""Studies: a grid of runs, resumable (:mod:`.runner`), and their report with seed statistics (:mod:`.report`)."""

from .report import baseline_of, compare, load_study, write_report
from .runner import Plan, PlanError, load_plan, run_study

__all__ = ["Plan", "PlanError", "baseline_of", "compare", "load_plan", "load_study", "run_study", "write_report"]
