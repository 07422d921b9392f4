# Shared by scripts/demo and scripts/test: make .venv with mxguard installed, and install the
# Debian packages the lab needs when running as root. Sourced, not executed.
# MXGUARD_APT_PACKAGES lists extra packages a caller needs (the test suite asks for more).

mxguard_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

mxguard_apt() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "note: not root, so not installing Debian packages: ${missing[*]}" >&2
        echo "      (tests that need them will be skipped with a reason)" >&2
        return 0
    fi
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Postfix's installer asks questions; answer them and keep it from starting the system one.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

mxguard_pip() {
    # pip's notes about this machine's optional local package folders are noise: filter them,
    # but keep pip's exit status.
    local venv="$1"
    shift
    local log="$venv/pip.log"
    if ! "$venv/bin/python" -m pip install -q "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2 || true
        echo "pip install $* failed" >&2
        exit 1
    fi
    grep -v "^WARNING: Location" "$log" >&2 || true
}

mxguard_venv() {
    local venv="$mxguard_root/.venv"
    local extras="$1"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    # Reinstall only when pyproject.toml changed since the last install.
    local stamp="$venv/.mxguard-installed-$extras"
    if [ ! -f "$stamp" ] || [ "$mxguard_root/pyproject.toml" -nt "$stamp" ]; then
        mxguard_pip "$venv" --upgrade pip
        mxguard_pip "$venv" -e "$mxguard_root[$extras]"
        touch "$stamp"
    fi
    export PATH="$venv/bin:$PATH"
}
