# Guest side, sourced by tests/soak.d/guest: handoffs and kill -9 /
# `attach --recover` cycles of a kernel-module device under a verifying
# fio load on mounted ext4, once served over io_uring and once over
# read/write. Every request goes through the daemons (--no-passthrough).
#
# module_soak IO HANDOFFS RECOVERS SECONDS: one device served with --io IO.
# Stops at its counts or when SECONDS run out; prints its figures.
module_soak() {
    local io=$1 handoffs=$2 recovers=$3 seconds=$4
    local name=soak-$io image=/tmp/soak-$io.img mnt=/tmp/soak-mnt
    local start end h=0 r=0 step=0 late=0 pid new tries mark
    start=$(now); end=$((start + seconds))
    rec=/tmp/soak-load-$io   # global: the guest's cleanup stops the load
    mkdir -p "$rec" "$mnt"
    rm -f "$image"; truncate -s 384M "$image"
    dev=$("$FUSE_BLK" attach --transport kmod --name "$name" --queues 2 --block-size 4096 \
        --no-passthrough --io "$io" "file:$image") || fail "$io: attach"
    cleanup_name=$name cleanup_mnt=$mnt
    mkfs.ext4 -q "$dev" || fail "$io: mkfs"
    mount "$dev" "$mnt" || fail "$io: mount"
    mark=$(dmesg | wc -l)
    start_load "$mnt" "$rec"
    # Interleaved: two handoffs to a recovery while both have counts left.
    while { [ "$h" -lt "$handoffs" ] || [ "$r" -lt "$recovers" ]; } && [ "$(now)" -lt "$end" ]; do
        step=$((step + 1))
        pid=$(listed "$name" pid)
        [ -n "$pid" ] || fail "$io: step $step: the device is not listed: $("$FUSE_BLK" list)"
        if [ "$r" -lt "$recovers" ] && { [ "$h" -ge "$handoffs" ] || [ $((step % 3)) = 0 ]; }; then
            kill -9 "$pid"
            while alive "$pid"; do sleep 0.05; done
            "$FUSE_BLK" list | grep -q "^$name .*orphaned" || fail "$io: recovery $((r + 1)): not orphaned"
            "$FUSE_BLK" attach --recover "$name" --io "$io" "file:$image" > /dev/null \
                || fail "$io: recovery $((r + 1)): attach --recover"
            r=$((r + 1))
        else
            "$FUSE_BLK" handoff "$name" > /dev/null || fail "$io: handoff $((h + 1))"
            h=$((h + 1))
        fi
        read -r new tries <<< "$(successor "$name" "$pid")"
        [ "${tries:-1}" = 1 ] || late=$((late + 1))
        [ -n "$new" ] || fail "$io: step $step: no new daemon listed (was $pid): $("$FUSE_BLK" list)"
        [ "$(listed "$name" io)" = "$io" ] || fail "$io: step $step: now served with io $(listed "$name" io)"
        sleep 0.2
    done
    stop_load "$rec"
    "$FUSE_BLK" list | grep -q "^$name .*running" || fail "$io: not running at the end"
    umount "$mnt"
    cleanup_mnt=
    fsck=clean
    e2fsck -fn "$dev" > "$rec/fsck.out" 2>&1 || { fsck=unclean; cat "$rec/fsck.out"; }
    ioerr=$(dmesg | tail -n +$((mark + 1)) | grep -Eic 'I/O error|timed out|EXT4-fs error|Buffer I/O' || true)
    "$FUSE_BLK" detach "$name" || fail "$io: detach"
    cleanup_name=
    rm -f "$image"
    echo "soak: module io=$io: $h of $handoffs handoffs, $r of $recovers recoveries" \
        "(successor listed late $late times), $fio_runs fio runs ($fio_failed failed), $ioerr kernel I/O errors, fsck $fsck," \
        "$(( $(now) - start )) s"
    [ "$fio_failed" = 0 ] && [ "$ioerr" = 0 ] && [ "$fsck" = clean ] || fail "module io=$io"
}
