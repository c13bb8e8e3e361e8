"""Fourteenth session: two-shape scenes (PAIR_SEED + 1000 SEED; SEED 0: bench gate's own), per scene, with the
product's head + recheck + keep_outside (t* 0.5, tau 0.2, threshold 0.217, grow 1) continuing on METHOD erasing
each scene's target. Prints per scene what each look of the head (t*, then the rechecks) saw: target score / share
of the target's pixels in its cells / share of the other shape's. Then several pixel masks composite the same two
decodes (the denoised latent's and the input latent's): "grown" is the product's (nearest-upsampled grown union
mask; checked equal to Pipeline.decode, "!!" where not), "coreK" the ungrown head cells dilated by K pixels, "bilA+K"
the head's target probability bilinear-upsampled to the image, >= A, dilated by K pixels.

Environment: RULE=earlier (a recheck leaves the cells where the t* look, having re-noised the image, saw another
concept), split (a look's target cells leave those where another concept is more probable), both; RELOOK=1 (a
recheck reads x0-hat re-noised to t*'s level, the head's training level); GROW=N; RECHECK=0; NEG=G and
NEGSTEPS=K (negative guidance, for K steps after each re-noising); SAVE=dir (a strip per
scene: render | input decode | redrawn | grown composite | core0 composite).

Sixteenth session: KEEP=P / KEEPREF=1 (steering towards the other concepts the t* look saw; see below); the "comp"
variants: the grown mask less the pixels where another concept the t* look saw (score >= threshold) is more probable
than the target, both bilinear to the image (compmD: by a margin D). KEEPO=1 runs the product's keep_others
(IreceConfig.keep_others), and the probe then checks its "compt" composite at the product's floor
(irece.KEEP_OTHERS_FLOOR) equals Pipeline.decode on every scene.

    PYTHONPATH=.:scripts/probes python scripts/probes/pixel_mask.py SEED N METHOD|standard    # 35 s for 40 scenes
"""
import os
import sys
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import batch as gen
from benchmarks.crr import BenchSettings
from benchmarks.gate import PAIR_SEED
from irece_runtime.irece import KEEP_OTHERS_FLOOR, RECHECK, IreceConfig
from irece_runtime.loading import load_pipeline
from irece_runtime import pipeline as pipeline_module
from irece_runtime.pipeline import Call, Pipeline
from irece_runtime.irece import predicted_x0, renoise
from miniworld import shapes
from miniworld.judge import load_judge, shows

from common import continuation

MODEL = "miniworld/models/shapes10"
SAVE = os.environ.get("SAVE")  # a folder: per scene, a strip render | input decode | redrawn | grown | core0
seed, n, cont = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = BenchSettings(seed=seed, t_star=0.5)
judge = load_judge()
std = load_pipeline(MODEL, None)
CFG = IreceConfig(gate="head", t_star=0.5, threshold=0.217, tau=0.2, grow=int(os.environ.get("GROW", 1)),
                  recheck=RECHECK if os.environ.get("RECHECK", "1") == "1" else (), keep_outside=True,
                  negative_guidance=0.0 if os.environ.get("NEGPROMPT") else float(os.environ.get("NEG", 0)),
                  negative_guidance_steps=int(os.environ.get("NEGSTEPS", 0)),
                  keep_others=bool(os.environ.get("KEEPO")))

captured = []
_head_steps = Pipeline.head_steps


RELOOK = bool(os.environ.get("RELOOK"))  # a later look reads x0 (standard UNet, null prompt) re-noised to t*'s level


def head_steps(self, x, t):
    if RELOOK and captured:
        t_star = state["t_star"]
        alphas = self.alphas_cumprod
        eps0 = yield Call("eps", (x, self.null_hidden.expand(x.shape[0], -1, -1)), t, "standard")
        x0 = predicted_x0(x, eps0, alphas[int(t)])
        xi = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(t))).to(x0)
        x, t = renoise(x0, xi, alphas[int(t_star)]), t_star
    else:
        state["t_star"] = t
    out = yield from _head_steps(self, x, t)
    captured.append(out.detach().float().clone())
    return out


Pipeline.head_steps = head_steps

# RULE (env): "earlier" - a later look (recheck) does not take cells an earlier look that re-noised the image gave to
# another concept; "split" - a look's target cells leave those where another concept is more probable; "both"
RULE = os.environ.get("RULE", "none")
state = {"claimed": None}
_localize_head = Pipeline._localize_head


