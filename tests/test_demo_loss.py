"""The demo training's loss weights (``training/train_demo.py``), on SDXL's own noise schedule."""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler

from imagen.generation.diffusers.components import sdxl_scheduler
from training.demo_architecture import demo_scheduler
from training.train_demo import NoiseSchedule

SCHEDULER = sdxl_scheduler()
SCHEDULE = NoiseSchedule(SCHEDULER)
T = torch.arange(0, 1000)


def test_min_snr_counts_the_picture_error_of_the_noisiest_steps_a_thousand_times_less() -> None:
    picture_weight = SCHEDULE.loss_weight(T, 5.0, 0.0) * SCHEDULE.snr(T)  # noise error = picture error * sqrt(SNR)
    assert torch.allclose(picture_weight, SCHEDULE.snr(T).clamp(max=5.0))
    assert picture_weight[999] < 0.006 and picture_weight[0] == 5.0


def test_layout_weight_adds_its_weight_on_the_picture_error_at_every_step() -> None:
    snr = SCHEDULE.snr(T)
    assert torch.equal(SCHEDULE.loss_weight(T, 5.0, 0.0), snr.clamp(max=5.0) / snr)  # 0: plain min-SNR
    picture_weight = SCHEDULE.loss_weight(T, 5.0, 1.0) * SCHEDULE.snr(T)
    assert torch.allclose(picture_weight, SCHEDULE.snr(T).clamp(max=5.0) + 1.0)
    assert picture_weight[999] > 1.0


def test_training_noises_with_the_schedule_the_sampler_uses_and_the_shipped_model_was_trained_on() -> None:
    assert torch.equal(SCHEDULE.alphas_cumprod, SCHEDULER.alphas_cumprod)
    # what the training computed itself when the shipped weights were trained: the same numbers, bit for bit
    config = SCHEDULER.config
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    assert torch.equal(SCHEDULE.alphas_cumprod, torch.cumprod(1.0 - betas, dim=0))
    # a zero-terminal-SNR config (v-prediction models) is followed too: nothing of the picture at the last step
    zero_snr = EulerDiscreteScheduler.from_config(config, rescale_betas_zero_snr=True)  # type: ignore[no-untyped-call]
    assert NoiseSchedule(zero_snr).alphas_cumprod[-1] < 1e-6 < SCHEDULE.alphas_cumprod[-1]


# ---------------------------------------------------------------- the demo model's zero-terminal-SNR schedule

ZERO_SNR_SCHEDULER = demo_scheduler(zero_terminal_snr=True)
ZERO_SNR = NoiseSchedule(ZERO_SNR_SCHEDULER)


def test_the_demo_schedule_keeps_nothing_of_the_picture_at_its_noisiest_step_and_predicts_v() -> None:
    config = ZERO_SNR_SCHEDULER.config
    assert (config.prediction_type, config.timestep_spacing, config.rescale_betas_zero_snr) == (
        "v_prediction", "trailing", True,
    )
    assert ZERO_SNR.alphas_cumprod[-1].sqrt() < 1e-3 < 0.06 < SCHEDULE.alphas_cumprod[-1].sqrt()
    ZERO_SNR_SCHEDULER.set_timesteps(30)
    assert int(ZERO_SNR_SCHEDULER.timesteps[0]) == 999  # sampling starts where training had no picture


def test_the_v_target_is_diffusers_own_and_gives_back_the_picture() -> None:
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 4, 4, 4, generator=generator), torch.randn(8, 4, 4, 4, generator=generator)
    t = torch.tensor([0, 100, 300, 500, 700, 900, 990, 999])
    v = ZERO_SNR.target(x0, noise, t)
    ddpm = DDPMScheduler.from_config(ZERO_SNR_SCHEDULER.config)  # type: ignore[no-untyped-call]
    expected = ddpm.get_velocity(x0, noise, t)
    assert torch.allclose(v[:-1], expected[:-1], atol=1e-6)
    # the last step: DDPM's alpha_bar is exactly 0 there, Euler's (whose noise levels we train on) 2**-24
    assert torch.allclose(v[-1], expected[-1], atol=2**-12 * 4)
    a = ZERO_SNR.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ZERO_SNR.add_noise(x0, noise, t)
    assert torch.allclose(a.sqrt() * noisy - (1 - a).sqrt() * v, x0, atol=1e-5)
    assert torch.allclose(v[-1], -x0[-1], atol=1e-3)  # at the last step: minus the picture, from the caption alone
    assert torch.equal(SCHEDULE.target(x0, noise, t), noise)  # an epsilon model's target is the noise


