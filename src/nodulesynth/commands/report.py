"""`nodulesynth report | report-pdf`: the commands of rules/report.smk."""

import logging

from nodulesynth.commands import json_section

log = logging.getLogger("nodulesynth")


def cmd_report(args):
    from nodulesynth.report import build_report

    build_report(args.results, args.config, args.html)
    log.info("report: %s", args.html)


def report_parser(sub):
    p = sub.add_parser("report", help="the study as one self-contained HTML page")
    p.add_argument("--results", default="results", help="the workflow's results folder")
    p.add_argument("--config", type=json_section, required=True, help="the config as run, as JSON")
    p.add_argument("--html", required=True)
    p.set_defaults(func=cmd_report)


def cmd_report_pdf(args):
    from nodulesynth.report.pdf import html_to_pdf

    html_to_pdf(args.html, args.pdf, args.chromium)
    log.info("report-pdf: %s", args.pdf)


def report_pdf_parser(sub):
    p = sub.add_parser("report-pdf", help="the HTML report printed to PDF by headless Chromium")
    p.add_argument("--html", required=True)
    p.add_argument("--pdf", required=True)
    p.add_argument("--chromium", default=None, help="the Chromium executable (default: found on PATH)")
    p.set_defaults(func=cmd_report_pdf)


# in the order the rules run; nodulesynth.cli registers them
PARSERS = (report_parser, report_pdf_parser)
