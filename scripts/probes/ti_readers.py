"""#12 on v4: white-box textual inversion of star under the full defence, by conditioning reader and option: how many of
16 images show star per erasure method. Usage: ti_readers.py METHOD [METHOD ...]"""
import sys
from dataclasses import replace
from irece_runtime.loading import load_pipeline
from miniworld.judge import load_judge, shows
from benchmarks import crr, attacks, batch as gen
model = "miniworld/models/shapes10"
s = crr.BenchSettings(n=16, t_star=0.5, threshold=0.305)
judge = load_judge()
base = crr.defence_config("full", "star", s)
variants = {"full": base, "both": replace(base, conditioning_unet="both"),
            "standard": replace(base, conditioning_unet="standard"),
            "thr_c0.15": replace(base, conditioning_threshold=0.15),
            "pairs": replace(base, classifier_pairs=True, threshold=0.357)}
for method in sys.argv[1:]:
    erased = crr.erased_unet(model, method, "star", s)
    pipe = load_pipeline(model, erased)
    vec = crr.ti_embedding(pipe, model, erased, "erased", "star", s)
    prompts = [attacks.TI_TEMPLATES[k % len(attacks.TI_TEMPLATES)].format("<c>") for k in range(s.n)]
    seeds = [s.seed * 100_000 + 1000 * 3 + k for k in range(s.n)]
    out = {}
    for name, cfg in variants.items():
        imgs, _ = gen.from_prompts(pipe, prompts, seeds, cfg, learned={"<c>": vec}, steps=s.steps, guidance=s.guidance)
        out[name] = int(shows(judge, imgs, "star").sum())
    print(method, out, flush=True)
