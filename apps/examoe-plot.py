#!/usr/bin/env python3
"""examoe-plot: pictures and a text summary of one `examoe train --log.metrics FILE` run.

    examoe-plot run.jsonl --out DIR     (without --out: only the summary)

Reads the JSON lines of the run (progress records, migration and non-finite events, the summary
record), prints a summary of them to stdout and writes loss.png, accuracy.png,
tokens_per_expert.png, imbalance.png, phase_time.png and bytes_moved.png into DIR (created if
missing). A picture whose records are absent is skipped and said so; the input is only read.
The records, the pictures and the messages: docs/metrics.md.
"""
import argparse
import json
import math
import os
import sys
import tempfile

EXAMOE_VERSION = "source tree"  # CMake writes the project's version into the installed copy
PHASES = ["router", "plan", "pack", "alltoall", "experts", "combine",
          "bwd_combine", "bwd_alltoall", "bwd_experts", "bwd_router"]
ROUNDING = ("rounding: losses and imbalance to 4 decimals, accuracy in % to 1 decimal, "
            "phase times in ms to 3 decimals, seconds to 4 decimals, bytes exact (means to 1 decimal)")


class PlotError(Exception):
    """A problem with the input or the output directory, reported as `examoe-plot: ...`."""


# ---------------------------------------------------------------------------------------------
# Reading the JSON lines

def _number(rec, key, where, required=True):
    """rec[key] as a float (JSON null, which is how NaN and Inf are written, is NaN)."""
    if key not in rec:
        if required:
            raise PlotError(f"{where}: field '{key}' is missing")
        return None
    v = rec[key]
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PlotError(f"{where}: field '{key}' is {json.dumps(v)[:40]}, not a number")
    return float(v)


def _integer(rec, key, where):
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlotError(f"{where}: field '{key}' is {'missing' if key not in rec else json.dumps(v)[:40]}"
                        ", not an integer")
    return v


def _progress(rec, where):
    """The fields of a progress record the plots and the summary use, checked."""
    p = {"step": _integer(rec, "step", where), "bytes_moved": _integer(rec, "bytes_moved", where)}
    for key in ("loss", "imbalance"):
        p[key] = _number(rec, key, where)
    for key in ("ce", "aux", "z", "val_loss", "val_accuracy", "peak_rss_bytes"):
        p[key] = _number(rec, key, where, required=False)
    tpe = rec.get("tokens_per_expert")
    if (not isinstance(tpe, list) or not tpe
            or not all(isinstance(row, list) and row for row in tpe)
            or not all(isinstance(t, int) and not isinstance(t, bool) for row in tpe for t in row)
            or len({len(row) for row in tpe}) != 1):
        raise PlotError(f"{where}: field 'tokens_per_expert' is not a list (one per layer) of equally "
                        "long lists of integers (one per expert)")
    p["tokens_per_expert"] = tpe
    phases = rec.get("moe_phase_s")
    if not isinstance(phases, dict):
        raise PlotError(f"{where}: field 'moe_phase_s' is not an object of seconds per phase")
    p["phase_s"] = {name: _number(phases, name, f"{where}: moe_phase_s") for name in phases}
    return p


def _migration(rec, where):
    m = {"step": _integer(rec, "step", where), "layer": _integer(rec, "layer", where),
         "imbalance_before": _number(rec, "imbalance_before", where),
         "imbalance_after": _number(rec, "imbalance_after", where)}
    moved = rec.get("moved")
    if not isinstance(moved, list) or not all(
            isinstance(x, dict) and all(isinstance(x.get(k), int) for k in ("expert", "from", "to"))
            for x in moved):
        raise PlotError(f"{where}: field 'moved' is not a list of {{\"expert\", \"from\", \"to\"}}")
    m["moved"] = moved
    return m


