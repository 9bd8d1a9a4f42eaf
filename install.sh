#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian/Ubuntu machine: ffmpeg/ffprobe (musdb decodes
# stem mp4 through them) and the Python package with its development extras. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi
python -m pip install -q --disable-pip-version-check -e '.[dev]'
