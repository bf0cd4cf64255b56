#!/usr/bin/env bash
# Install the Debian packages given as arguments when they are not installed (`make system-deps` calls this with
# the demo data's packages). Works as root, as a user with sudo; otherwise, or without apt-get, it prints one line
# naming the packages and the command to run, and exits 1. A failed apt-get is reported with its own last line.
set -u

hint="README.md, section 'Two commands', says what to do on a machine without apt-get"

fail() {
  echo "ERROR: $1" >&2
  exit 1
}

# The last non-empty line of $1 (apt-get's and sudo's errors come last).
last_line() {
  local line last=""
  while IFS= read -r line; do
    [[ -n "${line//[[:space:]]/}" ]] && last=$line
  done <<<"$1"
  printf '%s' "${last:-(no output)}"
}

# The arguments that are not installed, one a line. "Installed" means dpkg's status "install ok installed": a
# removed-but-not-purged package keeps a status ("deinstall ok config-files"), and `dpkg -s` succeeds for it on
# some versions. One dpkg-query for all (it prints known packages in its own order, unknown ones to stderr).
not_installed() {
  local -A ok=()
  local name status p
  while read -r name status; do
    [[ "$status" == "install ok installed" ]] && ok[$name]=1
  done < <(dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null)
  for p in "$@"; do
    [[ -n "${ok[$p]-}" ]] || printf '%s\n' "$p"
  done
}

mapfile -t missing < <(not_installed "$@")
((${#missing[@]})) || exit 0
pkgs="${missing[*]}"
by_hand="apt-get update && apt-get install -y --no-install-recommends $pkgs"

command -v apt-get >/dev/null ||
  fail "the demo data needs the Debian packages $pkgs, and apt-get was not found; $hint"

export DEBIAN_FRONTEND=noninteractive
if [[ "$(id -u)" == 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null; then
  as_root=(sudo DEBIAN_FRONTEND=noninteractive)  # sudo resets the environment: pass the variable through it
else
  fail "the demo data needs the Debian packages $pkgs; not root and sudo was not found: run as root: $by_hand"
fi

echo "Installing Debian packages for the demo data: $pkgs"
out=$("${as_root[@]}" apt-get update -qq 2>&1) ||
  fail "'${as_root[*]:+sudo }apt-get update' failed: $(last_line "$out") — to install by hand, as root: $by_hand"
out=$("${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1) ||
  fail "'${as_root[*]:+sudo }apt-get install $pkgs' failed: $(last_line "$out") — to install by hand, as root: $by_hand"

mapfile -t still < <(not_installed "${missing[@]}")
((${#still[@]} == 0)) ||
  fail "apt-get install exited 0 but ${still[*]} is not installed (dpkg-query status); as root: $by_hand"
