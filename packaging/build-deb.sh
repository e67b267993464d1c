#!/bin/bash
# packaging/build-deb.sh [--force] [--verbose] [--no-lintian] [OUTDIR]
#
# Builds luo-systemd's Debian binary packages (luo-systemd, luo-systemd-emulator) from the working tree as it
# is now, uncommitted changes included, into OUTDIR, runs lintian (unless --no-lintian: the demo and the
# tests that only install the packages), and prints the paths of the .debs on stdout, one per line
# (everything else goes to stderr).  OUTDIR defaults to $LUO_CACHE/deb/CHECKOUT (LUO_CACHE defaults to
# /var/cache/luo-systemd; CHECKOUT is the tree's directory name and a hash of its path, so two checkouts
# never replace each other's packages).
#
# * The tree is copied to a temporary directory first: git's tracked files plus untracked ones that are not
#   ignored (so no .venv/, .git/, build/, caches), or, outside git, everything but those; tests/ is left out
#   (nothing in it is packaged, and editing a test then needs no rebuild).  packaging/debian/ becomes
#   ./debian there; the project tree itself is never written to (except OUTDIR).
# * Cached: OUTDIR/.inputs.sha256 holds a hash of the copied tree (names, modes, contents) and of the build
#   tools' versions; when it matches and the .debs are there, nothing is built (--force builds anyway).
#   Likewise OUTDIR/.lintian-passed (that hash and lintian's version) says lintian already passed them.
# * Missing build dependencies (packaging/debian/control) and lintian (when it runs) are installed with
#   apt-get --no-install-recommends; the script refuses if that would install or upgrade any part of systemd.
# * Also builds the source package (3.0 (native)), only so that lintian checks debian/ itself.
#
# Exit status: 0 when built (or cached) and lintian reported no error; non-zero otherwise.
set -euo pipefail
export LC_ALL=C.UTF-8
# Debian's own tools and interpreter only: no virtualenv, pyenv or /usr/local python in a package build.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE PIP_REQUIRE_VIRTUALENV

force=0
verbose=0
lint=1
out=
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --verbose | -v) verbose=1 ;;
        --no-lintian) lint=0 ;;
        -h | --help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        -*) echo "build-deb: unknown option $1" >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done

