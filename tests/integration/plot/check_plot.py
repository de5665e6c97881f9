#!/usr/bin/env python3
"""Checks examoe-plot's output against the metrics file, read here on its own (json only, none
of examoe-plot's code).

  check_plot.py summary METRICS PLOT_STDOUT [TRAIN_STDOUT]
      every figure examoe-plot printed equals the one computed here from the JSON lines, with
      the rounding it states; with TRAIN_STDOUT, also the figures `examoe train` printed itself
      (its progress lines and summary, C++ formatting of the same numbers)
  check_plot.py pngs DIR NAME...
      each DIR/NAME is a complete PNG (signature, chunk CRCs, IHDR, IDAT inflating to the
      size IHDR gives, IEND), 800 pixels wide, not of one colour, and no temporary file is left
"""
import json
import math
import os
import re
import struct
import sys
import zlib

PHASE_ORDER = ["router", "plan", "pack", "alltoall", "experts", "combine",
               "bwd_combine", "bwd_alltoall", "bwd_experts", "bwd_router"]


def fail(msg):
    print(f"check_plot: {msg}", file=sys.stderr)
    sys.exit(1)


def num(v):
    return math.nan if v is None else float(v)


def plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def fmt(v, nd):
    return "nan" if math.isnan(v) else f"{v:.{nd}f}"


def ffb(label, pts, nd, pct=False, best="min"):
    """The first/final/best line of (step, value) points."""
    show = (lambda v: fmt(100 * v, nd) + " %") if pct else (lambda v: fmt(v, nd))
    finite = [(s, v) for s, v in pts if not math.isnan(v)]
    pick = min if best == "min" else max
    vb = pick(v for _, v in finite)
    sb = next(s for s, v in finite if v == vb)  # the earliest step with the best value
    return (f"{label}: first {show(pts[0][1])} (step {pts[0][0]}), final {show(pts[-1][1])} "
            f"(step {pts[-1][0]}), best {show(vb)} (step {sb})")


def expected_lines(recs):
    """The summary lines examoe-plot must print for a file of one run (steps only increase)."""
    P = [r for r in recs if "loss" in r and "step" in r and not r.get("migration")]
    M = [r for r in recs if r.get("migration") is True]
    K = [r for r in recs if "nonfinite" in r]
    S = [r for r in recs if r.get("summary") is True]
    steps = [p["step"] for p in P]
    if steps != sorted(set(steps)):
        fail("the run's steps repeat: this checker reads files of one run only")
    out = {}
    out["training loss"] = ffb("training loss", [(p["step"], num(p["loss"])) for p in P], 4)
    out["training cross-entropy"] = ffb("training cross-entropy", [(p["step"], num(p["ce"])) for p in P], 4)
    val = [(p["step"], num(p["val_loss"])) for p in P if "val_loss" in p]
    out["validation loss"] = ffb("validation loss", val, 4)
    acc = [(p["step"], num(p["val_accuracy"])) for p in P if "val_accuracy" in p]
    if acc:
        out["validation accuracy"] = ffb("validation accuracy", acc, 1, pct=True, best="max")
    imb = [num(p["imbalance"]) for p in P]
    mx = max(imb)
    out["imbalance"] = (f"imbalance: mean {fmt(sum(imb) / len(imb), 4)} over {plural(len(imb), 'record')}, max {fmt(mx, 4)} "
                        f"(step {steps[imb.index(mx)]}), final {fmt(imb[-1], 4)} (step {steps[-1]})")
    tot = {n: 0.0 for n in PHASE_ORDER}
    for p in P:
        for n, v in p["moe_phase_s"].items():
            tot[n] += v
    all_ms = sum(tot.values()) * 1e3
    out["MoE time per phase"] = (
        f"MoE time per phase, summed over the {plural(len(P), 'logged step')} (rank 0, all layers), ms: "
        + ", ".join(f"{n} {tot[n] * 1e3:.3f}" for n in PHASE_ORDER)
        + f"; total {all_ms:.3f}, mean per logged step {all_ms / len(P):.3f}")
    b = [p["bytes_moved"] for p in P]
    out["bytes moved per logged step"] = (
        f"bytes moved per logged step (all ranks and layers): mean {sum(b) / len(b):.1f}, "
        f"min {min(b)} (step {steps[b.index(min(b))]}), max {max(b)} (step {steps[b.index(max(b))]}), "
        f"final {b[-1]} (step {steps[-1]})")
    for l in range(len(P[0]["tokens_per_expert"])):
        cum = [0] * len(P[0]["tokens_per_expert"][l])
        for p in P:
            cum = [c + t for c, t in zip(cum, p["tokens_per_expert"][l])]
        out[f"tokens per expert, layer {l}"] = (
            f"tokens per expert, layer {l}: summed over the logged steps {cum}, "
            f"final step {P[-1]['tokens_per_expert'][l]} (step {steps[-1]})")
    rss = [p["peak_rss_bytes"] for p in P]
    e = next(e for e in (4, 3, 2, 1, 0) if max(rss) >= 1024 ** e or e == 0)
    human = f"{max(rss)} B" if e == 0 else f"{max(rss) / 1024 ** e:.1f} {['', 'KiB', 'MiB', 'GiB', 'TiB'][e]}"
    out["peak RSS"] = f"peak RSS: {max(rss)} bytes (step {steps[rss.index(max(rss))]}; {human})"
    if M:
        layers = sorted({m["layer"] for m in M})
        out["migrations"] = (f"migrations: {len(M)} ("
                             + ", ".join(f"layer {l}: {sum(1 for m in M if m['layer'] == l)}" for l in layers)
                             + f"), {plural(sum(len(m['moved']) for m in M), 'expert move')} in all")
    else:
        out["migrations"] = "migrations: none"
    out["non-finite steps"] = ("non-finite steps: none" if not K else
                               f"non-finite steps: {len(K)} (steps {', '.join(str(k['step']) for k in K)}; "
                               f"last: {K[-1]['nonfinite']}, {K[-1]['action']})")
    s = S[-1]
    out["summary record"] = (
        f"summary record: {s['steps']} steps in {s['seconds']:.4f} s, {s['tokens_per_s']:.1f} tokens/s, "
        f"val loss {s['val_loss_initial']:.4f} -> {s['val_loss_final']:.4f} (unigram entropy "
        f"{s['unigram_entropy']:.4f})" + (f", exact match {100 * s['val_accuracy']:.1f} %" if "val_accuracy" in s else "")
        + f", {plural(s['skipped_steps'], 'step')} skipped")
    out["header"] = (f"{plural(len(P), 'progress record')} (steps {steps[0]} to {steps[-1]}), {len(val)} with "
                     f"validation, {plural(len(M), 'migration')}, {plural(len(K), 'non-finite step')}, "
                     f"{plural(len(S), 'summary record')}")
    return out, M


