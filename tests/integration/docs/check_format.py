#!/usr/bin/python3
"""An independent reader of ExaMoE checkpoints, written from docs/checkpoint-format.md and
docs/model.md alone (no ExaMoE code): it checks that the pages are exact.

usage: check_format.py INIT_CHECKPOINT TRAINED_CHECKPOINT [INIT_CHECKPOINT...]

INIT_CHECKPOINT is written by `examoe train --train.steps 0 --checkpoint.interval 1` (the
initial model); TRAINED_CHECKPOINT by a run with rebalancing. For both: the header and the
whole-file checksum, every dataset's examoe_checksum, the datasets that must not carry one,
the root attributes and the placement history keys. For the first: every parameter equals
the initial value the model page defines.
"""
import json
import sys

import h5py
import numpy as np

M = (1 << 64) - 1


def splitmix64(x):
    """docs/checkpoint-format.md, "splitmix64"."""
    x = (x + 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


def chunk_hash(data, c):
    n = len(data)
    h = splitmix64(c ^ 0x4578614D6F45)
    full = n // 8
    for i in range(full):
        h = splitmix64(h ^ int.from_bytes(data[8 * i:8 * i + 8], "little"))
    h = splitmix64(h ^ int.from_bytes(data[8 * full:].ljust(8, b"\0"), "little"))  # final word
    return splitmix64(h ^ n)


def check_header(path, raw):
    head = raw[:512].split(b"\0", 1)[0].decode()
    lines = head.split("\n")
    assert lines[0] == "EXAMOE CHECKPOINT", lines[0]
    kv = dict(line.split(" ", 1) for line in lines[1:] if line)
    assert kv["format"] == "2", kv
    size, chunk = int(kv["bytes"]), int(kv["chunk"])
    assert size == len(raw), (size, len(raw))
    body = raw[512:]
    total = sum(chunk_hash(body[o:o + chunk], c) for c, o in enumerate(range(0, len(body), chunk))) & M
    want = int(kv["checksum"], 16)
    got = splitmix64(total ^ size)
    assert got == want, f"{path}: whole-file checksum {got:016x} per the page, header says {want:016x}"
    return len(body)


def tensor_checksum(a):
    """sum over row-major i of splitmix64(i * 0x9E3779B97F4A7C15 ^ bits(x_i) ^ 0xC0FFEE)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    bits = flat.view(np.uint32 if flat.dtype == np.float32 else np.uint64)
    s = 0
    for i, b in enumerate(bits.tolist()):
        s += splitmix64(((i * 0x9E3779B97F4A7C15) & M) ^ b ^ 0xC0FFEE)
    return s & M


def check_checksums(f):
    tensors = 0
    for group in ("params", "adam_m", "adam_v"):
        for name, ds in f[group].items():
            want = int(ds.attrs["examoe_checksum"])
            got = tensor_checksum(ds[()])
            assert got == want, f"/{group}/{name}: checksum {got} per the page, file says {want}"
            tensors += 1
    for name in ("placement", "tokens_per_expert", "expert_load_ema"):
        if name in f:
            assert "examoe_checksum" not in f[name].attrs, f"/{name} carries a checksum the page does not list"
    return tensors


def uniform01(h):
    return ((h >> 11) + 0.5) / 9007199254740992.0


def hash_key(a, b, c, d):
    return splitmix64(splitmix64(splitmix64(splitmix64(a) ^ b) ^ c) ^ d)


def dense_parameters(d, L, S, E, V, shared=0, hs=0, swiglu=False):
    """(name, shape, init scale or None for ones), in parameter-id order (docs/model.md); the
    shared experts (`shared` of width `hs`) come after every other dense parameter."""
    sd = 1.0 / np.sqrt(d)
    p = [("embed.wte", (V, d), 1.0), ("embed.wpe", (S, d), 1.0)]
    for l in range(L):
        b = f"block{l}."
        p += [(b + "attn_norm", (d,), None)]
        p += [(b + "attn.w" + x, (d, d), sd) for x in "qkvo"]
        p += [(b + "moe_norm", (d,), None), (b + "moe.router", (d, E), sd)]
    p += [("final_norm", (d,), None), ("lm_head", (d, V), sd)]
    if shared > 0:
        w = shared * hs
        for l in range(L):
            b = f"block{l}.moe.shared."
            p += [(b + "w1", (d, w), sd), (b + "w2", (w, d), 1.0 / np.sqrt(hs))]
            if swiglu:
                p += [(b + "w3", (d, w), sd)]
    return p


def check_init(f):
    cfg = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f["config"].attrs.items()}
    d, L, S = int(cfg["model.d_model"]), int(cfg["model.n_layers"]), int(cfg["model.seq_len"])
    E, h, seed = int(cfg["model.num_experts"]), int(cfg["model.d_hidden"]), int(cfg["train.seed"])
    swiglu = cfg["model.activation"] == "swiglu"
    dtype = np.float32 if f.attrs["precision"] in (b"float", "float") else np.float64
    checked = 0
    V = int(cfg.get("model.vocab_size", 256))  # stored only when it is not 256
    shared = int(cfg.get("model.num_shared_experts", 0))  # stored only when set
    hs = int(cfg.get("model.shared_hidden", 0)) or h
    for pid, (name, shape, scale) in enumerate(dense_parameters(d, L, S, E, V, shared, hs, swiglu)):
        n = int(np.prod(shape))
        if scale is None:
            want = np.ones(n)
        else:
            want = np.array([scale * (2 * uniform01(hash_key(seed, 0xF5D9, pid, i)) - 1) for i in range(n)])
        got = f["params"][name][()].reshape(-1)
        assert np.array_equal(got, want.astype(dtype)), f"/params/{name} differs from the page's init"
        checked += 1
    for l in range(L):
        lseed = (seed + 1000003 * (l + 1)) & M
        tensors = [("w1", 2, (d, h), 1 / np.sqrt(d)), ("w2", 3, (h, d), 1 / np.sqrt(h))]
        if swiglu:
            tensors.append(("w3", 4, (d, h), 1 / np.sqrt(d)))
        for name, tid, shape, scale in tensors:
            got = f["params"][f"layer{l}.{name}"][()]
            assert got.shape == (E,) + shape, got.shape
            n = shape[0] * shape[1]
            for e in range(E):
                want = np.array([scale * (2 * uniform01(hash_key(lseed, tid, e, i)) - 1) for i in range(n)])
                assert np.array_equal(got[e].reshape(-1), want.astype(dtype)), \
                    f"/params/layer{l}.{name} expert {e} differs from the page's init"
            checked += 1
    return checked


def check_history(f):
    hist = f.attrs["placement_history"]
    hist = json.loads(hist.decode() if isinstance(hist, bytes) else hist)
    keys = {"migration", "step", "layer", "imbalance_before", "imbalance_after", "moved", "placement"}
    for entry in hist:
        assert set(entry) == keys, f"placement history entry keys {sorted(entry)}, page lists {sorted(keys)}"
        assert entry["migration"] is True
        for m in entry["moved"]:
            assert set(m) == {"expert", "from", "to"}
    return len(hist)


def main():
    inits, trained = [sys.argv[1]] + sys.argv[3:], sys.argv[2]
    for path in inits + [trained]:
        raw = open(path, "rb").read()
        body = check_header(path, raw)
        with h5py.File(path, "r") as f:
            for a in ("format_version", "step", "adam_step", "precision", "world_size", "dp", "ep",
                      "parameters", "producer"):
                assert a in f.attrs, f"{path}: root attribute {a} missing"
            n = check_checksums(f)
            extra = ""
            if path in inits:
                assert int(f.attrs["step"]) == 0
                extra = f", {check_init(f)} parameters equal the page's init"
            else:
                extra = f", {check_history(f)} migrations with the documented keys"
        print(f"{path}: header and whole-file checksum ok ({body} bytes), {n} tensor checksums ok{extra}")


if __name__ == "__main__":
    main()
