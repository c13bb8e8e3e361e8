"""What the probes share: loading collect.py's output and reporting a presence score's AUC."""
import numpy as np
from benchmarks.presence import auc, constrained_threshold


def load(path):
    """collect.py's npz: errors (N, T', K + 1, H, W), labels (N, K), sources, shapes per scene; relative errors."""
    d = np.load(path)
    err = d["err"].astype(np.float64)
    k = err.shape[2] - 1
    e = err.mean((3, 4))
    return d, err, d["label"], d["source"], d["nshapes"], e[..., :k] / e[..., k:]


def continuation(model, cont, std):
    """target -> the pipeline two-shape scenes continue on after t*: `std` for "standard", else the model with
    `cont` (an erasure method) erasing the target, at the bench's own erasure settings (seed 0), so the bench's cached
    erasures are reused."""
    from benchmarks.crr import BenchSettings, erased_unet
    from irece_runtime.loading import load_pipeline
    cache = {}

    def pipe_of(target):
        if cont == "standard":
            return std
        if target not in cache:
            cache[target] = load_pipeline(model, erased_unet(model, cont, target, BenchSettings(t_star=0.5)))
        return cache[target]
    return pipe_of


def report(name, s, lab, ns, src):
    """AUC overall, by number of shapes and by source; recall at <= 3% false positives."""
    s = np.asarray(s)
    out = [f"{name:40s} AUC {auc(lab.ravel(), s.ravel()):.3f}"]
    for k in (1, 2, 3):
        m = ns == k
        out.append(f"{k}:{auc(lab[m].ravel(), s[m].ravel()):.3f}")
    for so in ("text", "inverted"):
        m = src == so
        out.append(f"{so[:3]}:{auc(lab[m].ravel(), s[m].ravel()):.3f}")
    thr = constrained_threshold(lab.ravel(), s.ravel(), 0.03)
    out.append(f"| @FPR<=3%: TPR {(s[lab] >= thr).mean():.2f} (2 shapes {(s[lab & (ns[:, None] == 2)] >= thr).mean():.2f})")
    print(" ".join(out))
