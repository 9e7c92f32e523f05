#!/usr/bin/env bash
# The whole test suite from a bare Debian or Ubuntu, from any folder: `bash tests/run.sh [pytest args...]`.
# 1. the programs the tests start (TOOLS below): apt-get installs the missing ones, with sudo when not root;
#    without apt-get it names the packages to install and stops, before anything else is touched;
# 2. the venv .venv with the package and its test extras;
# 3. the real-ComfyUI tier (tests/real/setup_comfyui.sh: skips itself, with its reason, where it can't);
# 4. pytest, whose exit status is this script's (5, "no tests collected", fails too).
# COMFY_TEST_ASSUME_MISSING="nginx kubectl" takes those programs as missing (tests/test_tools.py uses it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Every program a test looks up (tests/tools.py reads this table; tests/test_tools.py holds every lookup in
# the tests to it). Columns: the program (`a|b`: either will do), the Debian package that installs it.
TOOLS="
redis-server               redis-server    # a redis-server per session; Sentinel is redis-server --sentinel
redis-cli                  redis-tools     # Cluster and Sentinel set-up (tests/test_redis_modes.py)
prometheus                 prometheus      # the dashboards' queries against a real one
promtool                   prometheus      # alert rules and their unit tests
docker-compose             docker-compose  # validates the compose file; no engine (so: no recommends)
chromium|chromium-browser  chromium        # the web frontend, headless
nginx                      nginx           # the ingress tests; Debian puts it in /usr/sbin
kubectl|kustomize          kubectl         # renders deploy/k8s; see the note below
dnsmasq                    dnsmasq         # a DNS server the tests rewrite (webhook receivers' names)
"
# kubectl is not in Debian's own archive as a usable build: Debian 12's kubernetes-client is kubectl 1.20,
# whose kustomize v2 rejects deploy/k8s (`json: unknown field "labels"`). This project's machine image comes
# with kubectl installed; elsewhere add the Kubernetes project's apt repository (or install a standalone
# kustomize): where apt has no `kubectl`, this script says so and stops before installing anything.

# Debian keeps nginx in sbin, off a user's PATH.
TOOL_PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

found() {  # found NAME: the program is there and not taken as missing
  [[ " ${COMFY_TEST_ASSUME_MISSING:-} " != *" $1 "* ]] && PATH="$TOOL_PATH" command -v "$1" >/dev/null 2>&1
}

missing_packages() {  # the packages to install, once each, in table order
  local names package _ name have out=()
  while read -r names package _; do
    [[ -z "$names" || "$names" == \#* ]] && continue
    have=
    for name in ${names//|/ }; do found "$name" && have=1 && break; done
    [[ -n "$have" || " ${out[*]} " == *" $package "* ]] || out+=("$package")
  done <<<"$TOOLS"
  # Not a test's program but this script's: Debian's python3 makes venvs only with python3-venv.
  found python3 || out+=(python3)
  if ! found python3 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then out+=(python3-venv); fi
  echo "${out[*]}"
}

fail() { echo "tests/run.sh: $*" >&2; exit 2; }

read -ra need <<<"$(missing_packages)"
if ((${#need[@]})); then
  command -v apt-get >/dev/null 2>&1 \
    || fail "no apt-get here: install these Debian packages (or this system's own), then run again: ${need[*]}"
  as=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 \
      || fail "not root and no sudo: as root, run: apt-get install -y --no-install-recommends ${need[*]}"
    as=(sudo)
  fi
  echo "tests/run.sh: installing ${need[*]}"
  "${as[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  unknown=()
  for package in "${need[@]}"; do
    apt-cache show "$package" >/dev/null 2>&1 || unknown+=("$package")
  done
  ((${#unknown[@]} == 0)) || fail "not in this machine's apt sources: ${unknown[*]} (see the notes in tests/run.sh)"
  "${as[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  read -ra still <<<"$(missing_packages)"
  ((${#still[@]} == 0)) || fail "still missing after apt-get install: ${still[*]}"
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q -U pip
.venv/bin/python -m pip install -q -e '.[test]'

bash tests/real/setup_comfyui.sh

status=0
.venv/bin/python -m pytest -q "$@" || status=$?
((status != 5)) || echo "tests/run.sh: pytest collected no tests" >&2
exit "$status"