def test_v_loss_weights_the_picture_error_at_least_as_much_at_the_noisiest_steps() -> None:
    weight = ZERO_SNR.loss_weight(T, 5.0, 1.0)
    picture_weight = weight * (ZERO_SNR.snr(T) + 1)  # a v error is a picture error times sqrt(SNR + 1)
    assert torch.allclose(picture_weight, ZERO_SNR.snr(T).clamp(max=5.0) + 1.0)
    noisy = ZERO_SNR.snr(T) <= 5.0
    assert torch.allclose(weight[noisy], torch.ones_like(weight[noisy]))  # plain v loss up to SNR 5
    assert weight[0] < 1.0 and picture_weight[999] >= 1.0


def test_said_reads_back_what_each_caption_variant_says() -> None:
    import random

    from training import shapes
    from training.train_demo import WORD_KINDS, TrainingSettings, caption_variant, said

    rng = random.Random(3)
    settings = TrainingSettings(filler=0.5)
    seen = set()
    for scene in shapes.scenes(0, 300):
        caption = caption_variant(scene, rng, settings)
        shape, colour, background, position, size = (
            values[index] for values, index in zip(WORD_KINDS.values(), said(scene, caption), strict=True)
        )
        assert (shape, colour, background) == (scene.shape, scene.colour, scene.background)
        assert position == (scene.position if scene.position in caption else "not said")
        assert size == (scene.size if f"a {scene.size} {scene.colour}" in caption else "not said")
        seen.add((position == "not said", size == "not said", caption.startswith("a ")))
    assert len(seen) == 8  # every mix of left-out words, with and without filler words in front


def test_the_word_heads_make_the_text_encoders_tell_shape_and_position_words_apart() -> None:
    """On the untrained demo encoders (zero token tables: every word reads the same), a few steps of the word
    loss alone separate captions that differ only in their shape or their position word."""
    from training import shapes
    from training.demo_architecture import build_untrained_pipeline
    from training.train_demo import TextEncoding, WordHeads, said

    pipe = build_untrained_pipeline(seed=0)
    text = TextEncoding(pipe)
    heads = WordHeads(pipe.unet.config.cross_attention_dim, pipe.text_encoder_2.config.projection_dim, seed=0)
    base = shapes.Scene("circle", "red", "white", "on the left", "large")
    variants = [base, shapes.Scene("square", "red", "white", "on the left", "large"),
                shapes.Scene("circle", "red", "white", "at the top", "large")]
    captions = [shapes.caption(s) for s in variants]

    def moved() -> list[float]:
        with torch.no_grad():
            embeds, _ = text.encode(captions)
        return [float((embeds[i] - embeds[0]).norm()) for i in (1, 2)]

    assert max(moved()) < 1e-4  # before: the shape and the position word change nothing
    scenes = shapes.scenes(0, 256)
    all_captions = [shapes.caption(s) for s in scenes]
    targets = torch.tensor([said(s, c) for s, c in zip(scenes, all_captions, strict=True)])
    params = [*pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    first = last = 0.0
    for step in range(100):
        batch = torch.randint(0, len(scenes), (32,), generator=generator).tolist()
        embeds, pooled = text.encode([all_captions[i] for i in batch])
        loss = heads(embeds, pooled, targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first, last = (loss.item() if step == 0 else first), loss.item()
    assert last < first / 4
    assert min(moved()) > 1.0  # after: both words move what the UNet would read


def test_outline_weights_weigh_the_shape_s_outline_and_nothing_else() -> None:
    from training import shapes
    from training.train_demo import cell_means, outline_weights, to_latents

    scene = shapes.Scene("triangle", "red", "white", "in the center", "large")
    latents = to_latents(torch.from_numpy(cell_means(shapes.render(scene, 256)))[None])
    weights = outline_weights(latents, 5.0)[0, 0]
    assert weights.shape == (32, 32) and float(weights.max()) == 6.0
    assert float(weights[:4].max()) < 1.001 and float(weights[:, :4].max()) < 1.001  # the background far from it
    assert float(weights[16, 16]) < 1.5  # the inside of the triangle is flat too
    outline = weights > 2.0
    assert 10 < int(outline.sum()) < 100  # a ring of cells, not the picture
    flat = to_latents(torch.full((1, 3, 32, 32), 0.3))
    assert torch.allclose(outline_weights(flat, 5.0), torch.ones(1, 1, 32, 32))
