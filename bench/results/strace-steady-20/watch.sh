#!/bin/bash
# strace -c each bench proxy process of this run once, 3 s, a few seconds after it starts.
seen=" "
end=$((SECONDS+150))
while [ $SECONDS -lt $end ]; do
  for pid in $(pgrep -f 'bare_bio_splice.py --listen|haproxy -db -f' ); do
    case "$seen" in *" $pid "*) continue;; esac
    seen="$seen$pid "
    ( sleep 5; tag=$(tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep '^BARE_BIO' | tr '\n' ,); cmd=$(tr '\0' ' ' </proc/$pid/cmdline | cut -c1-60);
      timeout -s INT 3 strace -c -f -p $pid -o /tmp/biocpu-strace/$pid.txt; echo "$pid $cmd $tag" >> /tmp/biocpu-strace/index.txt ) &
  done
  sleep 0.3
done
wait
