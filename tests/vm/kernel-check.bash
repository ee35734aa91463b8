# The guest's kernel checks, shared by tests/vm/guest and tests/soak.d/guest
# (sourced). Each prints its verdict as "PREFIX: ..." lines.

kmemleak=/sys/kernel/debug/kmemleak

# Before the first test: what boot left in kmemleak (the debug kernel) is
# forgotten.
kmemleak_forget_boot() {
    if [ -w "$kmemleak" ]; then echo scan > "$kmemleak"; echo clear > "$kmemleak"; fi
}

# After the last test, with the module unloaded: fails (status 1) on a
# kmemleak report or any WARNING, BUG, Oops, hung task, KASAN, refcount,
# list corruption or lockdep report in the kernel log. $1: the prefix.
kernel_check() {
    local prefix=$1 status=0
    local pattern='WARNING:|BUG:|Oops|blocked for more than|general protection|KASAN|refcount_t:|list_(add|del) corruption|INFO: trying to register non-static key'
    # kmemleak reports only objects unreferenced for 5 s and over two
    # scans; it logs no more than a count, so its file is read.
    if [ -w "$kmemleak" ]; then
        echo scan > "$kmemleak"; sleep 6; echo scan > "$kmemleak"
        if [ -s "$kmemleak" ]; then
            echo "$prefix: FAIL kmemleak reports leaks:"
            head -n 100 "$kmemleak" | sed 's/^/    /'
            status=1
        else
            echo "$prefix: kmemleak clean"
        fi
    fi
    if dmesg | grep -Eq "$pattern"; then
        echo "$prefix: kernel log has errors:"
        dmesg | grep -E -A 40 "$pattern" | head -n 200 | sed 's/^/    /'
        status=1
    else
        echo "$prefix: kernel log clean"
    fi
    return $status
}
