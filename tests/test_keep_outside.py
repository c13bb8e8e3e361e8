"""keep_outside (blended latent diffusion on inverted latents): once IRECE re-noised an image, outside its mask the
latent follows the inversion's own trajectory and ends on the input's latent, and the pixels outside it are the input
latent's decode. Model-agnostic."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from irece_runtime.calls import drive
from irece_runtime.irece import IreceConfig
from irece_runtime.pipeline import Request, guided_eps, sample

STEPS = 8


@pytest.fixture(scope="module")
def latent(pipe):
    e = pipe.backend
    return torch.randn(1, e.latent_channels, pipe.sample_size, pipe.sample_size,
                       generator=torch.Generator().manual_seed(11)) * 0.8


def test_each_step_blends_with_the_inversion_latent_at_its_own_noise_level(pipe, latent):
    """The anchor is diffusers' schedules: the inversion's step i leaves the latent at the noise level of its
    timestep, which is the level the sampler's step n - 1 - i starts from, so step j reads trajectory[n - j]
    (trajectory[0]: the input, trajectory[n]: x_T). Regenerating the inverted latent (null prompt, DDIM) passes
    nearer each such latent than the one a level noisier, and ends near the input."""
    inverse, forward = pipe.scheduler(STEPS, inverse=True), pipe.scheduler(STEPS)
    assert torch.equal(inverse.timesteps.flip(0), forward.timesteps)
    null = pipe.encode_prompt("")
    trajectory = []
    x_T = drive(pipe.invert_steps(latent, null, "erased", STEPS, trajectory=trajectory), pipe.backend)
    assert len(trajectory) == STEPS + 1 and torch.equal(trajectory[0], latent) and torch.equal(trajectory[-1], x_T)
    seen = []
    x0 = drive(sample(guided_eps("erased", null, None, 1.0), x_T, pipe.scheduler(STEPS),
                      (lambda i, t, x: seen.append(x) or x,)), pipe.backend)
    for j, x in enumerate(seen[1:], 1):
        level, noisier = trajectory[STEPS - j], trajectory[STEPS - j + 1]
        assert (x - level).norm() < (x - noisier).norm(), j
    assert (x0 - latent).norm() < 0.5 * (x0 - trajectory[2]).norm()


def test_outside_the_mask_the_image_ends_on_the_input_latent_and_only_where_irece_ran(pipe, latent):
    req = Request(init_latent=latent[0], steps=STEPS, seed=4)
    paper = IreceConfig(concepts=(pipe.vocabulary[0] if pipe.vocabulary else "cat",), t_star=0.5)
    kept = pipe.generate(req, replace(paper, keep_outside=True))
    plain = pipe.generate(req, paper)
    m = kept.irece.mask[:, None]
    assert 0 < float(m.mean()) < 1
    assert torch.equal((1 - m) * kept.latents, (1 - m) * latent)  # outside: exactly the input's latent
    assert not torch.equal(kept.latents, plain.latents)  # the paper's IRECE redraws outside the mask too
    inside = m.bool().expand_as(kept.latents)
    assert not torch.allclose(kept.latents[inside], latent[inside])  # inside: redrawn
    # in pixels too: the decoder reads neighbouring cells, so only the input latent's own decode is the input outside
    reference, redrawn = pipe.decode(latent), pipe.decode(kept.latents)
    px = torch.nn.functional.interpolate(m, size=kept.images.shape[1:3], mode="nearest")[:, 0, :, :, None].bool()
    px = px.expand(kept.images.shape).numpy()
    assert np.array_equal(kept.images[~px], reference[~px])
    assert np.array_equal(kept.images[px], redrawn[px]) and not np.array_equal(kept.images[px], reference[px])
    assert not np.array_equal(redrawn[~px], reference[~px])  # without it, the kept cells decode differently
    # where IRECE does not run (a gate no score reaches) or there is no inversion (text), keep_outside changes nothing
    gated = IreceConfig(concepts=paper.concepts, gate="classifier", threshold=1.01, t_star=0.5)
    text = Request(prompt="a photo", steps=STEPS, seed=4)
    for r, c in ((req, gated), (text, gated), (text, paper)):
        a, b = pipe.generate(r, c), pipe.generate(r, replace(c, keep_outside=True))
        assert np.array_equal(a.uint8(), b.uint8())


def test_an_inverted_request_with_a_prompt_of_its_own_is_redrawn_whole(pipe, latent):
    """A prompt asks for a change: keep_outside keeps nothing of the input (the erased model redraws the whole image,
    as without it); regenerated without one, the same latent keeps its input outside the mask."""
    concept = pipe.vocabulary[0] if pipe.vocabulary else "cat"
    paper = IreceConfig(concepts=(concept,), t_star=0.5)
    edit = Request(init_latent=latent[0], prompt=f"a photo of a {concept}", steps=STEPS, seed=4)
    a, b = pipe.generate(edit, paper), pipe.generate(edit, replace(paper, keep_outside=True))
    assert a.irece.intervened and np.array_equal(a.uint8(), b.uint8()) and torch.equal(a.latents, b.latents)
    assert b.irece.kept is not None and not b.irece.kept.any()
    plain = pipe.generate(replace(edit, prompt=""), replace(paper, keep_outside=True))
    assert bool(plain.irece.kept.all())
    m = plain.irece.mask[:, None]
    assert torch.equal((1 - m) * plain.latents, (1 - m) * latent)
