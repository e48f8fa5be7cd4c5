#!/usr/bin/env bash
# The optional system packages and what each gives; none is needed for the study itself (report.html).
#   chromium        the report's PDF (report.pdf: auto prints it where one is found) and the browser test
#   chromium-driver the browser test of the report (Selenium)
#   poppler-utils   the test that reads the PDF's pages (pdftoppm)
#   slurm-wlm munge the test that runs the workflow on a real one-node SLURM cluster
# Without arguments: say which are missing and print the one command that installs them.
# --install: install them with apt-get (as root; what `make system-packages` and CI run).
set -euo pipefail
need=()
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v pdftoppm >/dev/null || need+=(poppler-utils)
# Daemons install in /usr/sbin, which a non-root user's PATH often lacks.
daemon() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
daemon slurmctld || need+=(slurm-wlm)
daemon munged || need+=(munge)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "${1:-}" = "--install" ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-packages: installing needs root and apt-get; run: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
else
  echo "system-packages: optional, missing: ${need[*]} (without them there is no report.pdf and the browser," \
    "PDF and SLURM tests skip). To install: sudo apt-get install -y ${need[*]} (or: make system-packages)"
fi
