#!/usr/bin/env bash
# make test's last word: for each pytest process (its exit status and log), why it failed.
# A process that dies of a signal (a C library's abort, a segfault) prints no summary; its
# log holds Python's faulthandler dump, whose start (the crashing thread, its innermost
# frames, and what the library printed just before) is repeated here, where CI's excerpt
# of the output (the tail) shows it.
set -u
failed=0
while [ $# -ge 2 ]; do
    rc=$1 log=$2
    shift 2
    [ "$rc" = 0 ] && continue
    failed=1
    if [ "$rc" -gt 128 ]; then
        echo "== $log: pytest was killed by signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null))"
    else
        echo "== $log: pytest exited with $rc"
    fi
    # not at a line's start: pytest -q's progress dots come first on that line
    if grep -q "Fatal Python error" "$log"; then
        line=$(grep -n -m1 "Fatal Python error" "$log" | cut -d: -f1)
        start=$(( line > 25 ? line - 25 : 1 ))
        # what was printed before the dump, and the crashing thread's innermost frames
        sed -n "${start},$((line + 30))p" "$log" | sed -E 's/^\.+//; s/ +\[ *[0-9]+%\]$//' |
            grep -v '^$' | cut -c1-300
    else
        grep -E "^(FAILED|ERROR) " "$log" | head -40
    fi
done
exit $failed
