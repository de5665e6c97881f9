#!/usr/bin/env bash
# examoe-plot end to end (README "Looking at a run"):
#   1. a short training run's metrics: the six PNGs are complete PNGs, and every figure of the
#      printed summary equals the JSON lines (read by check_plot.py on its own) and what
#      examoe train printed; the metrics file is left as it was
#   2. a file written here with hand-computed figures (a migration, a non-finite step, a null
#      loss); the same file resumed at a step it had logged, and twice over (a new run)
#   3. runs without records of a kind: a byte corpus (no accuracy), 0 steps (summary only),
#      no summary (a killed run)
#   4. bad input and outputs that would replace the input
# usage: run.sh <examoe> <examoe-plot> [mpiexec]
set -euo pipefail
examoe=$(realpath "$1") plot=$(realpath "$2") mpiexec=${3:-mpiexec}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tmp=$(mktemp -d /tmp/examoe-plot.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
check() { python3 "$here/check_plot.py" "$@"; }
step() { echo "== $*"; }
# has FILE LINE: FILE holds exactly that line; contains FILE TEXT: some line holds TEXT
has() { grep -qxF -- "$2" "$1" || { echo "FAIL: $1 lacks the line: $2"; cat "$1"; exit 1; }; }
contains() { grep -qF -- "$2" "$1" || { echo "FAIL: $1 lacks: $2"; cat "$1"; exit 1; }; }
all=(loss.png accuracy.png tokens_per_expert.png imbalance.png phase_time.png bytes_moved.png)

# The interpreter on examoe-plot's first line must have matplotlib: a missing one fails here.
py=$(head -n 1 "$plot" | sed 's/^#!//')
if ! $py -c "import matplotlib, numpy" 2> /dev/null; then
  echo "FAIL: '$py' (examoe-plot's interpreter) has no matplotlib or numpy:" \
       "apt-get install python3-matplotlib python3-numpy (./cmake/dev.sh deps)"
  exit 1
fi
shape=(--model.d_model 32 --model.seq_len 16 --model.d_hidden 32 --train.batch 8)

step "1. a training run with migrations, then examoe-plot"
"$mpiexec" -n 2 "$examoe" train "${shape[@]}" --train.steps 40 --log.interval 5 --log.eval_interval 10 \
  --placement.rebalance_interval 10 --log.metrics run.jsonl > train.txt
tail -n 2 train.txt
before=$(sha256sum < run.jsonl)
"$plot" run.jsonl --out pics/new > plot.txt   # pics/new does not exist yet
cat plot.txt
for f in "${all[@]}"; do
  grep -qx "wrote pics/new/$f ($(stat -c %s "pics/new/$f") bytes)" plot.txt || { echo "FAIL: $f not reported"; exit 1; }
done
check summary run.jsonl plot.txt train.txt
check pngs pics/new "${all[@]}"
grep -q "^migrations: [1-9]" plot.txt || { echo "FAIL: the run was meant to migrate experts"; exit 1; }
[ "$(sha256sum < run.jsonl)" = "$before" ] || { echo "FAIL: the input changed"; exit 1; }

step "2. hand-computed figures"
# (In the order examoe train writes them: a migration and a non-finite step before the progress
# record of their step.)
cat > hand.jsonl <<'J'
{"step":2,"loss":3.0,"ce":2.9,"imbalance":1.5,"bytes_moved":100,"peak_rss_bytes":1000,"tokens_per_expert":[[3,1]],"moe_phase_s":{"router":0.001,"alltoall":0.002}}
{"migration":true,"step":4,"layer":0,"imbalance_before":1.5,"imbalance_after":1.0,"moved":[{"expert":1,"from":0,"to":1}],"placement":[0,1]}
{"step":4,"loss":2.5,"ce":2.4,"imbalance":1.25,"bytes_moved":300,"peak_rss_bytes":3000,"tokens_per_expert":[[2,2]],"moe_phase_s":{"router":0.002,"alltoall":0.002},"val_loss":2.6,"val_accuracy":0.25}
{"step":6,"nonfinite":"loss","ranks":1,"skipped":1,"skipped_in_a_row":1,"action":"skip"}
{"step":6,"loss":null,"ce":null,"imbalance":1.0,"bytes_moved":200,"peak_rss_bytes":3000,"tokens_per_expert":[[1,3]],"moe_phase_s":{"router":0.003,"alltoall":0.0005}}
{"step":8,"loss":2.75,"ce":2.7,"imbalance":1.25,"bytes_moved":300,"peak_rss_bytes":2000,"tokens_per_expert":[[2,2]],"moe_phase_s":{"router":0.004,"alltoall":0.0015},"val_loss":2.4,"val_accuracy":0.5}
{"summary":true,"steps":8,"seconds":1.23461,"tokens_per_s":1000.04,"val_loss_initial":5.0,"val_loss_final":2.4,"unigram_entropy":2.0,"skipped_steps":1,"val_accuracy":0.5}
J
cat > hand.expected <<'T'
examoe-plot: hand.jsonl: 4 progress records (steps 2 to 8), 2 with validation, 1 migration, 1 non-finite step, 1 summary record
training loss: first 3.0000 (step 2), final 2.7500 (step 8), best 2.5000 (step 4)
training cross-entropy: first 2.9000 (step 2), final 2.7000 (step 8), best 2.4000 (step 4)
validation loss: first 2.6000 (step 4), final 2.4000 (step 8), best 2.4000 (step 8)
validation accuracy: first 25.0 % (step 4), final 50.0 % (step 8), best 50.0 % (step 8)
imbalance: mean 1.2500 over 4 records, max 1.5000 (step 2), final 1.2500 (step 8)
MoE time per phase, summed over the 4 logged steps (rank 0, all layers), ms: router 10.000, alltoall 6.000; total 16.000, mean per logged step 4.000
bytes moved per logged step (all ranks and layers): mean 225.0, min 100 (step 2), max 300 (step 4), final 300 (step 8)
tokens per expert, layer 0: summed over the logged steps [8, 8], final step [2, 2] (step 8)
peak RSS: 3000 bytes (step 4; 2.9 KiB)
migrations: 1 (layer 0: 1), 1 expert move in all
  step 4 layer 0: 1 expert moved (1 0->1), imbalance 1.5000 -> 1.0000
non-finite steps: 1 (steps 6; last: loss, skip)
summary record: 8 steps in 1.2346 s, 1000.0 tokens/s, val loss 5.0000 -> 2.4000 (unigram entropy 2.0000), exact match 50.0 %, 1 step skipped
T
for f in "${all[@]}"; do sha256sum < "pics/new/$f" > "$f.sum"; done
"$plot" hand.jsonl --out pics/new > hand.txt   # over the pictures of part 1
grep -v '^rounding: \|^wrote ' hand.txt > hand.got
diff hand.expected hand.got || { echo "FAIL: hand-computed summary"; exit 1; }
for f in "${all[@]}"; do
  grep -qx "wrote pics/new/$f ($(stat -c %s "pics/new/$f") bytes)" hand.txt && ! sha256sum < "pics/new/$f" | cmp -s - "$f.sum" ||
    { echo "FAIL: $f not replaced"; exit 1; }
done
check pngs pics/new "${all[@]}"

# A null (non-finite) loss is printed as nan and never the best, also when it comes first.
sed '1s/"loss":3.0/"loss":null/' hand.jsonl > nan1.jsonl
"$plot" nan1.jsonl > nan1.txt
has nan1.txt "training loss: first nan (step 2), final 2.7500 (step 8), best 2.5000 (step 4)"
sed 's/"loss":[0-9.]\+/"loss":null/' hand.jsonl > nanall.jsonl
"$plot" nanall.jsonl > nanall.txt
has nanall.txt "training loss: first nan (step 2), final nan (step 8), best none (no finite value)"

step "2b. resumed at step 6 (logged before): the later records replace those from step 6 on"
{ head -n 5 hand.jsonl
  echo '{"step":6,"loss":2.0,"ce":1.9,"imbalance":1.0,"bytes_moved":200,"peak_rss_bytes":3000,"tokens_per_expert":[[1,3]],"moe_phase_s":{"router":0.003,"alltoall":0.0005}}'
  tail -n 2 hand.jsonl; } > resumed.jsonl
"$plot" resumed.jsonl > resumed.txt 2> resumed.err   # no --out: the summary alone
cat resumed.err
contains resumed.err "resumed.jsonl line 6: step 6 comes again"
has resumed.txt "examoe-plot: resumed.jsonl: 4 progress records (steps 2 to 8), 2 with validation, 1 migration, 0 non-finite steps, 1 summary record"
has resumed.txt "training loss: first 3.0000 (step 2), final 2.7500 (step 8), best 2.0000 (step 6)"
if grep -q "^wrote \|^skipped " resumed.txt; then echo "FAIL: pictures without --out"; exit 1; fi

step "2c. the same run appended twice: the second one is used"
cat hand.jsonl hand.jsonl > twice.jsonl
"$plot" twice.jsonl > twice.txt 2> twice.err
contains twice.err "twice.jsonl line 8: a new run starts"
diff <(sed 1d hand.got) <(grep -v '^rounding: \|^wrote ' twice.txt | sed 1d)

step "3. records of a kind missing"
python3 -c "print(('The quick brown fox jumps over the lazy dog. ' * 60))" > text.txt
"$mpiexec" -n 2 "$examoe" train "${shape[@]}" --data text.txt --train.steps 6 --log.interval 3 \
  --log.metrics bytes.jsonl > bytes-train.txt
"$plot" bytes.jsonl --out bytes > bytes.txt
has bytes.txt "skipped bytes/accuracy.png: no record has val_accuracy (only the built-in addition corpus has held-out problems)"
[ ! -e bytes/accuracy.png ]
check summary bytes.jsonl bytes.txt bytes-train.txt
check pngs bytes loss.png tokens_per_expert.png imbalance.png phase_time.png bytes_moved.png
"$mpiexec" -n 2 "$examoe" train "${shape[@]}" --train.steps 0 --log.metrics zero.jsonl > /dev/null
"$plot" zero.jsonl --out zero > zero.txt
for f in "${all[@]}"; do has zero.txt "skipped zero/$f: no progress records"; done
contains zero.txt "summary record: 0 steps in "
[ -z "$(ls -A zero)" ]
head -n 6 hand.jsonl > killed.jsonl
"$plot" killed.jsonl > killed.txt
has killed.txt "summary record: none (the run did not finish: stopped, killed, or still running)"

step "4. bad input"
# fails EXPECTED_STATUS MESSAGE_PART ARGS...: that status, the message on stderr, nothing on stdout
fails() {
  local want=$1 msg=$2 rc=0
  shift 2
  "$plot" "$@" > out.txt 2> err.txt || rc=$?
  if [ "$rc" != "$want" ] || ! grep -qF -- "$msg" err.txt || [ -s out.txt ]; then
    echo "FAIL: examoe-plot $* exited $rc (expected $want) with:"; cat out.txt err.txt
    echo "expected in stderr: $msg"; exit 1
  fi
  echo "ok ($rc): $(head -n 1 err.txt)"
}
fails 1 "examoe-plot: cannot read 'nope.jsonl': no such file" nope.jsonl --out o
fails 1 "examoe-plot: 'pics' is a directory, not a metrics file" pics --out o
: > empty.jsonl
fails 1 "examoe-plot: 'empty.jsonl' is empty: no JSON lines" empty.jsonl --out o
printf '\n  \n' > blank.jsonl
fails 1 "'blank.jsonl' is empty" blank.jsonl --out o
{ head -n 2 hand.jsonl; echo 'step 6 loss 2.0'; } > notjson.jsonl
fails 1 "examoe-plot: notjson.jsonl line 3: not JSON: Expecting value" notjson.jsonl --out o
{ head -n 2 hand.jsonl; head -n 3 hand.jsonl | tail -n 1 | head -c 40; } > cut.jsonl
fails 1 "cut.jsonl line 3: not JSON: " cut.jsonl --out o
contains err.txt "(the last line, without its newline: was the run stopped while writing it?)"
printf '\xff\xfe\n' > binary.jsonl
fails 1 "binary.jsonl line 1: not JSON: 'utf-8' codec can't decode" binary.jsonl --out o
echo '[1, 2]' > array.jsonl
fails 1 "array.jsonl line 1: not a JSON object" array.jsonl --out o
echo '{"name":"bench","tokens_per_s":5}' > bench.jsonl
fails 1 "bench.jsonl line 1: not a record of \`examoe train --log.metrics\` (keys: name, tokens_per_s)" bench.jsonl --out o
sed '3s/"loss":2.5/"loss":"2.5"/' hand.jsonl > strloss.jsonl
fails 1 "strloss.jsonl line 3: field 'loss' is \"2.5\", not a number" strloss.jsonl --out o
sed '1s/"bytes_moved":100,//' hand.jsonl > nobytes.jsonl
fails 1 "nobytes.jsonl line 1: field 'bytes_moved' is missing, not an integer" nobytes.jsonl --out o
sed '1s/\[\[3,1\]\]/[[3,1],[2]]/' hand.jsonl > ragged.jsonl
fails 1 "ragged.jsonl line 1: field 'tokens_per_expert' is not a list (one per layer) of equally long lists" ragged.jsonl --out o
sed '3s/\[\[2,2\]\]/[[1,1,2]]/' hand.jsonl > shape.jsonl
fails 1 "shape.jsonl line 3: tokens_per_expert has 1 layers x 3 experts, the run's first record 1 x 2" shape.jsonl --out o
sed '1s/"router":0.001/"router":true/' hand.jsonl > phase.jsonl
fails 1 "phase.jsonl line 1: moe_phase_s: field 'router' is true, not a number" phase.jsonl --out o
sed '2s/"from":0/"from":"a"/' hand.jsonl > moved.jsonl
fails 1 "moved.jsonl line 2: field 'moved' is not a list of" moved.jsonl --out o
[ ! -e o ] || { echo "FAIL: --out was created for bad input"; exit 1; }

step "4b. outputs"
echo 'not a directory' > afile
fails 1 "examoe-plot: --out 'afile' exists and is not a directory" hand.jsonl --out afile
[ "$(cat afile)" = 'not a directory' ]
mkdir -p inside && cp hand.jsonl inside/loss.png
sum=$(sha256sum < inside/loss.png)
fails 1 "examoe-plot: 'inside/loss.png' is the input 'inside/loss.png': refused" inside/loss.png --out inside
ln -s ../hand.jsonl inside/imbalance.png
sum2=$(sha256sum < hand.jsonl)
fails 1 "'inside/imbalance.png' is the input 'hand.jsonl': refused" hand.jsonl --out inside
[ "$(sha256sum < inside/loss.png)" = "$sum" ] && [ "$(sha256sum < hand.jsonl)" = "$sum2" ]
[ "$(ls -A inside | sort | tr '\n' ' ')" = "imbalance.png loss.png " ]
fails 2 "the following arguments are required: metrics" --out o
fails 2 "--dpi 0: not in 10..1000" hand.jsonl --out o --dpi 0
mkdir -p nompl/matplotlib && echo 'raise ImportError("No module named matplotlib (test)")' > nompl/matplotlib/__init__.py
PYTHONPATH=$tmp/nompl fails 1 "examoe-plot: needs matplotlib and numpy" hand.jsonl --out o
contains err.txt "apt-get install python3-matplotlib"
PYTHONPATH=$tmp/nompl "$plot" hand.jsonl | grep -v '^rounding: ' | cmp - hand.expected   # the summary needs none
[ ! -e o ]
"$plot" --help > help.txt && contains help.txt "tokens_per_expert.png"
"$plot" --version > version.txt && contains version.txt "examoe-plot 0"
echo "plot.examoe_plot: all checks passed"
