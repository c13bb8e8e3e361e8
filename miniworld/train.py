"""`irece world train`: train the Shapes-10 mini world from scratch (VAE -> UNet + text encoder -> judge).

Writes a diffusers StableDiffusionPipeline folder (exact SD v1.x architecture, scaled down) and the
judge. Every stage caches its result under --work, so an interrupted run resumes where it stopped;
`--quick` runs a few steps of each stage (a smoke test that keeps this code from rotting).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from irece_runtime.images import to_tensor
from irece_runtime.irece import aggregate_maps, token_weights

from . import shapes
from .assets import TOKENIZER_DIR
from .judge import Judge
from .shapes import CONCEPTS




def sd_scheduler_config() -> dict:
    # Stable Diffusion v1.4's noise schedule.
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


LATENT_SIDE = 8  # 32 px renders through an f=4 VAE (see build_models for why not f=2)
SCENE_MIX = {0: 0.03, 1: 0.45, 2: 0.32, 3: 0.20}  # shapes per training scene -> share


def build_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = int(np.log2(shapes.SIZE // LATENT_SIDE)) + 1
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(32, 64, 64)[:levels],
                        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=shapes.SIZE)
    # An f=4 VAE and an 8x8 latent (v1's geometry): at f=2 the UNet itself had to draw each shape's outline and
    # drew blobs of the caption's colour (text accuracy 4-54% for two UNets of 1.1M and 3.2M parameters); at f=4
    # the decoder draws outlines and the UNet places a shape code, which v1 learned to >= 90% per concept.
    unet = UNet2DConditionModel(sample_size=LATENT_SIDE, in_channels=4, out_channels=4,
                                block_out_channels=(64, 128), layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=77, hidden_act="quick_gelu",
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                                projection_dim=64))
    return vae, unet, text_encoder


def random_scene(rng: np.random.Generator, mix: dict[int, float] = SCENE_MIX) -> shapes.Scene:
    k = rng.choice(list(mix), p=np.asarray(list(mix.values())) / sum(mix.values()))
    if k == 0:
        return shapes.render(shapes.NO_SHAPE, rng=rng)
    return shapes.render(rng=rng) if k == 1 else shapes.render_scene(int(k), rng=rng)


def make_dataset(n: int, seed: int, mix: dict[int, float] = SCENE_MIX, regions: list | None = None):
    """n scenes (uint8 images) with their training captions; `regions`, if given, receives each scene's
    {concept: bool mask} (the renderer's ground truth, for the grounding stage)."""
    rng = np.random.default_rng(seed)
    images, prompts = np.empty((n, shapes.SIZE, shapes.SIZE, 3), np.uint8), []
    for i in range(n):
        scene = random_scene(rng, mix)
        images[i] = scene.image
        prompts.append(shapes.random_prompt(scene, rng))
        if regions is not None:
            regions.append(scene.masks)
    return images, prompts


def to_batch(images: np.ndarray) -> torch.Tensor:
    return to_tensor(images)


def _save_stage(path: Path, tensors: dict, meta: dict):
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path),
              metadata={k: json.dumps(v) for k, v in meta.items()})


class Trained:
    """Parameters trained together, their exponential moving average and a resumable checkpoint (our own
    safetensors file: weights p{i}, averages ema{i}, step)."""

    def __init__(self, params: list, ckpt: Path):
        self.params, self.ckpt = params, ckpt
        self.ema = [p.detach().clone() for p in params]
        self.start = 0
        if ckpt.exists():
            state = load_file(str(ckpt))
            for i, p in enumerate(params):
                p.data.copy_(state[f"p{i}"])
                self.ema[i].copy_(state[f"ema{i}"])
            self.start = int(state["step"].item())

    def update(self, opt, loss: torch.Tensor, ema_decay: float) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.lerp_(p.detach(), 1 - ema_decay)

    def save(self, step: int) -> None:
        state = {f"p{i}": p for i, p in enumerate(self.params)} | {f"ema{i}": e for i, e in enumerate(self.ema)}
        state["step"] = torch.tensor(step)
        _save_stage(self.ckpt, state, {})

    @torch.no_grad()
    def use_ema(self) -> None:
        for e, p in zip(self.ema, self.params):
            p.copy_(e)


