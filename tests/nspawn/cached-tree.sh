# Sourced by build-rootfs.sh and build-qemu-rootfs.sh: the life of one cached tree, $TOP/NAME.
#
# Locks: .NAME.build.lock serializes the builders of one tree; .NAME.lock is held shared by every running
# harness container that uses the tree as its overlay's lower layer, and exclusively here only while the old
# tree is swapped out and deleted.  The caller defines log() and up_to_date() and sets TOP.

# begin_build NAME: exits 0 when the tree is up to date (asked again under the build lock: another builder
# may have finished meanwhile); otherwise keeps the build lock and sets TMP, a new directory next to the
# tree that is removed on exit unless swap_into_place took it.
begin_build() {
    local name=$1
    if up_to_date; then
        log "up to date: $TOP/$name"
        exit 0
    fi
    mkdir -p "$TOP"
    exec 8>"$TOP/.$name.build.lock"
    flock 8
    if up_to_date; then
        log "up to date: $TOP/$name (built meanwhile)"
        exit 0
    fi
    TMP=$(mktemp -d "$TOP/.$name.tmp.XXXXXX")
    trap remove_tmp EXIT
}

remove_tmp() {
    if [ -n "${TMP:-}" ] && [ -d "$TMP" ]; then rm -rf --one-file-system "$TMP"; fi
    return 0
}

# swap_into_place NAME: renames the finished $TMP to $TOP/NAME once no container uses the old tree.
swap_into_place() {
    local name=$1 old
    exec 9>"$TOP/.$name.lock"
    if ! flock -w "${LUO_LOCK_WAIT:-600}" 9; then
        echo "$0: $TOP/$name is still in use by running containers (lock $TOP/.$name.lock)" >&2
        exit 1
    fi
    if [ -e "$TOP/$name" ]; then
        old=$(mktemp -d "$TOP/.$name.old.XXXXXX")
        mv -T "$TOP/$name" "$old/tree"
        mv -T "$TMP" "$TOP/$name"
        TMP=
        rm -rf --one-file-system "$old"
    else
        mv -T "$TMP" "$TOP/$name"
        TMP=
    fi
    exec 9>&-
}
