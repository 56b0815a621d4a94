#!/usr/bin/env bash
# Set up kho-agent on a Debian machine (as root) and run its main job or its tests.
#
#   ./quickstart.sh main    install, then rehearse a whole live update on the simulated kernel
#                           (preflight, prepare, commit, simulated kexec, verify), and decode and
#                           check the real KHO/LUO state in tests/data/kho-samples (7.3-rc7)
#   ./quickstart.sh test    install, then lint (ruff, mypy --strict) and run the test suite
#   ./quickstart.sh bench   install, then print the benchmarks: decoder, engine, digest, daemon
#                           (figures, not a verdict)
#   ./quickstart.sh fuzz    install, then run both fuzzers for a bounded count and print their
#                           figures: the decoder (atheris, coverage-guided, 20,000 executions)
#                           and the D-Bus surface of kho-agentd (3,000 calls from root, an
#                           authorized and an unauthorized uid). `fuzz --long SECONDS` runs the
#                           decoder fuzzer that long and the D-Bus fuzzer for 20,000 calls.
#   ./quickstart.sh vm      install, plus QEMU, debootstrap and a kernel toolchain, then run the
#                           end-to-end suite (pytest -m vm): QEMU guests with systemd live-update
#                           through real kexecs on a real KHO/LUO kernel. Kernels and the guest
#                           image are built once and cached in /var/cache/kho-agent-tests
#                           (KHO_AGENT_TEST_CACHE); KHO_AGENT_TEST_KERNEL=/path/bzImage (and
#                           KHO_AGENT_TEST_KERNEL_NEXT=) test kernels of your own instead.
#   ./quickstart.sh vm-core the same without the scenarios marked `extended` (what CI runs)
#
# Idempotent: apt packages are installed only when missing, the venv (.venv) is reused, and pip
# runs again only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
    python3 python3-venv python3-dev pkg-config gcc      # venv; PyGObject and systemd-python build
    libgirepository1.0-dev libcairo2-dev libsystemd-dev  # from source on bookworm (no wheels)
    dbus-daemon device-tree-compiler iproute2            # private buses, dtc cross-checks
    zstd lz4 xz-utils bzip2                              # kernel image compressors in tests
    b3sum xxhash                                         # digest benchmark comparisons
    zsh mandoc                                           # completion syntax, man page lint
)

log() { printf '==> %s\n' "$*" >&2; }

install_apt() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        [ "$(id -u)" = 0 ] || { echo "missing packages ${missing[*]}: run as root" >&2; exit 2; }
        log "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

install_venv() {
    # Debian's interpreter: a venv from pyenv's (under /root, mode 700) is unusable by the
    # unprivileged users some tests switch to.
    local stamp=.venv/.kho-agent-installed want pins constraints=()
    # what only this release needs pinned (constraints/<codename>.txt), not the package's deps
    pins="constraints/$(. /etc/os-release && echo "${VERSION_CODENAME:-}").txt"
    if [ -f "$pins" ]; then constraints=(-c "$pins"); else pins=/dev/null; fi
    want=$(cat pyproject.toml "$pins" | sha256sum | cut -d' ' -f1)
    [ -x .venv/bin/python ] || { log "creating .venv"; /usr/bin/python3 -m venv .venv; }
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "pip install -e .[dev]"
        .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
        .venv/bin/python -m pip install -q "${constraints[@]}" -e '.[dev]' 2>&1 \
            | grep -v '^WARNING: Location' || true
        .venv/bin/python -c 'import kho_agent.abi, gi, pydbus, fdt, pyroute2, systemd.daemon, blake3'
        echo "$want" > "$stamp"
    fi
}

run_main() {
    local samples=tests/data/kho-samples rc=0
    log "rehearsal: a whole live update on the simulated kernel"
    .venv/bin/kho-agentctl rehearse || rc=$?
    log "outgoing state of a 7.3-rc7 kernel after 'kexec -s -l' (root FDT + memory extract)"
    .venv/bin/kho-agentctl check "$samples/case-out-1" --memory "$samples/case-out-1/memory.core" \
        || rc=$?
    log "the same kernel's debugfs as read live (out/fdt cut short by the kernel)"
    .venv/bin/kho-agentctl check "$samples/debugfs/stage1-3-loaded/out" \
        --memory "$samples/case-out-1/memory.core" || rc=$?
    log "incoming state of the next kernel: sessions, tokens and memfds handed over"
    .venv/bin/kho-agentctl check --in "$samples/case-in-1" --memory "$samples/case-in-1/memory.core" \
        || rc=$?
    return "$rc"
}

