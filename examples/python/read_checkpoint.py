#!/usr/bin/python3
"""Read an ExaMoE checkpoint with h5py and numpy, and run its model's forward pass.

Written from docs/checkpoint-format.md and docs/model.md alone: no ExaMoE code is used, so this
file is also the proof that those pages are enough to use a checkpoint outside ExaMoE.

As a module (examples/python/ on sys.path):

    import read_checkpoint as rc
    ck = rc.load("checkpoints/step-00003000.h5")
    ck.params["block0.attn.wq"]        # numpy array [d][d], named as in docs/model.md
    ck.params["layer0.w1"][e]          # expert e of MoE layer 0, [d][h], by global expert id
    ck.params["block0.moe.shared.w1"]  # block 0's shared experts side by side, [d][N hs] (if any)
    ck.placement[l][e], ck.slot(l, e)  # the expert-parallel rank that held it, its slot there
    ck.tokens_per_expert[l][e]         # assignments routed to it since step 0
    ck.config["model.top_k"]           # every config key, as text
    logits = rc.forward(ck, tokens)    # int [n][s] (s <= seq_len) -> float64 [n][s][V]

As a command:

    read_checkpoint.py CHECKPOINT                  the header, model, parameters, placement
    read_checkpoint.py CHECKPOINT --text "12+34="  the next-token prediction after each prefix
    read_checkpoint.py CHECKPOINT --input IN.h5 --compare LOGITS.h5
        the logits of IN.h5's dataset 'tokens' compared with those `examoe eval` wrote

Errors (not a checkpoint, a missing or misshapen parameter, bad tokens) raise CheckpointError;
the command prints them as one line `read_checkpoint: ...` and exits with status 1.
"""
import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import h5py
import numpy as np

HEADER_BYTES = 512
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class CheckpointError(Exception):
    """A file that is not a checkpoint this reader can use, or input the model cannot take."""


@dataclass
class ModelShape:
    """The `model.*` keys of docs/model.md, from the checkpoint's /config."""
    V: int  # vocabulary: the rows of embed.wte
    d: int
    L: int
    H: int
    S: int
    E: int
    k: int
    h: int
    activation: str  # gelu or swiglu
    shared: int      # shared experts per block (model.num_shared_experts; absent: 0)
    hs: int          # hidden width of each (model.shared_hidden; absent or 0: h)
    temperature: float
    renormalize: bool
    eps: float
    score: str = "softmax"   # router scores: softmax or sigmoid
    groups: int = 0          # group-limited routing: groups (0 = the writer's ep ranks)
    topk_groups: int = 0     # groups a token may use (0 = no limit)


@dataclass
class Checkpoint:
    path: str
    header: dict             # the text header's key/value lines (format, bytes, checksum, run)
    attrs: dict              # root attributes (step, precision, world_size, dp, ep, ...)
    config: dict             # every config key -> its value as text
    model: ModelShape
    params: dict             # parameter name -> numpy array
    placement: np.ndarray    # int [L][E]: owner (expert-parallel rank) of each expert
    tokens_per_expert: np.ndarray  # int64 [L][E]
    placement_history: list  # one dict per migration
    router_bias: np.ndarray = None  # double [L][E] selection bias (model.router.bias_rate > 0), or None

    def slot(self, layer, expert):
        """The expert's local index on its owner: its rank among the experts that rank owns,
        by increasing global id (how the owner stores its local experts)."""
        row = self.placement[layer]
        return int(np.count_nonzero(row[:expert] == row[expert]))

    def world_ranks(self, layer, expert):
        """World ranks that held the expert: ep rank r is world ranks r, r + ep, ... (dp copies)."""
        ep, world = int(self.attrs["ep"]), int(self.attrs["world_size"])
        return list(range(int(self.placement[layer][expert]), world, ep))


# ---- reading ---------------------------------------------------------------------------------