def classify(rec, where):
    """(kind, checked fields) of one record: progress, migration, nonfinite or summary."""
    if not isinstance(rec, dict):
        raise PlotError(f"{where}: not a JSON object")
    if rec.get("summary") is True:
        return "summary", rec
    if rec.get("migration") is True:
        return "migration", _migration(rec, where)
    if "nonfinite" in rec:
        return "nonfinite", {"step": _integer(rec, "step", where), "what": str(rec["nonfinite"]),
                             "action": str(rec.get("action", "?"))}
    if "step" in rec and "loss" in rec:
        return "progress", _progress(rec, where)
    raise PlotError(f"{where}: not a record of `examoe train --log.metrics` "
                    f"(keys: {', '.join(sorted(rec))[:80]})")


def read_lines(path):
    """[(line number, record)] of the file; blank lines are passed over."""
    if not os.path.exists(path):
        raise PlotError(f"cannot read '{path}': no such file")
    if os.path.isdir(path):
        raise PlotError(f"'{path}' is a directory, not a metrics file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PlotError(f"cannot read '{path}': {e.strerror}")
    records = []
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path} line {n}"
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            cut = " (the last line, without its newline: was the run stopped while writing it?)" \
                if n == len(lines) else ""
            raise PlotError(f"{where}: not JSON: {e}{cut}")
        records.append((n, rec))
    if not records:
        raise PlotError(f"'{path}' is empty: no JSON lines (written by `examoe train --log.metrics FILE`)")
    return records


class Run:
    """The records of one run, in step order. A step that comes again (a run resumed from a
    checkpoint and appended to the same file) replaces the earlier records from that step on;
    after a summary record it starts a new run, which replaces everything before it."""

    def __init__(self):
        self.progress, self.migrations, self.nonfinite, self.summaries = [], [], [], []
        self.notes = []

    def _comes_again(self, kind, r):
        last_p = self.progress[-1]["step"] if self.progress else None
        if last_p is not None and r["step"] <= last_p:
            return True
        if kind == "migration" and self.migrations:
            last = self.migrations[-1]
            return (r["step"], r["layer"]) <= (last["step"], last["layer"])
        if kind == "nonfinite" and self.nonfinite:
            return r["step"] <= self.nonfinite[-1]["step"]
        return False

    def add(self, n, kind, r, path):
        if kind == "summary":
            self.summaries.append((n, r))
            return
        if self._comes_again(kind, r):
            s = r["step"]
            if self.summaries:
                notes = self.notes + [f"{path} line {n}: a new run starts (step {s} after the summary record of "
                                      f"line {self.summaries[-1][0]}); only the records from line {n} on are used"]
                self.__init__()
                self.notes = notes
            else:
                self.notes.append(f"{path} line {n}: step {s} comes again (a resumed run appended to the file); "
                                  f"its records replace the earlier ones from step {s} on")
                self.progress = [p for p in self.progress if p["step"] < s]
                self.migrations = [m for m in self.migrations if m["step"] < s]
                self.nonfinite = [x for x in self.nonfinite if x["step"] < s]
        {"progress": self.progress, "migration": self.migrations, "nonfinite": self.nonfinite}[kind].append(r)
        if kind == "progress":
            self._check_shape(n, r, path)

    def _check_shape(self, n, r, path):
        first = self.progress[0]["tokens_per_expert"]
        tpe = r["tokens_per_expert"]
        if (len(tpe), len(tpe[0])) != (len(first), len(first[0])):
            raise PlotError(f"{path} line {n}: tokens_per_expert has {len(tpe)} layers x {len(tpe[0])} experts, "
                            f"the run's first record {len(first)} x {len(first[0])}")

    def summary(self):
        return self.summaries[-1][1] if self.summaries else None


def read_run(path):
    run = Run()
    for n, rec in read_lines(path):
        kind, r = classify(rec, f"{path} line {n}")
        run.add(n, kind, r, path)
    return run


# ---------------------------------------------------------------------------------------------
# The summary (exact figures from the records, rounded as ROUNDING says)

def _finite(points):
    return [(s, v) for s, v in points if v is not None and not math.isnan(v)]


