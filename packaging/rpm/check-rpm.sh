#!/bin/bash
# packaging/rpm/check-rpm.sh [OUTDIR] — checks luo-systemd.spec on a Debian host, as far as that goes.
#
# Debian's rpm (4.18) has rpmbuild but none of Fedora's macro packages (systemd-rpm-macros,
# pyproject-rpm-macros, python3-devel's %python3_sitelib ...).  This script defines stand-ins for them
# (written to a temporary macro file, loaded with --load), then:
#   1. rpmspec -P   (the spec parses, every macro expands),
#   2. rpmbuild -bb --nodeps   (the build and %install run, %files matches what was installed),
#   3. rpmlint on the spec and the built .rpms (Debian's rpmlint package),
#   4. rpm -qlp / -qp --requires --scripts of the results.
# The stand-ins are NOT Fedora's macros: what the real ones do (dependency generators, byte-compilation,
# %pyproject_save_files' own file list, the systemd scriptlets' exact text) is not checked here.
# Results go to OUTDIR (default build/rpm/, git-ignored).  Needs: rpm, rpmlint, python3-build,
# python3-installer, python3-docutils (apt-get install --no-install-recommends).
set -euo pipefail
export LC_ALL=C.UTF-8
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME

top=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mkdir -p "${1:-$top/build/rpm}" && cd "${1:-$top/build/rpm}" && pwd)
spec=$top/packaging/rpm/luo-systemd.spec
for tool in rpmspec rpmbuild rpmlint rst2man; do
    command -v $tool >/dev/null || { echo "check-rpm: $tool is missing (apt-get install rpm rpmlint python3-docutils)" >&2; exit 1; }
done
/usr/bin/python3 -c 'import build, installer' 2>/dev/null ||
    { echo "check-rpm: python3-build and python3-installer are missing" >&2; exit 1; }

