#!/usr/bin/env bash
# One entry point for a fresh Debian machine with Python 3.11 and nothing else:
# installs the system packages, the virtual environment and the project, then
# runs the embedded demo (`run`) or the test suite (`test`). Safe to re-run:
# every step skips itself when already done.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
venv="$here/.venv"
python=${PYTHON:-python3}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

system_packages() {
    # fuse3 gives fusermount3; libfuse3-dev + pkg-config + a compiler build pyfuse3.
    # chromium + chromium-driver: the restore web page's headless browser test.
    local want=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv chromium chromium-driver)
    local missing=()
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    # A pyenv or custom Python brings its own headers and venv: only ask apt for
    # python3-dev/python3-venv when this interpreter lacks them.
    if "$python" -c 'import sysconfig,os,sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")) else 1)'; then
        missing=("${missing[@]/python3-dev}")
    fi
    if "$python" -m venv --help >/dev/null 2>&1 && "$python" -c 'import ensurepip' 2>/dev/null; then
        missing=("${missing[@]/python3-venv}")
    fi
    local need=()
    for p in "${missing[@]}"; do [ -n "$p" ] && need+=("$p"); done
    if [ ${#need[@]} -gt 0 ]; then
        log "installing system packages: ${need[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}

test_tools() {
    # docker-compose checks docker/compose.yaml (`config` needs no Docker engine); tests only.
    # Its test is skipped, not failed, when this cannot be installed.
    if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
        log "installing docker-compose (validates docker/compose.yaml)"
        { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
          as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
              --no-install-recommends docker-compose >/dev/null; } ||
            log "docker-compose could not be installed; the compose test will be skipped"
    fi
}

python_env() {
    if [ ! -x "$venv/bin/python" ]; then
        log "creating virtual environment in .venv"
        "$python" -m venv "$venv"
    fi
    # Reinstall only when the dependency list changed.
    local stamp="$venv/.vaultsync-installed"
    local digest
    digest=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        log "installing vaultsync and its dependencies into .venv"
        "$venv/bin/pip" install -q --upgrade pip >/dev/null
        "$venv/bin/pip" install -q -e ".[fuse,servers,test]"
        echo "$digest" > "$stamp"
    fi
}

case "${1:-}" in
    setup)
        system_packages; python_env ;;
    run)
        shift; system_packages; python_env
        exec "$venv/bin/vaultsync" demo "$@" ;;
    test)
        shift; system_packages; test_tools; python_env
        exec "$venv/bin/python" scripts/run_tests.py "$@" ;;
    *)
        echo "usage: scripts/bootstrap.sh setup|run|test [args...]" >&2; exit 2 ;;
esac