def localize_head(self, x, t, cfg, targets):
    mask, reports = yield from _localize_head(self, x, t, cfg, targets)
    every = captured[-1]
    columns = self.head_columns([c for c, _, _ in targets])
    others = [k for k in range(every.shape[1]) if k not in columns]
    claimed = (every[:, others] >= cfg.tau).any(1)
    if RULE in ("split", "both"):
        own = every[:, columns].amax(1) >= every[:, others].amax(1)
        mask = mask * (own | ~claimed).to(mask.dtype)
    if RULE in ("earlier", "both") and state["claimed"] is not None:
        mask = mask * (~state["claimed"]).to(mask.dtype)
    if len(captured) == 1:  # the t* look: only an image it re-noised keeps its other concepts' cells
        state["claimed"] = claimed if bool(mask.any()) else None
        state["seen"] = {HEAD_NAMES[k]: every[:, k] >= cfg.tau for k in others
                         if float(every[:, k].max()) >= cfg.threshold}
    return mask, reports


Pipeline._localize_head = localize_head

# NEG=s: IreceConfig.negative_guidance (the product's); NEGPROMPT=1: the first measurement's patch instead, whose
# concept prompt was "a <target>" rather than the localization template (NEGSPARE=1: not in cells where the t* look
# saw another concept)
NEG = float(os.environ.get("NEG", 0))
NEGPROMPT = bool(os.environ.get("NEGPROMPT"))
NEGSPARE = bool(os.environ.get("NEGSPARE"))
# KEEP=P (sixteenth session): once IRECE re-noised the image, steer towards each other concept the t* look saw
# (its score >= threshold), with scale P, in the mask's cells within KEEPD cells of that concept's own cells (KEEPD=-1:
# the whole mask); KEEPREF=1 instead makes the negative guidance's reference that concept's prompt, not the null one
KEEP = float(os.environ.get("KEEP", 0))
KEEPD = int(os.environ.get("KEEPD", 1))
KEEPREF = bool(os.environ.get("KEEPREF"))
hooks = []
_init = pipeline_module.IreceStep.__init__


def init(self, *a, **k):
    _init(self, *a, **k)
    hooks.append(self)


pipeline_module.IreceStep.__init__ = init
_guided_eps = pipeline_module.guided_eps


def guided_eps(model, cond, uncond, guidance):
    base = _guided_eps(model, cond, uncond, guidance)

    def eps(x, t):
        e = yield from base(x, t)
        hook = hooks[-1] if hooks else None
        if NEGPROMPT and hook is not None and hook.renoised is not None and bool(hook.renoised.any()):
            pipe = hook.pipe
            hid = torch.cat([pipe.null_hidden, pipe.encode_prompt(f"a {state['target']}").to(pipe.null_hidden)])
            e0, ec = (yield Call("eps", (torch.cat([x, x]), hid), t, "standard")).chunk(2)
            m = hook.report.mask.to(e)
            if NEGSPARE and state["claimed"] is not None:
                m = m * (~state["claimed"]).to(m)
            e = e - NEG * m[:, None] * (ec - e0)
        if (KEEP or KEEPREF) and hook is not None and hook.renoised is not None and bool(hook.renoised.any()) \
                and state.get("seen"):
            pipe = hook.pipe
            m = hook.report.mask.to(e)
            names = list(state["seen"])
            hid = torch.cat([pipe.null_hidden, pipe.localization(state["target"], CFG.template)[0]]
                            + [pipe.localization(c, CFG.template)[0] for c in names]).to(pipe.null_hidden)
            out = yield Call("eps", (x.repeat(len(hid), 1, 1, 1), hid), t, "standard")
            e0, ec, eo = out[0:1], out[1:2], out[2:]
            if KEEPREF:  # undo the product's (ec - e0) steering, redo it against the seen concepts' mean
                e = e + NEG * m[:, None] * (ec - e0) - NEG * m[:, None] * (ec - eo.mean(0, keepdim=True))
            if KEEP:
                for j, c in enumerate(names):
                    near = state["seen"][c]
                    region = m if KEEPD < 0 else m * dilate(near.float(), KEEPD).to(m)
                    e = e + KEEP * region[:, None] * (eo[j:j + 1] - e0)
        return e
    return eps


pipeline_module.guided_eps = guided_eps


pipe_of = continuation(MODEL, cont, std)
from irece_runtime.concept_head import load_head
HEAD_NAMES = load_head(MODEL)[0].concepts


def dilate(m, k):
    return m if k <= 0 else F.max_pool2d(m[:, None], 2 * k + 1, stride=1, padding=k)[:, 0]


rng = np.random.default_rng(PAIR_SEED + 1000 * seed)
scenes = [shapes.render_scene(2, rng=rng) for _ in range(n)]
traj = []
x_T = gen.invert_images(std, np.stack([sc.image for sc in scenes]), "standard", s.steps, trajectory=traj)
VARIANTS = ["grown"] + [f"core{k}" for k in (0, 1, 2, 3)] + [f"bil{a}+{k}" for a in (0.1, 0.2) for k in (0, 1, 2)] \
    + ["comp", "compm0.1", "compm0.2", "compt0.1", "compt0.2"]