def noise_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(**{k: v for k, v in sd_scheduler_config().items() if k != "set_alpha_to_one"})


def text_encoder_sd_layout(text_encoder_dir: Path) -> None:
    """Rewrite a saved CLIPTextModel checkpoint with SD v1.4's `text_model.` key prefix. transformers 5 saves a
    fresh model without it and reads both; transformers 4 (diffusers' and optimum's older stacks) silently
    initialises random weights from the prefix-less layout. Atomic, so readers never see half a file."""
    path = Path(text_encoder_dir) / "model.safetensors"
    state = load_file(str(path))
    if all(k.startswith("text_model.") for k in state):
        return
    tmp = path.with_suffix(".tmp")
    save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, path)


def train_vae(work: Path, steps: int, batch: int, seed: int) -> torch.nn.Module:
    vae, _, _ = build_models()
    path = work / "vae.safetensors"
    if path.exists():
        vae.load_state_dict(load_file(str(path)))
        return vae.eval()
    torch.manual_seed(seed)
    images, _ = make_dataset(max(steps * batch // 4, 512), seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = np.random.default_rng(seed)
    for _ in (bar := tqdm(range(steps), desc="vae", mininterval=5)):
        x = to_batch(images[g.integers(len(images), size=batch)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    _save_stage(path, vae.state_dict(), {})
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 512):
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_batch(images[i:i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(work: Path, vae, steps: int, batch: int, n_data: int, seed: int, lr: float = 5e-4,
               ema_decay: float = 0.999, checkpoint_every: int = 200):
    from transformers import CLIPTokenizer

    _, unet, text_encoder = build_models()
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    regions: list = []
    images, prompts = make_dataset(n_data, seed + 2, regions=regions)
    mean, std = encode_latents(vae, images)
    scaling = float(1.0 / mean.std())
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    null_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    noise_sched = noise_scheduler()

    w = Trained(list(unet.parameters()) + list(text_encoder.parameters()), work / "unet_ckpt.safetensors")
    start = w.start
    opt = torch.optim.AdamW(w.params, lr=lr, weight_decay=1e-2)
    warmup = max(1, min(200, steps // 10))

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.45 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup))))

    g = torch.Generator().manual_seed(seed + start)
    unet.train()
    text_encoder.train()
    for step in (bar := tqdm(range(start, steps), desc="unet", initial=start, total=steps, mininterval=5)):
        idx = torch.randint(len(images), (batch,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        tok = ids[idx].clone()
        tok[torch.rand(batch, generator=g) < 0.1] = null_ids[0]  # prompt dropout -> classifier-free guidance
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        cond = text_encoder(tok).last_hidden_state
        pred = unet(noise_sched.add_noise(z, noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        w.update(opt, loss, min(ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            w.save(step + 1)
    w.use_ema()
    return unet.eval(), text_encoder.eval(), tokenizer, scaling, (mean, std, ids, regions)


MAX_SHAPES = 3


def grounding_targets(tokenizer, ids: torch.Tensor, regions: list, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per caption, up to MAX_SHAPES (token weights (77,), latent-resolution mask) pairs: each named shape's
    word tokens and where the renderer drew it. Returns weights (N, S, 77) and masks (N, S, side, side)."""
    n = len(regions)
    w = torch.zeros(n, MAX_SHAPES, ids.shape[1])
    m = torch.zeros(n, MAX_SHAPES, side, side, dtype=torch.bool)
    f = shapes.SIZE // side
    word = {c: tokenizer(c, add_special_tokens=False).input_ids for c in shapes.CONCEPTS}
    for i, reg in enumerate(regions):
        for j, (c, mask) in enumerate(reg.items()):
            try:
                w[i, j] = token_weights(ids[i].tolist(), word[c], ids.shape[1])
            except ValueError:  # a caption truncated before the word (never with our templates)
                continue
            m[i, j] = torch.from_numpy(mask.reshape(side, f, side, f).mean((1, 3)) >= 0.5)
    return w, m


def grounding_loss(maps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al., CVPR 2024), on our localizer's own maps: the share of each named
    shape's cross-attention mass that falls inside the shape, pushed towards 1. maps (B, S, H, W) attention mass
    on each shape's tokens; masks (B, S, H, W) bool; valid (B, S) which slots hold a shape."""
    inside = (maps * masks).flatten(2).sum(2) / maps.flatten(2).sum(2).clamp_min(1e-8)
    per = (1 - inside) ** 2
    return (per * valid).sum() / valid.sum().clamp_min(1)


def identity_loss(maps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Inside each named shape, its own word should draw more attention than the other named shapes' words:
    cross-entropy of each pixel's split of attention between the caption's shapes, target the shape drawn there
    (the token loss alone is met by every shape word attending to every shape, which localizes no concept)."""
    ok = valid.bool()[:, :, None, None]
    logp = maps.clamp_min(1e-8).log().masked_fill(~ok, -1e4).log_softmax(1)
    target = masks & ok
    return -(logp * target).sum() / target.sum().clamp_min(1)


def contrast_prompts(tokenizer, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n localization prompts listing all ten concepts in random orders ("a moon and a star and ..."), as IRECE's
    contrastive gate builds them: token ids (n, 77) and each concept's token position (n, 10)."""
    ids, pos = [], []
    word = {c: tokenizer(c, add_special_tokens=False).input_ids for c in shapes.CONCEPTS}
    for _ in range(n):
        order = [shapes.CONCEPTS[k] for k in torch.randperm(len(shapes.CONCEPTS), generator=g).tolist()]
        row = tokenizer(" and ".join(f"a {c}" for c in order), padding="max_length", max_length=77,
                        truncation=True).input_ids
        ids.append(row)
        pos.append([row.index(word[c][0]) for c in shapes.CONCEPTS])  # one token per Shapes-10 word
    return torch.tensor(ids), torch.tensor(pos)


def contrast_loss(queries: list, attn_layers: list, contrast_hidden: torch.Tensor, pos: torch.Tensor,
                  regions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Inside each drawn shape, the localization prompt's word for that shape should win the softmax among the
    ten concept words (the share IRECE's gate scores; an absent concept's word should win nowhere): per layer and
    head, cross-entropy of the concept words' attention logits, target the shape drawn at the pixel.
    queries: each cross-attention layer's input (B, hw, C); regions (B, 10, side, side) bool, one per concept."""
    if len(queries) != len(attn_layers):
        raise RuntimeError(f"expected one query input per cross-attention layer, got {len(queries)}")
    total, count = 0.0, 0
    b = contrast_hidden.shape[0]
    for attn, h in zip(attn_layers, queries):
        heads = attn.heads
        q = attn.to_q(h)
        k = attn.to_k(contrast_hidden)
        d = q.shape[-1] // heads
        k = k.gather(1, pos[:, :, None].expand(-1, -1, k.shape[-1]))  # (B, 10, C): the concept words' keys
        q = q.view(b, -1, heads, d).transpose(1, 2)  # (B, heads, hw, d)
        k = k.view(b, -1, heads, d).transpose(1, 2)  # (B, heads, 10, d)
        logits = (q @ k.transpose(-1, -2)) * attn.scale  # (B, heads, hw, 10)
        side = int(round(h.shape[1] ** 0.5))
        reg = F.interpolate(regions.float(), size=(side, side), mode="nearest").flatten(2).transpose(1, 2)  # (B, hw, 10)
        inside = (reg.sum(2) > 0) & valid[:, None]  # pixels of a drawn shape
        logp = logits.log_softmax(-1)
        nll = -(logp * reg[:, None]).sum(-1)  # (B, heads, hw)
        total = total + (nll * inside[:, None]).sum() / heads
        count += int(inside.sum())
    return total / max(count, 1)


def ground_unet(work: Path, unet, text_encoder, tokenizer, data: tuple, scaling: float, steps: int, batch: int,
                seed: int, lr: float = 2e-4, weight: float = 0.2, max_t: int = 800,
                ema_decay: float = 0.99, checkpoint_every: int = 100):
    """Stage 2 of the UNet: the denoising loss plus a grounding loss on the cross-attention of each named shape
    (weight x (TokenCompose's token loss + an identity loss between the named shapes + a contrast loss: in a
    prompt listing all ten concepts, the drawn shape's word wins each of its pixels), at timesteps < max_t
    where x_t still shows the layout). Denoising alone
    leaves this tiny model's cross-attention flat (every token ~1/77 of every pixel's attention: the caption
    acts as one global vector), so its shape words point nowhere; a real SD's cross-attention localizes the
    objects its words name, which is what IRECE reads. The maps are taken by IRECE's own Localizer."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from irece_runtime.attention import Localizer

    mean, std, ids, regions = data  # stage 1's scenes, latents and caption tokens
    null_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    side = unet.config.sample_size
    tw, tm = grounding_targets(tokenizer, ids, regions, side)
    noise_sched = noise_scheduler()
    localizer = Localizer(unet)  # all cross-attention layers, as IRECE localizes by default
    attn_layers = [unet.get_submodule(n.removesuffix(".processor")) for n in localizer.layer_names]
    queries: list = []
    for a in attn_layers:  # keep each cross-attention layer's input: its queries, for the contrast loss
        a.register_forward_pre_hook(lambda mod, args: queries.append(args[0]))
    # per scene, which concept is drawn where: (N, 10, side, side)
    regions10 = torch.zeros(len(regions), len(shapes.CONCEPTS), side, side, dtype=torch.bool)
    for i, reg in enumerate(regions):
        for j, c in enumerate(reg):
            regions10[i, shapes.CONCEPTS.index(c)] = tm[i, j]
    w = Trained(list(unet.parameters()) + list(text_encoder.parameters()), work / "ground_ckpt.safetensors")
    start = w.start
    opt = torch.optim.AdamW(w.params, lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed + 7 + start)
    unet.train()
    text_encoder.train()
    for step in (bar := tqdm(range(start, steps), desc="ground", initial=start, total=steps, mininterval=5)):
        idx = torch.randint(len(mean), (batch,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        tok = ids[idx].clone()
        dropped = torch.rand(batch, generator=g) < 0.1
        tok[dropped] = null_ids[0]
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        cond = text_encoder(tok).last_hidden_state
        cids, cpos = contrast_prompts(tokenizer, g, batch)
        contrast_hidden = text_encoder(cids).last_hidden_state
        queries.clear()
        localizer.store.token_weights, localizer.store.maps = tw[idx], []
        pred = unet(noise_sched.add_noise(z, noise, t), t, cond).sample
        maps = aggregate_maps(localizer.store.maps, (side, side))
        localizer.store.token_weights, localizer.store.maps = None, []
        valid = (tw[idx].sum(2) > 0) & ~dropped[:, None] & (t < max_t)[:, None]
        denoise = F.mse_loss(pred, noise)
        ground = grounding_loss(maps, tm[idx], valid.float()) + identity_loss(maps, tm[idx], valid) + \
            contrast_loss(queries, attn_layers, contrast_hidden, cpos, regions10[idx], t < max_t)
        queries.clear()
        loss = denoise + weight * ground
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        w.update(opt, loss, ema_decay)
        bar.set_postfix(mse=f"{denoise.item():.4f}", ground=f"{ground.item():.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            w.save(step + 1)
    w.use_ema()
    unet.set_attn_processor(AttnProcessor2_0())  # the saved model carries no training hooks
    return unet.eval(), text_encoder.eval()


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Colour jitter, blur and noise in [-1, 1] image space, per image."""
    b = x.shape[0]
    gain = 1 + 0.25 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    shift = 0.2 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    x = x * gain + shift
    blur = torch.rand(b, generator=g) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    x = x + torch.randn(x.shape, generator=g) * 0.12 * torch.rand(b, 1, 1, 1, generator=g)
    return x.clamp(-1.5, 1.5)


JUDGE_MIX = {0: 0.10, 1: 0.45, 2: 0.25, 3: 0.20}


def train_judge(out: Path, vae, steps: int, batch: int, seed: int, work: Path | None = None,
                checkpoint_every: int = 250) -> Judge:
    """Multi-label: which of the ten shapes a picture shows (none, one, two or three of them)."""
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    ckpt, start = (work / "judge_ckpt.pt") if work else None, 0
    if ckpt is not None and ckpt.exists():  # our own file, written below: weights, optimizer and step
        state = torch.load(ckpt, weights_only=True)
        judge.load_state_dict(state["judge"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = int(state["step"])
    rng = np.random.default_rng(seed + 3 + start)
    g = torch.Generator().manual_seed(seed + 3 + start)
    judge.train()
    for step in (bar := tqdm(range(start, steps), desc="judge", initial=start, total=steps, mininterval=5)):
        scenes = [random_scene(rng, JUDGE_MIX) for _ in range(batch)]
        x = to_batch(np.stack([sc.image for sc in scenes]))
        target = torch.tensor([[float(c in sc.masks) for c in CONCEPTS] for sc in scenes])
        with torch.no_grad():  # half the batch goes through the VAE: generated images look like that
            half = batch // 2
            x[:half] = vae.decode(vae.encode(x[:half]).latent_dist.sample()).sample.clamp(-1, 1)
        loss = F.binary_cross_entropy_with_logits(judge(augment(x, g)), target * 0.96 + 0.02)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if ckpt is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            torch.save({"judge": judge.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1}, ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    judge.eval()
    save_file(judge.state_dict(), str(out))
    return judge


def train_world(out: Path, judge_out: Path, work: Path, quick: bool = False, seed: int = 0,
                unet_steps: int | None = None, ground_steps: int | None = None) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if quick:
        cfg = dict(vae_steps=3, vae_batch=8, unet_steps=3, unet_batch=8, n_data=64, ground_steps=2,
                   judge_steps=3, judge_batch=22)
    else:
        # no grounding stage by default: on world v4 its 800 steps lowered text accuracy (star 5/8 -> 1/8, cross
        # 8/8 -> 3/8) and left the attention presence AUC at 0.55 (BENCHMARKS.md, "Concept-aware IRECE")
        cfg = dict(vae_steps=2000, vae_batch=32, unet_steps=6000, unet_batch=64, n_data=60000, ground_steps=0,
                   judge_steps=2000, judge_batch=128)
    if unet_steps:  # a larger value than a finished run's continues it from its checkpoint (warm restart)
        cfg["unet_steps"] = unet_steps
    if ground_steps is not None:
        cfg["ground_steps"] = ground_steps
    vae = train_vae(work, cfg["vae_steps"], cfg["vae_batch"], seed)
    unet, text_encoder, tokenizer, scaling, data = train_unet(work, vae, cfg["unet_steps"], cfg["unet_batch"],
                                                              cfg["n_data"], seed)
    if cfg["ground_steps"]:
        unet, text_encoder = ground_unet(work, unet, text_encoder, tokenizer, data, scaling, cfg["ground_steps"],
                                         cfg["unet_batch"], seed)
    vae.register_to_config(scaling_factor=scaling)
    # keep the tokenizer folder exactly as converted from CLIP's BPE (SD v1.4's layout: vocab.json + merges.txt)
    tok_files = {f.name: f.read_bytes() for f in TOKENIZER_DIR.iterdir()}
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**sd_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    text_encoder_sd_layout(Path(out) / "text_encoder")
    for f in (Path(out) / "tokenizer").iterdir():
        f.unlink()
    for name, data in tok_files.items():
        (Path(out) / "tokenizer" / name).write_bytes(data)
    (Path(out) / "concepts.json").write_text(json.dumps(list(shapes.CONCEPTS)))  # what the server may suppress
    train_judge(judge_out, vae, cfg["judge_steps"], cfg["judge_batch"], seed, work)
    summary = {"model": str(out), "judge": str(judge_out), "seconds": round(time.time() - t0, 1),
               "vae_scaling_factor": scaling, **cfg}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
