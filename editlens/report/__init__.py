"""Reports from the results store: tables (Markdown / CSV), PNG plots and a self-contained HTML page.

``write_html(store_or_df, "report.html")``, ``write_report(store_or_df, "out/")`` or
``build_report(...)`` for the tables and figures themselves. See ``docs/experiments.md``.
"""
from editlens.report.html import Report, ReportFigure, ReportTable, build_report, write_html, write_report
from editlens.report.tables import (methods_table, metric_group, rank_stability_table, results_frame,
                                    sensitivity_table, summarize, to_markdown, write_table)

__all__ = ["Report", "ReportFigure", "ReportTable", "build_report", "methods_table", "metric_group",
           "rank_stability_table", "results_frame", "sensitivity_table", "summarize", "to_markdown",
           "write_html", "write_report", "write_table"]
