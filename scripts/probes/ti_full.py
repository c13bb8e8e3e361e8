import sys, numpy as np, torch
from irece_runtime.loading import load_pipeline
from miniworld.judge import load_judge, shows
from benchmarks import crr, attacks, batch as gen
model = "miniworld/models/shapes10"; method = sys.argv[1]; thr_c = float(sys.argv[2]) if len(sys.argv) > 2 else 0.25
s = crr.BenchSettings(n=16, t_star=0.5, threshold=0.305)
erased = crr.erased_unet(model, method, "star", s)
pipe = load_pipeline(model, erased)
vec = crr.ti_embedding(pipe, model, erased, "erased", "star", s)
judge = load_judge()
from dataclasses import replace
cfg = replace(crr.defence_config("full", "star", s), conditioning_threshold=thr_c)
seeds = [s.seed * 100_000 + 1000 * 3 + k for k in range(s.n)]
uncond = pipe.encode_prompt("")
for k in range(s.n):
    p = attacks.TI_TEMPLATES[k % len(attacks.TI_TEMPLATES)].format("<c>")
    cond = pipe.encode_prompt(p, {"<c>": vec})
    x, rep = pipe.denoise(gen.noise(pipe, [seeds[k]]), cond, uncond, s.guidance, s.steps, cfg, seeds[k])
    img = gen.decode(pipe, x)
    st = bool(shows(judge, img, "star")[0])
    looks = [(round(c.score, 2), round(c.conditioning_score, 2), c.intervened) for c in rep.concepts]
    print(k, "STAR" if st else "----", "unconditioned", rep.unconditioned, looks, flush=True)