def read_header(path):
    """The checks of docs/checkpoint-format.md, "Header", before HDF5 opens the file (the
    whole-file checksum is left to tests/integration/docs/check_format.py: it is slow in Python)."""
    if not os.path.exists(path):
        raise CheckpointError(f"'{path}' does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"'{path}' is not a regular file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        block = f.read(HEADER_BYTES)
    if block.startswith(HDF5_SIGNATURE):
        raise CheckpointError(f"'{path}' is an HDF5 file without ExaMoE's header: not an ExaMoE "
                              "checkpoint (or one of format version 1)")
    if size < HEADER_BYTES or not block.startswith(b"EXAMOE CHECKPOINT\n"):
        raise CheckpointError(f"'{path}' is not an ExaMoE checkpoint (no 'EXAMOE CHECKPOINT' header)")
    lines = block.split(b"\0", 1)[0].decode("ascii", "replace").split("\n")[1:]
    header = dict(line.split(" ", 1) for line in lines if " " in line)
    if header.get("format") != "2":
        raise CheckpointError(f"'{path}': checkpoint format {header.get('format')!r}; this reader knows format 2")
    if header.get("bytes") != str(size):
        raise CheckpointError(f"'{path}' has {size} bytes, its header says {header.get('bytes')} "
                              "(truncated or appended to)")
    return header


def _text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def model_shape(config, V):
    def need(key):
        if key not in config:
            raise CheckpointError(f"/config has no key '{key}'")
        return config[key]
    try:
        m = _model_shape(need, V, config)
        # keys recorded only when set (docs/checkpoint-format.md): absent = their default
        m.score = config.get("model.router.score", "softmax")
        m.groups = int(config.get("model.router.groups", "0"))
        m.topk_groups = int(config.get("model.router.topk_groups", "0"))
        return m
    except ValueError as e:
        raise CheckpointError(f"/config holds a model key that is not a number: {e}")


def _model_shape(need, V, config):
    h = int(need("model.d_hidden"))
    # Keys added later are stored only when set: absent, they hold their defaults.
    shared, hs = int(config.get("model.num_shared_experts", 0)), int(config.get("model.shared_hidden", 0)) or h
    return ModelShape(
        V=V, d=int(need("model.d_model")), L=int(need("model.n_layers")), H=int(need("model.n_heads")),
        S=int(need("model.seq_len")), E=int(need("model.num_experts")), k=int(need("model.top_k")),
        h=h, activation=need("model.activation"), shared=shared, hs=hs,
        temperature=float(need("model.router.temperature")),
        renormalize=need("model.router.renormalize") == "true", eps=float(need("model.norm_eps")))


def parameter_table(m):
    """(name, shape) of every parameter, docs/model.md "Shapes and names"."""
    t = [("embed.wte", (m.V, m.d)), ("embed.wpe", (m.S, m.d))]
    for l in range(m.L):
        b = f"block{l}."
        t += [(b + "attn_norm", (m.d,))] + [(b + "attn.w" + x, (m.d, m.d)) for x in "qkvo"]
        t += [(b + "moe_norm", (m.d,)), (b + "moe.router", (m.d, m.E))]
    t += [("final_norm", (m.d,)), ("lm_head", (m.d, m.V))]
    for l in range(m.L):  # shared experts: their N hidden blocks side by side (docs/model.md)
        if m.shared > 0:
            b, w = f"block{l}.moe.shared.", m.shared * m.hs
            t += [(b + "w1", (m.d, w)), (b + "w2", (w, m.d))] + ([(b + "w3", (m.d, w))] if m.activation == "swiglu" else [])
    for l in range(m.L):
        t += [(f"layer{l}.w1", (m.E, m.d, m.h)), (f"layer{l}.w2", (m.E, m.h, m.d))]
        if m.activation == "swiglu":
            t += [(f"layer{l}.w3", (m.E, m.d, m.h))]
    return t


def _dataset(f, path, shape, what):
    if path not in f or not isinstance(f[path], h5py.Dataset):
        raise CheckpointError(f"'{f.filename}' has no {what} '{path}'")
    a = f[path][()]
    if a.shape != shape:
        raise CheckpointError(f"'{f.filename}': {what} '{path}' has shape {list(a.shape)}; the model's is {list(shape)}")
    return a


def load(path):
    """Everything a checkpoint holds except the AdamW moments."""
    header = read_header(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"'{path}': HDF5 cannot open it ({e})")
    with f:
        attrs = {k: (_text(v) if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        if int(attrs.get("format_version", 0)) != 2:
            raise CheckpointError(f"'{path}': format_version {attrs.get('format_version')}, expected 2")
        if "config" not in f:
            raise CheckpointError(f"'{path}' has no group /config")
        config = {k: _text(v) for k, v in f["config"].attrs.items()}
        if "params/embed.wte" not in f:
            raise CheckpointError(f"'{path}' has no parameter 'params/embed.wte'")
        m = model_shape(config, int(f["params/embed.wte"].shape[0]))
        params = {name: _dataset(f, "params/" + name, shape, "parameter") for name, shape in parameter_table(m)}
        placement = _dataset(f, "placement", (m.L, m.E), "table")
        tokens = _dataset(f, "tokens_per_expert", (m.L, m.E), "table")
        history = json.loads(attrs.pop("placement_history", "[]"))
        bias = _dataset(f, "router_bias", (m.L, m.E), "table") if "router_bias" in f else None
        if m.topk_groups > 0 and m.groups == 0:
            m.groups = int(attrs["ep"])  # one group per expert-parallel rank of the writer
    return Checkpoint(path, header, attrs, config, m, params, placement, tokens, history, bias)


# ---- the forward pass, docs/model.md "Forward" and docs/moe-layer.md ---------------------------

def rmsnorm(x, g, eps):
    return x * g / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def softmax(u, axis=-1):
    e = np.exp(u - np.max(u, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(a, wq, wk, wv, wo, H):
    """Causal multi-head attention without biases; a: [n][s][d]."""
    n, s, d = a.shape
    dh = d // H

    def heads(w):  # [n][s][d] -> [n][H][s][dh]: head j takes columns [j dh, (j+1) dh)
        return (a @ w).reshape(n, s, H, dh).transpose(0, 2, 1, 3)
    q, key, val = heads(wq), heads(wk), heads(wv)
    scores = q @ key.transpose(0, 1, 3, 2) / np.sqrt(dh)          # [n][H][s][s]
    scores = np.where(np.tril(np.ones((s, s), dtype=bool)), scores, -np.inf)
    o = softmax(scores) @ val                                     # [n][H][s][dh]
    return o.transpose(0, 2, 1, 3).reshape(n, s, d) @ wo


_erf = np.vectorize(math.erf, otypes=[np.float64])


def expert(x, w1, w2, w3, activation):
    """One expert's MLP on rows x [T][d]."""
    s = x @ w1
    if activation == "gelu":
        a = s / 2 * (1 + _erf(s / np.sqrt(2)))
    else:  # swiglu: silu(x W1) * (x W3)
        a = s / (1 + np.exp(-s)) * (x @ w3)
    return a @ w2


def route(x, wr, m, bias=None):
    """Top-k experts (descending, ties to the lower id) and gates per token, no jitter:
    softmax or sigmoid scores; the selection bias and the group limit choose, never weigh."""
    u = (x @ wr) / m.temperature
    s = softmax(u) if m.score == "softmax" else 1 / (1 + np.exp(-u))
    key = s if bias is None else s + bias
    if m.topk_groups > 0:  # groups: contiguous blocks, the first E % G one larger
        sizes = [m.E // m.groups + (g < m.E % m.groups) for g in range(m.groups)]
        first = np.concatenate([[0], np.cumsum(sizes)])
        score = np.stack([np.sort(key[:, first[g]:first[g + 1]], axis=1)[:, ::-1][:, :2].sum(axis=1)
                          for g in range(m.groups)], axis=1)
        chosen = np.argsort(-score, axis=1, kind="stable")[:, :m.topk_groups]
        group = np.repeat(np.arange(m.groups), sizes)
        allowed = (group[None, :, None] == chosen[:, None, :]).any(axis=2)
        key = np.where(allowed, key, -np.inf)
    top = np.argsort(-key, axis=1, kind="stable")[:, :m.k]
    gates = np.take_along_axis(s, top, axis=1)
    if m.renormalize:
        gates = gates / gates.sum(axis=1, keepdims=True)
    return top, gates


def moe(x, wr, w1, w2, w3, m, bias=None):
    """out[t] = sum_j g[t][j] y_{e[t][j]}(x[t]), summed in order j = 0..k-1; x: [T][d]."""
    top, gates = route(x, wr, m, bias)
    out = np.zeros_like(x)
    for j in range(m.k):
        for e in np.unique(top[:, j]):
            rows = top[:, j] == e
            y = expert(x[rows], w1[e], w2[e], None if w3 is None else w3[e], m.activation)
            out[rows] += gates[rows, j, None] * y
    return out


def check_tokens(tokens, m):
    t = np.asarray(tokens)
    if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer):
        raise CheckpointError(f"tokens must be a 2-D integer array [sequences][positions], got {t.dtype} {list(t.shape)}")
    if not 0 < t.shape[1] <= m.S:
        raise CheckpointError(f"sequences of {t.shape[1]} tokens; the model takes 1 to seq_len = {m.S}")
    bad = np.argwhere((t < 0) | (t >= m.V))
    if len(bad):
        i, j = bad[0]
        raise CheckpointError(f"token {t[i, j]} outside [0, {m.V}) at [{i}][{j}] (the first of {len(bad)} bad "
                              + ("value)" if len(bad) == 1 else "values)"))
    return t


def forward(ck, tokens, dtype=np.float64):
    """Next-token logits [n][s][V] for tokens [n][s], s <= seq_len. Attention is causal, so the
    logits of a prefix are those of any sequence it starts. Computed in `dtype` (ExaMoE computes
    in the checkpoint's precision)."""
    m, P = ck.model, {k: v.astype(dtype) for k, v in ck.params.items()}
    t = check_tokens(tokens, m)
    n, s = t.shape
    x = P["embed.wte"][t] + P["embed.wpe"][:s]
    for l in range(m.L):
        b = f"block{l}."
        a = rmsnorm(x, P[b + "attn_norm"], m.eps)
        r = x + attention(a, P[b + "attn.wq"], P[b + "attn.wk"], P[b + "attn.wv"], P[b + "attn.wo"], m.H)
        y = rmsnorm(r, P[b + "moe_norm"], m.eps).reshape(n * s, m.d)
        w3 = P.get(f"layer{l}.w3")
        bias = None if ck.router_bias is None else ck.router_bias[l].astype(dtype)
        out = moe(y, P[b + "moe.router"], P[f"layer{l}.w1"], P[f"layer{l}.w2"], w3, m, bias)
        if m.shared > 0:  # out = routed(y) + sum_s shared_s(y), each shared expert an expert MLP
            for j in range(m.shared):
                c = slice(j * m.hs, (j + 1) * m.hs)
                sw3 = P.get(b + "moe.shared.w3")
                out = out + expert(y, P[b + "moe.shared.w1"][:, c], P[b + "moe.shared.w2"][c, :],
                                   None if sw3 is None else sw3[:, c], m.activation)
        x = r + out.reshape(n, s, m.d)
    return rmsnorm(x, P["final_norm"], m.eps) @ P["lm_head"]


# ---- the command ------------------------------------------------------------------------------

def summary(ck):
    m, a = ck.model, ck.attrs
    out = [f"{ck.path}: step {a['step']}, {a['precision']}, written by {a['world_size']} ranks "
           f"(dp {a['dp']} x ep {a['ep']}), {a.get('producer', '?')}",
           f"model: V {m.V}, d {m.d}, L {m.L}, H {m.H}, S {m.S}, E {m.E}, k {m.k}, h {m.h}, {m.activation}"
           + (f", {m.shared} shared experts of h {m.hs}" if m.shared else "") + "; "
           f"router temperature {m.temperature:g}, renormalize {str(m.renormalize).lower()}; eps {m.eps:g}",
           f"parameters: {len(ck.params)} tensors, {sum(v.size for v in ck.params.values())} values"]
    out += [f"  {name:20s} {list(v.shape)}" for name, v in ck.params.items()]
    out.append("placement: expert -> ep rank/slot, and tokens routed to it since step 0")
    for l in range(m.L):
        cells = [f"e{e} r{ck.placement[l][e]}/s{ck.slot(l, e)} {ck.tokens_per_expert[l][e]}" for e in range(m.E)]
        out.append(f"  layer {l}: " + " | ".join(cells))
    last = f" (last at step {ck.placement_history[-1]['step']})" if ck.placement_history else ""
    out.append(f"migrations: {len(ck.placement_history)}{last}")
    return "\n".join(out)


def predict_text(ck, text):
    t = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)[None, :]
    best = forward(ck, t).argmax(axis=-1)[0]
    return "\n".join(f"  {text[:i + 1]!r} -> {bytes([int(b)])!r}" for i, b in enumerate(best))


def compare(ck, input_path, logits_path, dtype, tolerance):
    """Our logits of input_path's 'tokens' against `examoe eval`'s; returns (report, ok)."""
    try:
        with h5py.File(input_path, "r") as f:
            tokens = f["tokens"][()]
        with h5py.File(logits_path, "r") as f:
            theirs = f["logits"][()].astype(np.float64)
    except (OSError, KeyError) as e:
        raise CheckpointError(f"cannot read '{input_path}' dataset 'tokens' or '{logits_path}' dataset 'logits': {e}")
    ours = forward(ck, tokens, dtype)
    if ours.shape != theirs.shape:
        raise CheckpointError(f"logits of shape {list(ours.shape)} here, {list(theirs.shape)} in '{logits_path}'")
    diff = np.abs(ours - theirs)
    scale = float(np.max(np.abs(theirs)))
    big = np.abs(theirs) > 0.01 * scale  # elementwise relative error where it means something
    rel = float(np.max(diff[big] / np.abs(theirs[big]))) if big.any() else 0.0
    worst = float(diff.max()) / scale if scale > 0 else float(diff.max())
    ok = worst <= tolerance
    report = (f"logits {list(ours.shape)}: max abs difference {diff.max():.3g} (logits' scale {scale:.3g}: "
              f"{worst:.3g} of it), max relative difference {rel:.3g} (|logit| > 1 % of the scale); "
              f"tolerance {tolerance:g} of the scale: {'ok' if ok else 'EXCEEDED'}")
    return report, ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="an ExaMoE checkpoint (step-<N>.h5)")
    ap.add_argument("--text", help="print the predicted next token after each prefix of TEXT (as bytes)")
    ap.add_argument("--input", help="HDF5 file with dataset 'tokens' [N][seq_len] (as for examoe eval)")
    ap.add_argument("--compare", help="HDF5 file with dataset 'logits' written by examoe eval for --input")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision of the forward")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="--compare: largest difference allowed, as a fraction of the largest |logit|")
    args = ap.parse_args(argv)
    if bool(args.input) != bool(args.compare):
        ap.error("--input and --compare go together")
    try:
        ck = load(args.checkpoint)
        if args.input:
            report, ok = compare(ck, args.input, args.compare, np.dtype(args.dtype), args.tolerance)
            print(report)
            return 0 if ok else 1
        print(summary(ck))
        if args.text is not None:
            print(f"next token after each prefix of {args.text!r}:\n" + predict_text(ck, args.text))
    except CheckpointError as e:
        print(f"read_checkpoint: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