def _n(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _f(v, nd):
    return "nan" if v is None or math.isnan(v) else f"{v:.{nd}f}"


def _first_final_best(label, points, show, best):
    """"LABEL: first V (step S), final V (step S), best V (step S)"; best over finite values,
    the earliest step on ties."""
    (s0, v0), (s1, v1) = points[0], points[-1]
    fin = _finite(points)
    line = f"{label}: first {show(v0)} (step {s0}), final {show(v1)} (step {s1}), "
    if not fin:
        return line + "best none (no finite value)"
    sb, vb = fin[0]
    for s, v in fin[1:]:
        if (v < vb) if best == "min" else (v > vb):
            sb, vb = s, v
    return line + f"best {show(vb)} (step {sb})"


def _human_bytes(b):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024.0


def phase_names(progress):
    """The phases of the records: the order they run in, then any others by name."""
    seen = {name for p in progress for name in p["phase_s"]}
    return [n for n in PHASES if n in seen] + sorted(seen - set(PHASES))


def _progress_lines(P):
    lines = [_first_final_best("training loss", [(p["step"], p["loss"]) for p in P], lambda v: _f(v, 4), "min")]
    for key, label, show, best in (("ce", "training cross-entropy", lambda v: _f(v, 4), "min"),
                                   ("val_loss", "validation loss", lambda v: _f(v, 4), "min"),
                                   ("val_accuracy", "validation accuracy",
                                    lambda v: _f(100 * v, 1) + " %", "max")):
        pts = [(p["step"], p[key]) for p in P if p[key] is not None]
        if pts:
            lines.append(_first_final_best(label, pts, show, best))
    imb = _finite([(p["step"], p["imbalance"]) for p in P])
    if imb:
        smax, vmax = max(imb, key=lambda x: (x[1], -x[0]))
        lines.append(f"imbalance: mean {sum(v for _, v in imb) / len(imb):.4f} over {_n(len(imb), 'record')}, "
                     f"max {vmax:.4f} (step {smax}), final {_f(P[-1]['imbalance'], 4)} (step {P[-1]['step']})")
    names = phase_names(P)
    sums = {n: sum(p["phase_s"].get(n, 0.0) for p in P) for n in names}
    total = sum(sums.values())
    lines.append(f"MoE time per phase, summed over the {_n(len(P), 'logged step')} (rank 0, all layers), ms: "
                 + ", ".join(f"{n} {1e3 * sums[n]:.3f}" for n in names)
                 + f"; total {1e3 * total:.3f}, mean per logged step {1e3 * total / len(P):.3f}")
    b = [(p["step"], p["bytes_moved"]) for p in P]
    bmin, bmax = min(b, key=lambda x: (x[1], x[0])), max(b, key=lambda x: (x[1], -x[0]))
    lines.append(f"bytes moved per logged step (all ranks and layers): mean {sum(v for _, v in b) / len(b):.1f}, "
                 f"min {bmin[1]} (step {bmin[0]}), max {bmax[1]} (step {bmax[0]}), final {b[-1][1]} (step {b[-1][0]})")
    for layer in range(len(P[0]["tokens_per_expert"])):
        cum = [sum(p["tokens_per_expert"][layer][e] for p in P) for e in range(len(P[0]["tokens_per_expert"][0]))]
        lines.append(f"tokens per expert, layer {layer}: summed over the logged steps {cum}, "
                     f"final step {P[-1]['tokens_per_expert'][layer]} (step {P[-1]['step']})")
    rss = [(p["step"], int(p["peak_rss_bytes"])) for p in P if p["peak_rss_bytes"] is not None
           and not math.isnan(p["peak_rss_bytes"])]
    if rss:
        s, v = max(rss, key=lambda x: (x[1], -x[0]))
        lines.append(f"peak RSS: {v} bytes (step {s}; {_human_bytes(v)})")
    return lines


def _event_lines(run):
    M = run.migrations
    if not M:
        lines = ["migrations: none"]
    else:
        layers = sorted({m["layer"] for m in M})
        per_layer = ", ".join(f"layer {l}: {sum(m['layer'] == l for m in M)}" for l in layers)
        lines = [f"migrations: {len(M)} ({per_layer}), {_n(sum(len(m['moved']) for m in M), 'expert move')} in all"]
        for m in M[:20]:
            moves = ", ".join(f"{x['expert']} {x['from']}->{x['to']}" for x in m["moved"])
            lines.append(f"  step {m['step']} layer {m['layer']}: {_n(len(m['moved']), 'expert')} moved ({moves}), "
                         f"imbalance {_f(m['imbalance_before'], 4)} -> {_f(m['imbalance_after'], 4)}")
        if len(M) > 20:
            lines.append(f"  ... and {len(M) - 20} more")
    K = run.nonfinite
    lines.append("non-finite steps: none" if not K else
                 f"non-finite steps: {len(K)} (steps {', '.join(str(x['step']) for x in K)}; "
                 f"last: {K[-1]['what']}, {K[-1]['action']})")
    return lines


def _summary_record_line(s):
    if s is None:
        return "summary record: none (the run did not finish: stopped, killed, or still running)"
    num = lambda key: s.get(key) if isinstance(s.get(key), (int, float)) and not isinstance(s.get(key), bool) \
        else math.nan
    line = (f"summary record: {s.get('steps')} steps in {_f(num('seconds'), 4)} s, "
            f"{_f(num('tokens_per_s'), 1)} tokens/s, val loss {_f(num('val_loss_initial'), 4)} -> "
            f"{_f(num('val_loss_final'), 4)} (unigram entropy {_f(num('unigram_entropy'), 4)})")
    if "val_accuracy" in s:
        line += f", exact match {_f(100 * num('val_accuracy'), 1)} %"
    line += f", {_n(s.get('skipped_steps', 0), 'step')} skipped"
    if "stopped" in s:
        line += f", stopped ({s['stopped']})"
    return line


def summary_lines(run, path):
    P = run.progress
    head = (f"examoe-plot: {path}: {_n(len(P), 'progress record')}"
            + (f" (steps {P[0]['step']} to {P[-1]['step']})" if P else "")
            + f", {sum(p['val_loss'] is not None for p in P)} with validation, {_n(len(run.migrations), 'migration')}, "
            f"{_n(len(run.nonfinite), 'non-finite step')}, {_n(len(run.summaries), 'summary record')}")
    lines = [head, ROUNDING]
    if P:
        lines += _progress_lines(P)
    return lines + _event_lines(run) + [_summary_record_line(run.summary())]


# ---------------------------------------------------------------------------------------------
# The pictures: each returns (figure, None) or (None, why it was skipped)

def _figure(height=4.0):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8.0, height), layout="constrained")
    return fig


