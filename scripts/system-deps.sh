#!/usr/bin/env bash
# System packages, installed from Debian's packages when missing (needs root or passwordless
# sudo). `system-deps.sh build`: what installing the project needs, a C compiler and the
# Python headers (the template scanner is a small Cython extension compiled on install).
# `system-deps.sh`: what the tests need besides, Redis (shared gateway state) and a JRE (Spark
# in local mode).
set -euo pipefail
PYTHON=${PYTHON:-python3}
need=()
command -v cc >/dev/null 2>&1 || need+=(gcc)
"$PYTHON" -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
  2>/dev/null || need+=(python3-dev)
if [ "${1:-}" != build ]; then
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
fi
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
