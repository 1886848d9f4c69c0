#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian 12 machine, idempotently:
# Debian packages (redis-server, PostgreSQL server binaries, Alertmanager), a venv, and the locked
# Python packages. Re-running it costs about a second when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v zstd >/dev/null 2>&1 || missing+=(zstd)  # bench.data: the raw and peer pipelines
# The sandbox's Alertmanager (maintenance windows silence alerts there); Debian names the
# binary prometheus-alertmanager (and amtool, which checks monitoring/alertmanager.yml in
# `make test`); the sandbox starts its own on loopback.
{ [ -x /usr/bin/prometheus-alertmanager ] && [ -x /usr/bin/amtool ]; } || missing+=(prometheus-alertmanager)
# The sandbox's Prometheus (scrapes the backend stand-in, evaluates monitoring/rules) and
# promtool (the rules' unit tests in `make test`).
{ [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; } || missing+=(prometheus)
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    # Our tests and sandbox start their own servers: no system cluster or daemon wanted.
    $sudo mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $sudo tee /etc/postgresql-common/createcluster.conf >/dev/null
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
[ -x .venv/bin/uv ] || .venv/bin/pip install -q uv

stamp=.venv/.requirements.sha256
wanted=$(cat requirements.lock pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "setup: installing locked Python packages"
    .venv/bin/uv pip install -q --python .venv/bin/python -r requirements.lock
    .venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .
    # Bytecode now, not at each import: with PYTHONDONTWRITEBYTECODE set (as on these
    # machines) every process would otherwise compile Prefect from source again.
    .venv/bin/python -m compileall -q -j 0 .venv/lib/python3.11/site-packages >/dev/null || true
    echo "$wanted" >"$stamp"
fi
# The project's own modules too (cheap; stale files are simply recompiled in memory).
.venv/bin/python -m compileall -q flows tasks runbook deployments sandbox >/dev/null || true