def check_summary(metrics, plot_out, train_out=None):
    recs = [json.loads(line) for line in open(metrics) if line.strip()]
    want, M = expected_lines(recs)
    lines = open(plot_out).read().splitlines()
    if not lines[0].startswith("examoe-plot: ") or not lines[0].endswith(want.pop("header")):
        fail(f"header line: {lines[0]!r}")
    for key, line in want.items():
        got = [x for x in lines if re.match(re.escape(key) + "[:, ]", x)]
        if got != [line]:
            fail(f"'{key}':\n  printed:  {got}\n  expected: {line!r}")
    detail = [x for x in lines if x.startswith("  step ")]
    if len(detail) != min(len(M), 20):
        fail(f"{len(detail)} migration lines printed, {len(M)} migrations in the file")
    for m, x in zip(M, detail):
        moves = ", ".join(f"{e['expert']} {e['from']}->{e['to']}" for e in m["moved"])
        line = (f"  step {m['step']} layer {m['layer']}: {plural(len(m['moved']), 'expert')} moved ({moves}), imbalance "
                f"{m['imbalance_before']:.4f} -> {m['imbalance_after']:.4f}")
        if x != line:
            fail(f"migration line\n  printed:  {x!r}\n  expected: {line!r}")
    print(f"check_plot: {len(want) + 1 + len(detail)} summary lines equal the JSON lines")
    if train_out:
        check_against_train(lines, open(train_out).read())


def check_against_train(lines, train):
    """examoe train's own printing (4 decimals, accuracy 1) of the same run agrees."""
    loss = {int(s): l for s, l in re.findall(r"^step +(\d+)/\d+ \| loss ([0-9.]+)", train, re.M)}
    summ = re.search(r"val loss ([0-9.]+) -> ([0-9.]+) nats.*?(?:% -> ([0-9.]+) %)?;", train)
    if not loss or not summ:
        fail("no progress lines or summary in the training output")
    tl = next(x for x in lines if x.startswith("training loss:"))
    for what, v, s in re.findall(r"(first|final|best) ([0-9.]+) \(step (\d+)\)", tl):
        if loss.get(int(s)) != v:
            fail(f"training loss {what} {v} at step {s}; examoe train printed {loss.get(int(s))}")
    sr = next(x for x in lines if x.startswith("summary record:"))
    m = re.search(r"val loss ([0-9.]+) -> ([0-9.]+)", sr)
    if m.groups() != summ.groups()[:2]:
        fail(f"summary val loss {m.groups()}; examoe train printed {summ.groups()[:2]}")
    if summ.group(3) is not None and f"exact match {summ.group(3)} %" not in sr:
        fail(f"summary accuracy: '{sr}'; examoe train printed {summ.group(3)} %")
    print(f"check_plot: training loss at {len(loss)} steps and the summary agree with examoe train's output")


def check_png(path):
    data = open(path, "rb").read()
    if len(data) == 0 or data[:8] != b"\x89PNG\r\n\x1a\n":
        fail(f"{path}: not a PNG ({len(data)} bytes)")
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        if pos + 12 > len(data):
            fail(f"{path}: truncated chunk at byte {pos}")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if len(body) != length or zlib.crc32(kind + body) != crc:
            fail(f"{path}: chunk {kind!r} at byte {pos}: bad length or CRC")
        chunks.append(kind)
        if kind == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", body[:10])
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    if chunks[0] != b"IHDR" or chunks[-1] != b"IEND" or b"IDAT" not in chunks:
        fail(f"{path}: chunks {chunks}")
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    raw = zlib.decompress(idat)
    if depth != 8 or channels is None or len(raw) != h * (1 + w * channels):
        fail(f"{path}: {w}x{h}, depth {depth}, colour {colour}: {len(raw)} bytes of pixels")
    if w != 800 or h < 300 or len(set(raw)) < 16:
        fail(f"{path}: {w}x{h} pixels, {len(set(raw))} distinct bytes (expected 800 wide and a picture)")
    return w, h, len(data)


def check_pngs(out, names):
    for name in names:
        w, h, n = check_png(os.path.join(out, name))
        print(f"check_plot: {name}: PNG {w}x{h}, {n} bytes")
    left = [f for f in os.listdir(out) if f.startswith(".")]
    if left:
        fail(f"temporary files left in {out}: {left}")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "summary":
        check_summary(*sys.argv[2:5])
    elif len(sys.argv) >= 4 and sys.argv[1] == "pngs":
        check_pngs(sys.argv[2], sys.argv[3:])
    else:
        fail(__doc__)
