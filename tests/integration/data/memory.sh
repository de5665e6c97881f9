#!/usr/bin/env bash
# A token corpus four times larger than train.memory_limit trains (docs/data.md): the file is
# read in pieces as batches need them, not loaded, so it does not count in the memory check, and the run's peak
# resident set stays far below the file's size. The same file read as bytes (read whole by
# every rank) is refused by the same limit, so the limit is real.
# usage: memory.sh <examoe> [mpiexec]
set -uo pipefail
examoe=$(readlink -f "$1") mpiexec=${2:-mpiexec}
py=/usr/bin/python3  # Debian's interpreter, where Debian's numpy lives
"$py" -c "import numpy" 2> /dev/null || { echo "FAIL: $py cannot import numpy: install python3-numpy (./cmake/dev.sh deps)"; exit 1; }
tmp=$(mktemp -d /tmp/examoe-bigtokens.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fails=0
limit_mib=96
"$py" - <<'PY'
import numpy as np
# An llm.c token file of 384 MiB after its header: 192 blocks of 2^20 ids < 512.
block = (np.arange(1 << 20, dtype=np.int64) * 5 + 3) % 512
n = 192 << 20
header = np.zeros(256, dtype=np.int32)
header[0], header[1], header[2] = 20240520, 1, n
with open("big.bin", "wb") as f:
    f.write(header.tobytes())
    b = block.astype(np.uint16).tobytes()
    for _ in range(192):
        f.write(b)
PY
bytes=$(stat -c %s big.bin)
echo "corpus: big.bin, $bytes bytes ($((bytes >> 20)) MiB); train.memory_limit ${limit_mib}MiB"
args=(--model.vocab_size 512 --model.d_model 32 --model.n_heads 2 --model.seq_len 32 --model.d_hidden 48
      --train.batch 16 --train.steps 30 --log.interval 10 --log.eval_interval 30 --train.memory_limit ${limit_mib}MiB
      --checkpoint.dir ck --parallel.watchdog_seconds 120)
timeout 300 "$mpiexec" -n 2 "$examoe" train "${args[@]}" --data big.bin > pieces.log 2>&1
rc=$?
line=$(grep '^summary' pieces.log)
rss=$(sed -nE 's/.*peak RSS ([0-9.]+) MiB.*/\1/p' <<< "$line")
if [ $rc -ne 0 ] || [ -z "$rss" ] || ! awk -v r="$rss" -v b="$bytes" 'BEGIN { exit !(r * 1048576 < b / 2) }'; then
  echo "FAIL pieces: rc $rc, peak RSS '$rss' MiB (must be under half the file)"; tail -n 12 pieces.log; fails=$((fails + 1))
else
  echo "ok   pieces: $(grep -m1 -oE "tokens 'big.bin'.*" pieces.log | cut -c1-120)"
  echo "     $(grep -m1 'memory per rank' pieces.log | sed 's/^ *//')"
  echo "     $line"
fi
timeout 120 "$mpiexec" -n 2 "$examoe" train "${args[@]}" --data big.bin --data.format bytes > whole.log 2>&1
rc=$?
if [ $rc -eq 0 ] || [ "$(grep -c "the data file 'big.bin' 384.0 MiB ($bytes bytes), held whole by every rank" whole.log)" -ne 2 ]; then
  echo "FAIL whole: rc $rc, the byte reader was not refused on both ranks"; cat whole.log; fails=$((fails + 1))
else
  echo "ok   whole: refused on both ranks: $(grep -m1 -oE 'this config needs about [^,]*, but [^(]*' whole.log)"
fi
echo "memory: $fails failed"
[ $fails -eq 0 ]
