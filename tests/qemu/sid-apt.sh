#!/usr/bin/env bash
# sid-apt.sh — fetch single .deb files from Debian sid WITHOUT touching the host's apt setup.
#
# A private apt configuration (own sources list, lists, cache and state dirs) lives under
#   ${LUO_CACHE:-/var/cache/luo-systemd}/apt-sid/
# Sid is never added to /etc/apt/sources.list*, and nothing is ever installed from it:
# the only operations are `update`, `download` (into a directory) and read-only apt-cache queries.
#
# Usage:
#   sid-apt.sh update                      refresh the private sid package lists
#   sid-apt.sh download DESTDIR PKG...     download PKG .debs into DESTDIR (runs update if no lists yet)
#   sid-apt.sh apt-cache ARGS...           run apt-cache against the sid lists (e.g. `search`, `policy`, `show`)
#   sid-apt.sh newest REGEX                print the newest package name matching ^REGEX$ (version-sorted)
#
# stdout carries only the result (`newest`, `apt-cache`): apt-get's progress goes to stderr, so callers can
# capture it with $(...) even on the first run, when the lists are fetched.
#
# The Debian mirror is taken from the host's own sources (/etc/apt/sources.list.d/*.sources or
# sources.list); override with SID_MIRROR=URL. The archive key defaults to
# /usr/share/keyrings/debian-archive-keyring.gpg (override: SID_KEYRING=FILE).
set -euo pipefail

CACHE=${LUO_CACHE:-/var/cache/luo-systemd}
BASE=$CACHE/apt-sid
KEYRING=${SID_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}

die() { echo "sid-apt.sh: $*" >&2; exit 1; }

find_mirror() {
    if [[ -n ${SID_MIRROR:-} ]]; then echo "$SID_MIRROR"; return; fi
    local f uri=""
    # deb822 .sources files: first URIs: entry ending in /debian (not debian-security)
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        uri=$(awk 'tolower($1)=="uris:" { for (i=2;i<=NF;i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }' "$f")
        [[ -n $uri ]] && break
    done
    # one-line format
    if [[ -z $uri ]]; then
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -r $f ]] || continue
            uri=$(awk '$1=="deb" { for (i=2;i<=NF;i++) if ($i ~ /^[a-z+]+:\/\// && $i ~ /\/debian\/?$/) { print $i; exit } }' "$f")
            [[ -n $uri ]] && break
        done
    fi
    [[ -n $uri ]] || die "no Debian mirror found in /etc/apt sources; set SID_MIRROR=URL"
    echo "${uri%/}"
}

setup() {
    mkdir -p "$BASE"/lists/partial "$BASE"/cache/archives/partial "$BASE"/state "$BASE"/etc
    [[ -r $KEYRING ]] || die "archive keyring $KEYRING not readable"
    local mirror want
    mirror=$(find_mirror)
    want="deb [signed-by=$KEYRING] $mirror sid main"
    if [[ ! -f $BASE/etc/sources.list ]] || [[ $(cat "$BASE/etc/sources.list") != "$want" ]]; then
        echo "$want" > "$BASE/etc/sources.list"
    fi
    touch "$BASE/state/status"   # empty dpkg status: apt must not reason about the host's packages
    APT_OPTS=(
        -o Dir::Etc::SourceList="$BASE/etc/sources.list"
        -o Dir::Etc::SourceParts=/dev/null
        -o Dir::Etc::Preferences=/dev/null
        -o Dir::Etc::PreferencesParts=/dev/null
        -o Dir::State::Lists="$BASE/lists"
        -o Dir::State::status="$BASE/state/status"
        -o Dir::Cache="$BASE/cache"
        -o Dir::Cache::archives="$BASE/cache/archives"
        -o APT::Architecture=amd64
        -o APT::Architectures::=amd64
        -o Acquire::Languages=none
        -o APT::Get::List-Cleanup=true
        -o DPkg::Lock::Timeout=600
    )
}

have_lists() { compgen -G "$BASE/lists/*_sid_*Packages*" >/dev/null; }

do_update() { apt-get "${APT_OPTS[@]}" -q update >&2; }

cmd=${1:-}; [[ -n $cmd ]] || die "usage: sid-apt.sh {update|download DESTDIR PKG...|apt-cache ARGS...|newest REGEX}"
shift
setup
case $cmd in
    update)
        do_update ;;
    download)
        [[ $# -ge 2 ]] || die "usage: sid-apt.sh download DESTDIR PKG..."
        dest=$1; shift
        have_lists || do_update
        mkdir -p "$dest"
        dest=$(cd "$dest" && pwd)
        # apt-get download writes into the current directory; run it in a subshell there.
        # (_apt sandbox user may not be able to write DESTDIR; download as root into it.)
        ( cd "$dest" && apt-get "${APT_OPTS[@]}" -o APT::Sandbox::User=root -q download "$@" ) >&2 ;;
    apt-cache)
        have_lists || do_update
        apt-cache "${APT_OPTS[@]}" "$@" ;;
    newest)
        [[ $# -eq 1 ]] || die "usage: sid-apt.sh newest REGEX"
        have_lists || do_update
        apt-cache "${APT_OPTS[@]}" pkgnames | grep -E "^($1)\$" | sort -V | tail -n1 ;;
    *)
        die "unknown command: $cmd" ;;
esac