top=$(cd "$(dirname "$0")/.." && pwd)
out=${out:-${LUO_CACHE:-/var/cache/luo-systemd}/deb/$(basename "$top")-$(printf %s "$top" | sha256sum | cut -c1-8)}
out=$(mkdir -p "$out" && cd "$out" && pwd)
say() { echo "build-deb: $*" >&2; }
die() { echo "build-deb: error: $*" >&2; exit 1; }
start_ms=$(($(date +%s%N) / 1000000))
elapsed() {
    local ms=$(($(date +%s%N) / 1000000 - start_ms))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

# One build at a time per output directory (pytest workers, a developer's shell).
exec 9>"$out/.lock"
flock 9

# The packaging version must follow the project's.
# (sed, not dpkg-parsechangelog: dpkg-dev may not be installed yet)
deb_version=$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' "$top/packaging/debian/changelog")
py_version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$top/pyproject.toml" 2>/dev/null || sed -n 's/^version *= *"\(.*\)"/\1/p' "$top/pyproject.toml" | head -1)
[ "${deb_version%%-*}" = "$py_version" ] ||
    die "packaging/debian/changelog is at $deb_version but pyproject.toml at $py_version: add a changelog entry"

stage=$(mktemp -d "${TMPDIR:-/tmp}/luo-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# -- the tree to build, as one deterministic tar (also the cache key)
list_tree() {
    if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # Tracked (as they are now on disk; deleted ones skipped) and untracked-but-not-ignored files.
        git -C "$top" ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do
                case "$f" in .venv/* | build/* | debian/* | tests/*) continue ;; esac
                if [ -e "$top/$f" ] || [ -L "$top/$f" ]; then printf '%s\0' "$f"; fi
            done
    else
        (cd "$top" && find . \( -path ./.git -o -path ./.venv -o -path ./build -o -path ./debian -o -path ./tests \
            -o -name __pycache__ -o -name '*.egg-info' -o -name .pytest_cache -o -name .mypy_cache \
            -o -name .ruff_cache \) -prune -o \( -type f -o -type l \) -printf '%P\0')
    fi
}
list_tree | LC_ALL=C sort -z | tar -C "$top" --null --no-recursion --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    -cf "$stage/tree.tar" -T -

tools="debhelper dh-python pybuild-plugin-pyproject python3-setuptools python3-docutils python3 systemd systemd-dev dpkg-dev"
# shellcheck disable=SC2086 # word splitting wanted
inputs_hash=$({
    sha256sum <"$stage/tree.tar"
    dpkg-query -W $tools 2>/dev/null || true
} | sha256sum | cut -d' ' -f1)

print_debs() {
    local found=0 deb
    for deb in "$out"/luo-systemd*_"$deb_version"_all.deb; do
        [ -e "$deb" ] || continue
        echo "$deb"
        found=1
    done
    [ $found = 1 ]
}

apt_install() {
    # $1: description; rest: apt-get subcommand and arguments
    local what=$1
    shift
    export DEBIAN_FRONTEND=noninteractive
    [ "$(id -u)" = 0 ] || die "$what is missing and installing it needs root: apt-get $*"
    say "installing $what: apt-get $*"
    apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
    # Never move the host's systemd: the tests' containers and the host must keep the versions they have.
    if apt-get -o DPkg::Lock::Timeout=600 -s "$@" 2>/dev/null |
        grep -E '^Inst (systemd|systemd-sysv|libsystemd0|libsystemd-shared|udev|libudev1) ' >&2; then
        die "installing $what would install or upgrade systemd itself (above); install it by hand"
    fi
    apt-get -o DPkg::Lock::Timeout=600 -y -qq "$@" >&2
}

build() {  # SRC: the source package (only so that lintian checks debian/ itself), then the binaries
    (cd "$stage" && dpkg-source -b "$(basename "$1")") && (cd "$1" && dpkg-buildpackage -us -uc -b)
}

build_debs() {
    rm -f "$out/.inputs.sha256" "$out/.lintian-passed"

    # -- build dependencies
    local src="$stage/luo-systemd-$deb_version" log="$out/build.log"
    mkdir "$src"
    tar -C "$src" -xmf "$stage/tree.tar"  # -m: files dated now, clamped to the changelog date by dpkg
    [ ! -e "$src/debian" ] || die "the tree has a top-level debian/: the packaging lives in packaging/debian/ only"
    cp -a "$top/packaging/debian" "$src/debian"
    if ! command -v dpkg-checkbuilddeps >/dev/null; then
        apt_install "dpkg-dev and the build dependencies" build-dep --no-install-recommends "$src"
    elif ! (cd "$src" && dpkg-checkbuilddeps 2>"$stage/builddeps.txt"); then
        apt_install "the build dependencies ($(sed 's/.*Unmet build dependencies: //' "$stage/builddeps.txt"))" \
            build-dep --no-install-recommends "$src"
    fi
    command -v rst2man >/dev/null || die "rst2man is missing although python3-docutils is installed"

    # -- build
    say "building luo-systemd $deb_version in $src (log: $log)"
    if [ $verbose = 1 ]; then
        build "$src" 2>&1 | tee "$log" >&2 || { die "the build failed (log: $log)"; }
    elif ! build "$src" >"$log" 2>&1; then
        tail -n 40 "$log" | sed 's/^/  | /' >&2
        die "the build failed (last lines above; full log: $log)"
    fi

    rm -f "$out"/luo-systemd*_*.deb "$out"/luo-systemd_*.changes "$out"/luo-systemd_*.buildinfo \
        "$out"/luo-systemd_*.dsc "$out"/luo-systemd_*.tar.*
    mv "$stage"/luo-systemd*_"$deb_version"_all.deb "$stage"/luo-systemd_"$deb_version"_*.changes \
        "$stage"/luo-systemd_"$deb_version"_*.buildinfo "$stage"/luo-systemd_"$deb_version".dsc \
        "$stage"/luo-systemd_"$deb_version".tar.* "$out"/
    echo "$inputs_hash" >"$out/.inputs.sha256"
}

# lintian on the source package (debian/ itself) and the binaries, once per build and lintian version.
lint_debs() {
    command -v lintian >/dev/null || apt_install lintian install --no-install-recommends lintian
    local key changes lintian_rc=0 as_user=()
    key="$inputs_hash lintian $(dpkg-query -W -f '${Version}' lintian)"
    if [ -f "$out/lintian.txt" ] && [ "$(cat "$out/.lintian-passed" 2>/dev/null)" = "$key" ]; then
        say "lintian passed these packages before; it said:"
        sed 's/^/  /' "$out/lintian.txt" >&2
        return 0
    fi
    changes=$(ls "$out"/luo-systemd_"$deb_version"_*.changes)
    # lintian unpacks what it checks: not as root when it can be helped (it says so itself).
    if [ "$(id -u)" = 0 ] && runuser -u nobody -- test -r "$changes" 2>/dev/null; then
        as_user=(runuser -u nobody -- env HOME=/nonexistent)
    fi
    (cd / && "${as_user[@]}" lintian --display-info --pedantic "$out/luo-systemd_$deb_version.dsc" "$changes") \
        >"$out/lintian.txt" 2>&1 || lintian_rc=$?
    say "lintian (--display-info --pedantic) said:"
    if [ -s "$out/lintian.txt" ]; then sed 's/^/  /' "$out/lintian.txt" >&2; else echo "  (nothing)" >&2; fi
    if grep -q '^E: ' "$out/lintian.txt" || [ $lintian_rc -ne 0 ]; then
        die "lintian reported errors (exit status $lintian_rc; $out/lintian.txt)"
    fi
    echo "$key" >"$out/.lintian-passed"
}

if [ $force = 0 ] && [ "$(cat "$out/.inputs.sha256" 2>/dev/null)" = "$inputs_hash" ] && print_debs >/dev/null; then
    say "inputs unchanged since the last build (${inputs_hash:0:16}): nothing built"
else
    build_debs
fi
[ $lint = 0 ] || lint_debs
say "done in $(elapsed) s"
print_debs