version=$(rpmspec -q --srpm --qf '%{version}' --define '_sourcedir /nonexistent' "$spec" 2>/dev/null || true)
work=$(mktemp -d "${TMPDIR:-/tmp}/luo-rpm.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{SOURCES,BUILD,RPMS,SRPMS,SPECS,BUILDROOT}

# Source0: the working tree as packaging/build-deb.sh takes it (tracked + untracked-not-ignored files,
# without tests/).
git -C "$top" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
        case "$f" in .venv/* | build/* | tests/*) continue ;; esac
        if [ -e "$top/$f" ]; then printf '%s\0' "$f"; fi
    done |
    tar -C "$top" --null --no-recursion --transform "s,^,luo-systemd-$version/," -czf \
        "$work/SOURCES/luo-systemd-$version.tar.gz" -T -

cat >"$work/install_wheel.py" <<'EOF'
"""%pyproject_install stand-in: installs the wheel into the buildroot with an explicit scheme."""
import glob
import sys

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile

buildroot, wheeldir, sitelib, bindir, prefix, python = sys.argv[1:]
scheme = {"purelib": sitelib, "platlib": sitelib, "scripts": bindir, "data": prefix,
          "headers": prefix + "/include/python3"}
destination = SchemeDictionaryDestination(scheme, interpreter=python, script_kind="posix", destdir=buildroot)
(wheel,) = glob.glob(wheeldir + "/*.whl")
with WheelFile.open(wheel) as source:
    install(source, destination, {"INSTALLER": b"rpm"})
EOF

# Stand-ins, after systemd's src/rpm/macros.systemd.in (paths of a merged-/usr Fedora) and
# pyproject-rpm-macros (names and arguments only); /bin/bash as the shell, as on Fedora (Debian's
# brp-compress needs bash but says #!/bin/sh, which is dash here); of the post-install steps only
# brp-compress (man pages), as nothing here is compiled.
cat >"$work/stubs.macros" <<EOF
%_buildshell /bin/bash
%__os_install_post /bin/bash /usr/lib/rpm/brp-compress %{_prefix} %{nil}
%_unitdir /usr/lib/systemd/system
%_presetdir /usr/lib/systemd/system-preset
%_systemdgeneratordir /usr/lib/systemd/system-generators
%_systemd_util_dir /usr/lib/systemd
%_journalcatalogdir /usr/lib/systemd/catalog
%systemd_requires Requires(post): systemd \\
Requires(preun): systemd \\
Requires(postun): systemd \\
%{nil}
%systemd_post() if [ \$1 -eq 1 ] && [ -x "/usr/lib/systemd/systemd-update-helper" ]; then /usr/lib/systemd/systemd-update-helper install-system-units %{?*} || : ; fi
%systemd_preun() if [ \$1 -eq 0 ] && [ -x "/usr/lib/systemd/systemd-update-helper" ]; then /usr/lib/systemd/systemd-update-helper remove-system-units %{?*} || : ; fi
%systemd_postun() %{nil}
%systemd_postun_with_restart() %{error:stand-in: luod must never be restarted by an upgrade}
%__python3 /usr/bin/python3
%python3_sitelib %(/usr/bin/python3 -Ic "import sysconfig; print(sysconfig.get_path('purelib', 'posix_prefix', vars={'base': '/usr'}))")
%pyproject_files %{_builddir}/pyproject-files
%pyproject_wheeldir %{_builddir}/pyproject-wheeldir
%pyproject_buildrequires echo 'python3dist(setuptools) >= 61'
%pyproject_wheel %{__python3} -m build --no-isolation --skip-dependency-check --wheel --outdir %{pyproject_wheeldir} .
%pyproject_install %{__python3} $work/install_wheel.py %{buildroot} %{pyproject_wheeldir} %{python3_sitelib} %{_bindir} %{_prefix} %{__python3}
%pyproject_save_files() printf '%%s\\\\n' '%{python3_sitelib}/%1/' '%{python3_sitelib}/%1-%{version}.dist-info/' > %{pyproject_files}
%pyproject_check_import(t) PYTHONPATH=%{buildroot}%{python3_sitelib} %{__python3} -c 'import luo_systemd'
EOF

# The settings of rpmlint's configs/Fedora/fedora.toml that matter here (Debian's rpmlint ships only its
# openSUSE-derived defaults): gzip'ed man pages, no Group:/Packager:/BuildRoot:, no signature on a local
# build, Requires: on the release of a subpackage's main package, /usr/lib paths.
cat >"$work/fedora-like.toml" <<'EOF'
CompressExtension = "gz"
MaxLineLength = 80
Filters = [
    '.*no-buildroot-tag.*',
    '.*no-group-tag.*',
    ' no-signature',
    ' no-packager-tag',
    ' requires-on-release',
    'hardcoded-library-path',
]
EOF

rpmopts=(--load "$work/stubs.macros" --define "_topdir $work")
status=0
section() { printf '\n== %s\n' "$*"; }
{
    section "rpmspec -P without the stand-ins (Debian's rpm alone)"
    if rpmspec -P --define "_topdir $work" "$spec" >"$work/plain.spec" 2>"$work/plain.err"; then
        echo "parses; Fedora's macros left unexpanded (rpm leaves unknown macros as text):"
        grep -o '%{\?_*\(pyproject\|python3\|systemd\|unitdir\|presetdir\|systemdgeneratordir\|systemd_util_dir\)[a-z_]*}\?' \
            "$work/plain.spec" | tr -d '{}?' | sort -u | tr '\n' ' '
        echo
    else
        echo "fails:"; sort -u "$work/plain.err" | head -20
    fi
    section "rpmspec -P with the stand-ins"
    rpmspec -P "${rpmopts[@]}" "$spec" >"$out/luo-systemd.spec.expanded" && echo "parses; expanded spec: $out/luo-systemd.spec.expanded" || status=1
    section "rpmbuild -bb --nodeps with the stand-ins"
    if rpmbuild -bb --nodeps "${rpmopts[@]}" "$spec" >"$out/rpmbuild.log" 2>&1; then
        echo "built:"
        rm -f "$out"/*.rpm
        find "$work/RPMS" -name '*.rpm' -exec cp {} "$out/" \; -printf '  %f\n'
    else
        status=1
        tail -n 30 "$out/rpmbuild.log"
        echo "rpmbuild FAILED (log: $out/rpmbuild.log)"
    fi
    lint=(--ignore-unused-rpmlintrc --rpmlintrc "$top/packaging/rpm/luo-systemd.rpmlintrc" "$spec")
    section "rpmlint $(rpmlint --version 2>/dev/null | head -1) with Fedora's settings (fedora-like.toml in this script)"
    (cd "$out" && rpmlint --config "$work/fedora-like.toml" "${lint[@]}" ./*.rpm) || true
    section "rpmlint with Debian's default configuration (openSUSE-derived: Group:, Packager:, bz2 man pages)"
    (cd "$out" && rpmlint "${lint[@]}" ./*.rpm) || true
    for rpm in "$out"/*.rpm; do
        [ -e "$rpm" ] || continue
        section "rpm -qlp $(basename "$rpm")"
        rpm -qlp "$rpm"
        section "rpm -qp --requires $(basename "$rpm")"
        rpm -qp --requires "$rpm"
        section "rpm -qp --scripts $(basename "$rpm")"
        rpm -qp --scripts "$rpm"
    done
} 2>&1 | tee "$out/check.txt"
exit $status
