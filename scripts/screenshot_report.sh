#!/usr/bin/env bash
# Renders an experiment report (report.html) in real headless Chromium and saves a PNG, so a
# person can check that the page opens and its plots are readable.
#   bash scripts/screenshot_report.sh runs/demo/report.html [out.png]
# PASER_SCREENSHOT_SIZE=W,H sets the window (default 1400,2400; e.g. 1400,5200 for the whole page).
# Needs Debian's chromium (apt-get install chromium); installs it when missing and root.
set -euo pipefail
report="$(realpath "${1:-runs/demo/report.html}")"
out="$(realpath -m "${2:-${report%.html}.png}")"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; else
    echo "chromium is not installed: apt-get install chromium" >&2; exit 1; fi
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
# The flags keep Chromium off the network (this machine has none) and out of the user's profile.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size=${PASER_SCREENSHOT_SIZE:-1400,2400} \
  --screenshot="$out" "file://$report" >/dev/null 2>&1
test -s "$out"
echo "$out"