run_tests() {
    log "ruff"
    .venv/bin/ruff check kho_agent tests benchmarks fuzz fuzz/run-decoder
    log "mypy --strict kho_agent"
    .venv/bin/mypy --strict kho_agent
    MYPYPATH=fuzz .venv/bin/mypy --strict fuzz/harness.py fuzz/corpus.py fuzz/decoder.py
    .venv/bin/mypy --strict --scripts-are-modules fuzz/run-decoder
    log "pytest"
    local rc=0
    .venv/bin/python -m pytest "$@" || rc=$?
    # pytest exits 5 when it collected nothing: that is a failure here, not a pass
    return "$rc"
}

run_fuzz() {
    # Both exit 1 on a finding and print what to replay; the figures are printed either way.
    local rc=0 calls=3000 decoder=()
    if [ "${1:-}" = "--long" ]; then
        decoder=(--long "${2:?--long needs SECONDS}")
        calls=20000
    fi
    log "decoder fuzzing (atheris) ${decoder[*]}"
    .venv/bin/python fuzz/run-decoder "${decoder[@]}" || rc=$?
    log "D-Bus surface fuzzing: $calls calls (kho-agentd on a private bus, simulated kernel)"
    .venv/bin/python fuzz/dbus.py --calls "$calls" --seed 1 --quiet || rc=$?
    return "$rc"
}

install_vm_apt() {
    # the lists live beside the code that needs them (tests/vm/qemu.py, kernels.py; the .deb's
    # build tools in packaging/debian/control, which build_deb.py reads)
    local packages
    packages="$(.venv/bin/python -c 'from tests.vm import kernels, qemu
print(" ".join(qemu.VM_APT_PACKAGES + kernels.BUILD_APT_PACKAGES))') $(
        .venv/bin/python packaging/build_deb.py --print-build-deps)"
    # shellcheck disable=SC2206
    APT_PACKAGES=($packages)
    install_apt
}

run_vm() {
    # Where QEMU cannot run at all the tests skip and -ra prints why.
    log "pytest -m vm (QEMU guests on a real KHO/LUO kernel)"
    .venv/bin/python -m pytest -m vm tests/vm "$@"
}

run_bench() {
    # Each figure is printed beside a floor measured in the same run; a missed target ratio is
    # reported in the table (exit 1), and only a benchmark that cannot produce its figures fails.
    local rc=0
    .venv/bin/python benchmarks/bench_decoder.py || rc=$?
    [ "$rc" -le 1 ] || return "$rc"
    rc=0
    .venv/bin/python benchmarks/bench_engine.py || rc=$?
    [ "$rc" -le 1 ] || return "$rc"
    rc=0
    .venv/bin/python benchmarks/bench_digest.py || rc=$?
    [ "$rc" -le 1 ] || return "$rc"
    rc=0
    .venv/bin/python benchmarks/bench_daemon.py || rc=$?
    [ "$rc" -le 1 ] || return "$rc"
}

case "${1:-}" in
    main) install_apt; install_venv; run_main ;;
    bench) install_apt; install_venv; run_bench ;;
    test) shift; install_apt; install_venv; run_tests "$@" ;;
    fuzz) shift; install_apt; install_venv; run_fuzz "$@" ;;
    vm) shift; install_apt; install_venv; install_vm_apt; run_vm "$@" ;;
    vm-core) shift; install_apt; install_venv; install_vm_apt; run_vm -m 'vm and not extended' "$@" ;;
    *) echo "usage: $0 main | test [pytest args] | bench | fuzz [--long SECONDS] | vm [pytest args]" \
            "| vm-core [pytest args]" >&2
       exit 2 ;;
esac
