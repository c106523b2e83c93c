#!/usr/bin/env bash
# The system packages the tests need, on Debian or Ubuntu: Verilator and a C++ toolchain for the
# RTL co-simulation (tests/test_rtl.py), Yosys for its synthesis.  Installs only what is missing,
# with sudo unless already root.
set -euo pipefail
need=()
command -v verilator >/dev/null || need+=(verilator)
command -v yosys >/dev/null || need+=(yosys)
command -v g++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
  as_root=(sudo)
fi
echo "installing ${need[*]} (apt-get)" >&2
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
