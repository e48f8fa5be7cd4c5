"""The study's report: figures (figures.py), the self-contained HTML (html.py, Jinja2 template in templates/),
its PDF print (pdf.py), and the reading of the results tree behind them (inputs.py)."""

from nodulesynth.report.html import build_report

__all__ = ["build_report"]
