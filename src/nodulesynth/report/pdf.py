"""The report's PDF: the same HTML printed by headless Chromium (`--print-to-pdf`).

Chromium rather than WeasyPrint: it is the engine the report is tested in, so the PDF shows what a reader's
browser shows (CSS, fonts, base64 images alike), and one Debian package serves both the browser test and the
print; WeasyPrint has its own partial CSS engine and needs Pango and its own Python stack.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")
ENV_VAR = "NODULESYNTH_CHROMIUM"


def find_chromium(explicit=None) -> str:
    """The Chromium executable: `explicit` (config report.chromium), else $NODULESYNTH_CHROMIUM, else the first
    of CANDIDATES on PATH. Raises FileNotFoundError saying how to get one."""
    for given, where in ((explicit, "report.chromium"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if given:
            found = shutil.which(str(given))
            if not found:
                raise FileNotFoundError(f"{where} = {given!r}: no such executable (needed to print the report to PDF)")
            return found
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "no Chromium found to print the report to PDF (looked for " + ", ".join(CANDIDATES) + " on PATH): install "
        f"Debian's `chromium` package (apt-get install chromium), or set report.chromium or ${ENV_VAR} to its path")


# The one command that gives a Debian/Ubuntu machine what prints the PDF; `make setup` and the warning name it.
APT_COMMAND = "apt-get install chromium"


def pdf_wanted(setting="auto", chromium=None, in_containers=False) -> tuple[bool, str | None]:
    """Whether the workflow prints the report to PDF (config report.pdf), and the warning to log when it does not.

    The HTML report is the result and the PDF a second form of it, so `auto` (the default) prints it where a
    Chromium is found, or where the rules run in containers (the report image carries one), and otherwise
    returns a warning that says how to get it. `True` makes a missing Chromium an error (FileNotFoundError naming
    the fix) and `False` never prints. A `chromium` path given explicitly must exist whatever the setting but
    `False`: the user asked for that executable.
    """
    if not (setting == "auto" or isinstance(setting, bool)):
        raise InputError(f"report.pdf = {setting!r}: expected one of auto, true, false")
    if setting is False:
        return False, None
    if in_containers and not chromium:
        return True, None
    try:
        find_chromium(chromium)
    except FileNotFoundError as missing:
        if setting is True or chromium:
            raise FileNotFoundError(f"report.pdf = {setting}: {missing}") from None
        return False, (f"report.pdf = auto and no Chromium found (looked for {', '.join(CANDIDATES)} on PATH): "
                       f"writing results/report/report.html only. For the PDF too: {APT_COMMAND} (or set "
                       f"report.chromium / ${ENV_VAR}), or run with --use-singularity, then run again.")
    return True, None


def chromium_command(chromium, html_path, pdf_path, profile_dir) -> list:
    return [
        str(chromium), "--headless", "--no-sandbox",  # no sandbox: runs as root in containers and CI
        "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={profile_dir}",  # a fresh profile: parallel jobs never share a lock
        "--no-pdf-header-footer", "--print-to-pdf-no-header",  # the current and the older flag name
        "--run-all-compositor-stages-before-draw", "--virtual-time-budget=10000",
        f"--print-to-pdf={pdf_path}", Path(html_path).resolve().as_uri(),
    ]


def html_to_pdf(html_path, pdf_path, chromium=None, timeout=180) -> None:
    """Print `html_path` to `pdf_path` (atomically) with headless Chromium."""
    html_path = Path(html_path)
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path}: no HTML to print")
    chromium = find_chromium(chromium)
    with atomic_path(pdf_path) as tmp, tempfile.TemporaryDirectory(prefix="nodulesynth-chromium-") as profile:
        # HOME too: Chromium writes caches there, which may be read-only inside a container
        env = dict(os.environ, HOME=profile)
        try:
            proc = subprocess.run(chromium_command(chromium, html_path, Path(tmp).resolve(), profile),
                                  capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{chromium} did not print {html_path} within {timeout} s") from None
        if proc.returncode != 0 or not Path(tmp).is_file() or Path(tmp).stat().st_size == 0:
            raise RuntimeError(f"{chromium} failed to print {html_path} to PDF (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
