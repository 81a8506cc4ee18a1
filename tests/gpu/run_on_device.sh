#!/usr/bin/env bash
# Run zmgpu's real-GPU checks (tests/gpu) on a machine with an NVIDIA GPU and no access to a package index.
#
# Expects wheels of what that machine's python3 lacks among pyzmq, pyyaml and nvidia-ml-py in .whl/ at the
# repository root; installs them into /tmp/site, shows the GPUs and versions, runs pytest on tests/gpu, then
# `zmgpu demo` (which uses the real GPUs when NVML finds some).  Extra arguments go to pytest (e.g. -k memory).
# When $OUT is set, everything is also written to $OUT/gpu-tests.log, and the daemons' logs of the checks go to
# $OUT/daemon-logs.tar.gz.
#
# Exit status: pytest's (5 when NVML finds no GPU and every check was skipped), else 4 when the demo failed;
# 2 when the wheels are missing or do not install; 3 when pytest is not installed.

set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 2

run() {
    echo "== zmgpu real-GPU checks in $PWD, $(date -u '+%Y-%m-%d %H:%M:%S') UTC"
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no wheels in $PWD/.whl: carry pyzmq, pyyaml and nvidia-ml-py wheels for this machine's python3"
        return 2
    fi
    echo "== installing ${wheels[*]} into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}" || { echo "the wheels did not install"; return 2; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1

    echo "== nvidia-smi"
    nvidia-smi || echo "(nvidia-smi failed with status $?)"
    echo "== versions"
    python3 - <<'EOF'
import importlib, importlib.metadata, platform, sys
print(f"python {platform.python_version()} at {sys.executable}")
for module, dist in (("zmq", "pyzmq"), ("yaml", "PyYAML"), ("pynvml", "nvidia-ml-py"), ("pytest", "pytest"),
                     ("torch", "torch")):
    try:
        where = importlib.import_module(module).__file__
        print(f"{dist} {importlib.metadata.version(dist)} from {where}")
    except Exception as exc:  # a report line, whatever the reason
        print(f"{dist}: not usable ({type(exc).__name__}: {exc})")
try:
    import pynvml
    pynvml.nvmlInit()
    print(f"NVML: driver {pynvml.nvmlSystemGetDriverVersion()}, {pynvml.nvmlDeviceGetCount()} GPU(s)")
    pynvml.nvmlShutdown()
except Exception as exc:
    print(f"NVML: not usable ({exc}): tests/gpu will be skipped")
EOF

    if ! python3 -c 'import pytest' 2>/dev/null; then
        echo "pytest is not installed for $(command -v python3): carry a pytest wheel (with pluggy, iniconfig," \
             "packaging) in .whl/ too"
        return 3
    fi
    # A hung check must not take the machine's whole lease: pytest-timeout, where installed, stops it.
    local limit=()
    python3 -c 'import pytest_timeout' 2>/dev/null && limit=(--timeout 240)
    echo "== python3 -m pytest -q tests/gpu -p no:cacheprovider -rs ${limit[*]} $*"
    python3 -m pytest -q tests/gpu -p no:cacheprovider -rs --basetemp "$BASETEMP" "${limit[@]}" "$@"
    local status=$?

    echo "== python3 -m zmgpu.cli demo"
    timeout 120 python3 -m zmgpu.cli demo
    local demo=$?
    echo "== pytest: status $status; demo: status $demo"
    [ "$status" -eq 0 ] && [ "$demo" -ne 0 ] && return 4
    return "$status"
}

BASETEMP=$(mktemp -d /tmp/zmgpu-gpu-tests.XXXXXX)

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    run "$@" 2>&1 | tee "$OUT/gpu-tests.log"
    status=${PIPESTATUS[0]}
    (cd "$BASETEMP" && find . -name '*.log' -print0 | tar -czf "$OUT/daemon-logs.tar.gz" --null -T -)
    exit "$status"
fi
run "$@"