tally = {v: {"ok": 0, "target": 0, "other": 0, "both": 0, "closed": 0} for v in VARIANTS}
size = shapes.SIZE
for k, sc in enumerate(scenes):
    target, other = sc.shapes[0].concept, sc.shapes[1].concept
    p = pipe_of(target)
    part = [lv[k:k + 1] for lv in traj]
    captured.clear()
    hooks.clear()
    state["claimed"], state["target"], state["seen"] = None, target, {}
    x, rep = p.denoise(x_T[k:k + 1], p.encode_prompt(""), p.encode_prompt(""), s.guidance, s.steps,
                       replace(CFG, concepts=(target,)), s.seed, trajectory=part)
    product = gen.decode(p, x, rep, part)
    if not rep.intervened:
        r, o = bool(~shows(judge, product, target)[0]), bool(shows(judge, product, other)[0])
        for v in VARIANTS:
            tally[v]["closed"] += 1
        print(f"  {k:2d} {target:8s} {other:8s} closed score {rep.concepts[0].score:.2f}", flush=True)
        continue
    col = p.head_columns([target])[0]
    opened = [c[:, col] for c in captured if float(c[:, col].max()) >= CFG.threshold]
    core = torch.stack([(c >= CFG.tau).float() for c in opened]).amax(0)  # (1, h, w) ungrown union
    prob = torch.stack(opened).amax(0)
    calls = []
    for c in captured:  # per look (t*, then the rechecks): target score, its cells' cover of each shape's pixels
        cells = F.interpolate((c[:, col] >= CFG.tau).float()[:, None], size=(size, size), mode="nearest")[0, 0] > 0
        calls.append(f"{float(c[:, col].max()):.2f}/{float(cells[torch.as_tensor(sc.masks[target])].float().mean()):.1f}"
                     f"/{float(cells[torch.as_tensor(sc.masks[other])].float().mean()):.1f}")
    new = torch.as_tensor(p.decode(x)).permute(0, 3, 1, 2)  # (1, 3, H, W) in [0, 1]
    ref = torch.as_tensor(p.decode(part[0])).permute(0, 3, 1, 2)
    line, strip = [], [sc.image, gen.to_uint8(ref.permute(0, 2, 3, 1).numpy())[0],
                        gen.to_uint8(new.permute(0, 2, 3, 1).numpy())[0]]
    for v in VARIANTS:
        if v == "grown":
            m = F.interpolate(rep.mask.float()[:, None], size=(size, size), mode="nearest")[:, 0]
        elif v.startswith("core"):
            m = dilate(F.interpolate(core[:, None], size=(size, size), mode="nearest")[:, 0], int(v[4:]))
        elif v.startswith("comp"):  # the grown mask, less the pixels where another concept the t* look saw is
            # more probable than the target (both bilinear to the image); compmD: only by a margin of D
            m = F.interpolate(rep.mask.float()[:, None], size=(size, size), mode="nearest")[:, 0]
            look = captured[0]
            oth = [kk for kk in range(look.shape[1]) if kk != col and float(look[:, kk].max()) >= CFG.threshold]
            if oth:
                up = F.interpolate(look, size=(size, size), mode="bilinear", align_corners=False)
                margin = float(v[5:]) if v.startswith("compm") else 0.0
                floor = float(v[5:]) if v.startswith("compt") else 0.0  # compt: the other's probability >= this too
                best = up[:, oth].amax(1)
                m = m * ~((best > up[:, col] + margin) & (best >= floor))
        else:
            a, d = v[3:].split("+")
            up = F.interpolate(prob[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            m = dilate((up >= float(a)).float(), int(d))
        img = gen.to_uint8(torch.where(m[:, None] > 0, new, ref).permute(0, 2, 3, 1).numpy())
        if v == (f"compt{KEEP_OTHERS_FLOOR}" if CFG.keep_others else "grown") and not np.array_equal(img, product):
            print(f"  !! {v} composite differs from Pipeline.decode on scene {k}", flush=True)
        if v in ("grown", "core0"):
            strip.append(img[0])
        r, o = bool(~shows(judge, img, target)[0]), bool(shows(judge, img, other)[0])
        outcome = "ok" if r and o else "both" if not (r or o) else "target" if not r else "other"
        tally[v][outcome] += 1
        line.append(f"{v}:{outcome}")
    if SAVE:
        from PIL import Image
        Image.fromarray(np.concatenate(strip, 1)).resize((128 * len(strip), 128), Image.NEAREST).save(
            f"{SAVE}/{k}_{target}_{other}.png")
    sh = sc.shapes
    gap = float(np.hypot(sh[0].cx - sh[1].cx, sh[0].cy - sh[1].cy) - sh[0].r - sh[1].r)
    print(f"  {k:2d} {target:8s} {other:8s} gap {gap:4.1f}px looks {' '.join(calls)} " + " ".join(x for x in line if not x.endswith(":ok")),
          flush=True)
for v in VARIANTS:
    t = tally[v]
    print(f"{v:10s} removed+kept {t['ok'] / n:.3f}  {t}", flush=True)