def _steps(P):
    return [p["step"] for p in P]


def _mark_nonfinite(ax, run):
    for i, x in enumerate(run.nonfinite):
        ax.axvline(x["step"], color="tab:red", lw=0.8, ls=":",
                   label="non-finite step" if i == 0 else None)


def _mark_migrations(ax, run, layer=None):
    shown = False
    for m in run.migrations:
        if layer is None or m["layer"] == layer:
            ax.axvline(m["step"], color="black", lw=0.8, ls="--", label=None if shown else "migration")
            shown = True


def plot_loss(run):
    P = run.progress
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(_steps(P), [p["loss"] for p in P], lw=1.2, label="training loss (cross-entropy + aux + z)")
    if all(p["ce"] is not None for p in P):
        ax.plot(_steps(P), [p["ce"] for p in P], lw=1.0, ls="-.", label="training cross-entropy")
    val = [(p["step"], p["val_loss"]) for p in P if p["val_loss"] is not None]
    if val:
        ax.plot(*zip(*val), marker="o", ms=4, lw=1.2, label="validation loss")
    s = run.summary()
    if s is not None and isinstance(s.get("unigram_entropy"), (int, float)):
        ax.axhline(s["unigram_entropy"], color="gray", lw=0.8, ls="--", label="unigram entropy")
    _mark_nonfinite(ax, run)
    ax.set(xlabel="step", ylabel="nats per token", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig, None


def plot_accuracy(run):
    acc = [(p["step"], 100 * p["val_accuracy"]) for p in run.progress if p["val_accuracy"] is not None]
    if not acc:
        return None, "no record has val_accuracy (only the built-in addition corpus has held-out problems)"
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(*zip(*acc), marker="o", ms=4, color="tab:green", label="validation exact match")
    ax.set(xlabel="step", ylabel="%", ylim=(-2, 102), title="Exact match on the held-out problems")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig, None


def _edges(steps):
    """Cell edges around each logged step (halfway to the neighbours)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [steps[0] - (mids[0] - steps[0])] + mids + [steps[-1] + (steps[-1] - mids[-1])]


def plot_tokens_per_expert(run):
    import numpy as np
    P = run.progress
    layers, experts = len(P[0]["tokens_per_expert"]), len(P[0]["tokens_per_expert"][0])
    t = np.array([p["tokens_per_expert"] for p in P], dtype=float)  # [step][layer][expert]
    fig = _figure(height=max(3.0, 1.2 + min(2.4, 0.25 * experts + 1.0) * layers))
    axes = fig.subplots(layers, 1, sharex=True, squeeze=False)[:, 0]
    x, y = _edges(_steps(P)), np.arange(experts + 1) - 0.5
    for l, ax in enumerate(axes):
        mesh = ax.pcolormesh(x, y, t[:, l, :].T, cmap="viridis", vmin=0, vmax=t.max() or 1)
        _mark_migrations(ax, run, l)
        moved = [(m["step"], x_["expert"]) for m in run.migrations if m["layer"] == l for x_ in m["moved"]]
        if moved:
            ax.plot(*zip(*moved), ls="none", marker="o", mfc="none", mec="red", mew=1.5, ms=7,
                    label="expert moved (after that step)")
        ax.set(ylabel=f"layer {l}\nexpert")
        if experts <= 16:
            ax.set_yticks(range(experts))
        fig.colorbar(mesh, ax=ax, label="tokens", pad=0.01)
    axes[0].set_title("Tokens routed to each expert (at each logged step)")
    axes[-1].set_xlabel("step")
    if run.migrations:
        handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
        axes[-1].legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.35),
                        ncol=2, fontsize="small")
    return fig, None


def plot_imbalance(run):
    pts = _finite([(p["step"], p["imbalance"]) for p in run.progress])
    if not pts:
        return None, "no record has a finite imbalance"
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(*zip(*pts), marker=".", lw=1.2, label="imbalance (worst layer)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="balanced")
    _mark_migrations(ax, run)
    ax.set(xlabel="step", ylabel="max / mean rows per rank", title="Rank imbalance of the expert rows")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig, None


def plot_phase_time(run):
    """Stacked bars at each logged step; a stacked area where there are too many for bars."""
    P = run.progress
    steps = _steps(P)
    fig = _figure(height=4.5)
    ax = fig.add_subplot()
    colors = __import__("matplotlib").colormaps["tab10"]
    names = phase_names(P)
    ms = [[1e3 * p["phase_s"].get(name, 0.0) for p in P] for name in names]
    if len(P) <= 120:
        width = 0.8 * (min(b - a for a, b in zip(steps, steps[1:])) if len(steps) > 1 else 1)
        bottom = [0.0] * len(P)
        for i, name in enumerate(names):
            ax.bar(steps, ms[i], width, bottom=bottom, label=name, color=colors(i % 10))
            bottom = [b + v for b, v in zip(bottom, ms[i])]
    else:
        ax.stackplot(steps, ms, labels=names, colors=[colors(i % 10) for i in range(len(names))])
    ax.set(xlabel="step", ylabel="ms", title="MoE time per phase at each logged step (rank 0, all layers)")
    ax.legend(ncol=5, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax.grid(alpha=0.3, axis="y")
    return fig, None


def plot_bytes_moved(run):
    P = run.progress
    b = [p["bytes_moved"] for p in P]
    scale, unit = next(((f, u) for f, u in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB"))
                        if max(b) >= f), (1, "B"))
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(_steps(P), [v / scale for v in b], marker=".", lw=1.2, color="tab:purple")
    _mark_migrations(ax, run)
    ax.set(xlabel="step", ylabel=unit, ylim=(0, None),
           title="Bytes sent by the forward all-to-alls per step (dispatch + combine, all ranks and layers)")
    ax.grid(alpha=0.3)
    if run.migrations:
        ax.legend()
    return fig, None


PLOTS = [("loss.png", plot_loss), ("accuracy.png", plot_accuracy),
         ("tokens_per_expert.png", plot_tokens_per_expert), ("imbalance.png", plot_imbalance),
         ("phase_time.png", plot_phase_time), ("bytes_moved.png", plot_bytes_moved)]


# ---------------------------------------------------------------------------------------------
# Writing, and the command

def prepare_out(out, inp):
    """Creates `out` if missing; refuses an output path that is the input."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PlotError(f"--out '{out}' exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise PlotError(f"cannot create --out '{out}': {e.strerror}")
    for name, _ in PLOTS:
        path = os.path.join(out, name)
        if os.path.exists(path) and os.path.samefile(path, inp):
            raise PlotError(f"'{path}' is the input '{inp}': refused, writing the plot would destroy it")


def save(fig, path, dpi):
    """Writes the PNG to a temporary name in the same directory, then renames it."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi, metadata={"Software": None})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would have made it
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_plots(run, out, dpi):
    """[(name, written size or None, why skipped)] for every picture."""
    results = []
    for name, plot in PLOTS:
        if not run.progress:
            results.append((name, None, "no progress records"))
            continue
        fig, why = plot(run)
        if fig is None:
            results.append((name, None, why))
            continue
        path = os.path.join(out, name)
        try:
            save(fig, path, dpi)
        except OSError as e:
            raise PlotError(f"cannot write '{path}': {e.strerror}")
        results.append((name, os.path.getsize(path), None))
    return results


def import_matplotlib():
    try:
        import matplotlib
        import numpy  # noqa: F401 (the heat maps)
    except ImportError as e:
        raise PlotError(f"needs matplotlib and numpy ({e}); Debian: apt-get install python3-matplotlib "
                        f"python3-numpy (cmake/dev.sh deps); this is {sys.executable}")
    matplotlib.use("Agg")


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="examoe-plot",
        description="PNGs and a text summary of the JSON lines `examoe train --log.metrics FILE` wrote.",
        epilog="Writes " + ", ".join(n for n, _ in PLOTS) + " into DIR (a picture whose records are "
               "absent is skipped and said so) and prints the summary to stdout. The input is never "
               "overwritten. Exit status 0, 1 on bad input or output, 2 on a usage error.")
    ap.add_argument("metrics", help="the metrics file (JSON lines) of one run")
    ap.add_argument("--out", metavar="DIR",
                    help="directory of the PNGs (created if missing); without it, only the summary is printed")
    ap.add_argument("--dpi", type=int, default=100, help="resolution of the PNGs (default 100: 800 pixels wide)")
    ap.add_argument("--version", action="version", version=f"examoe-plot {EXAMOE_VERSION}")
    args = ap.parse_args(argv)
    if not 10 <= args.dpi <= 1000:
        ap.error(f"--dpi {args.dpi}: not in 10..1000")
    return args


def main(argv):
    args = parse_args(argv)
    try:
        run = read_run(args.metrics)
        if args.out is not None:
            import_matplotlib()
            prepare_out(args.out, args.metrics)
        for note in run.notes:
            print(f"examoe-plot: note: {note}", file=sys.stderr)
        for line in summary_lines(run, args.metrics):
            print(line)
        if args.out is None:
            return 0
        for name, size, why in write_plots(run, args.out, args.dpi):
            path = os.path.join(args.out, name)
            print(f"wrote {path} ({size} bytes)" if why is None else f"skipped {path}: {why}")
    except PlotError as e:
        print(f"examoe-plot: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # the reader went away (`| head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
