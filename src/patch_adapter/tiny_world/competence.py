"""What the tiny backbone can do at its native size, measured against the world's truth.

`texture_energy_kept` is the VAE's share of the competence targets: a round trip of a
full-resolution textured background should keep at least half of its high-frequency
(Laplacian) energy, while a 4x down-up of the same picture keeps at most a tenth, so
that the texture remains something only full-resolution work can restore.
`vae_insert_ceiling` is the VAE's other share: what a round trip keeps of the objects
bounds what any UNet can draw (`insert_accuracy`); `phantom_objects` checks that it
does not draw objects where there are none, and `removal_round_trip_objects` how many
it paints into the flat, upsampled fills that stage 2 encodes at full resolution.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from ..image_io import from_float, from_model_range, to_float, to_model_range
from .architecture import NATIVE_SIZE
from .scenes import Scene, random_background, render_scene


def textured_backgrounds(count: int, side: int, seed: int = 0) -> np.ndarray:
    """(count, side, side, 3) uint8: object-free scenes rendered at their full resolution."""
    rng = np.random.default_rng(seed)
    return np.stack([render_scene(Scene(side, side, random_background(rng))) for _ in range(count)])


def laplacian(x: torch.Tensor) -> torch.Tensor:
    """4-neighbour Laplacian of each channel of (B, C, H, W), without padding: (B, C, H - 2, W - 2)."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=x.dtype, device=x.device)
    kernel = kernel.view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(x, kernel, groups=x.shape[1])


def laplacian_energy(pixels: torch.Tensor) -> torch.Tensor:
    """Mean squared 4-neighbour Laplacian of the grey image, per picture: (B, 3, H, W) -> (B,)."""
    return (laplacian(pixels.mean(dim=1, keepdim=True)) ** 2).mean(dim=(1, 2, 3))


@torch.no_grad()
def vae_round_trip(vae, pictures: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the VAE's reconstruction of them (latent mode), in [0, 1]."""
    weight = next(vae.parameters())
    round_trips = []
    for batch in pictures.split(16):
        latents = vae.encode(to_model_range(batch).to(weight.device, weight.dtype)).latent_dist.mode()
        round_trips.append(from_model_range(vae.decode(latents).sample.float().cpu()).clamp(0, 1))
    return torch.cat(round_trips)


def round_trip_pictures(vae, pictures: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 pictures -> their VAE round trips as uint8 pictures: what the detector reads."""
    decoded = vae_round_trip(vae, torch.from_numpy(to_float(pictures)).permute(0, 3, 1, 2))
    return from_float(decoded.permute(0, 2, 3, 1).numpy())


@torch.no_grad()
def texture_versions(vae, count: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(truth, VAE round trip, 4x down-up) of `textured_backgrounds`, each (count, 3, side, side) in [0, 1]."""
    pictures = torch.from_numpy(to_float(textured_backgrounds(count, side, seed))).permute(0, 3, 1, 2)
    down_up = F.interpolate(F.interpolate(pictures, scale_factor=0.25, mode="area"), scale_factor=4, mode="bicubic")
    return pictures, vae_round_trip(vae, pictures), down_up.clamp(0, 1)


def texture_energy_kept(vae, count: int = 32, side: int = 128, seed: int = 0) -> dict:
    """Laplacian energy of a VAE round trip and of a 4x down-up, over the truth's, on textured backgrounds.

    Returns {"round_trip", "down_up_4x"}: means over `count` pictures of the per-picture
    ratios (1.0 keeps all of the texture's energy; 0 decodes it flat).
    """
    pictures, round_trip, down_up = texture_versions(vae, count, side, seed)
    truth = laplacian_energy(pictures)
    return {
        "round_trip": float((laplacian_energy(round_trip) / truth).mean()),
        "down_up_4x": float((laplacian_energy(down_up) / truth).mean()),
    }


SPECTRUM_WINDOW = 16
"""Side of the windows `texture_spectrum` averages over: two to four periods of the world's lines and dots."""


def opponent_colours(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> grey level and two colour differences: the world's textures are grey, speckle is not."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.cat([(r + g + b) / 3, r - g, (r + g) / 2 - b], dim=1)


def texture_spectrum(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Welch amplitude spectrum of each picture's fine detail: (B, 3, W, W // 2 + 1) for W = SPECTRUM_WINDOW.

    The power spectra of half-overlapping W x W Hann windows (each less its mean), averaged
    over a picture's windows (weighted by `weight`, (B, number of windows), if given), in
    `opponent_colours`. It holds the texture's frequencies and orientations but not its
    phase: two renders of one texture at other phases have nearly equal spectra (0.01
    apart by `spectrum_error`), a flat decode and one that draws a grid of its own do not.
    The lowest frequencies (a window's gradient and tint) are zeroed: they are the copy's.
    """
    window = SPECTRUM_WINDOW
    b, c = x.shape[:2]
    patches = F.unfold(opponent_colours(x), window, stride=window // 2)  # (B, 3 * W * W, windows)
    patches = patches.view(b, c, window, window, -1).permute(0, 4, 1, 2, 3)
    patches = patches - patches.mean(dim=(-2, -1), keepdim=True)
    hann = torch.hann_window(window, periodic=False, dtype=x.dtype, device=x.device)
    power = torch.fft.rfft2(patches * (hann[:, None] * hann[None, :])).abs() ** 2  # (B, windows, 3, W, W/2+1)
    if weight is None:
        power = power.mean(dim=1)
    else:
        weight = weight[:, :, None, None, None]
        power = (power * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1e-8)
    low = torch.zeros(window, window // 2 + 1, dtype=torch.bool, device=x.device)
    low[:2, :2] = low[-1:, :2] = True  # frequencies 0 and 1 (negative vertical frequencies wrap around)
    return (power + 1e-12).sqrt().masked_fill(low, 0.0)


def spectrum_error(spectrum: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(B,): L1 distance of `texture_spectrum`s over the truth's total (0: the same texture; a flat decode ~0.9)."""
    return (spectrum - truth).abs().sum(dim=(1, 2, 3)) / truth.sum(dim=(1, 2, 3)).clamp_min(1e-8)


def texture_spectrum_error(vae, count: int = 32, side: int = 128, seed: int = 0) -> dict:
    """How unlike the world's texture a VAE round trip's is (`spectrum_error`), and a 4x down-up's, on backgrounds.

    `texture_energy_kept` counts the energy and is fooled by a decoder that draws texture
    of its own: measured, a decoder tuned on block energy kept 0.72 of it by drawing a 4 px
    grid with colour speckle, spectrum error 1.61 where the flat decode it replaced had
    1.02 and a 4x down-up 0.95 (docs/tiny-world.md, "A texture of the world's spectrum").
    Returns {"round_trip", "down_up_4x"}: means over `count` pictures (0: the truth's texture).
    """
    pictures, round_trip, down_up = texture_versions(vae, count, side, seed)
    truth = texture_spectrum(pictures)
    return {
        "round_trip": float(spectrum_error(texture_spectrum(round_trip), truth).mean()),
        "down_up_4x": float(spectrum_error(texture_spectrum(down_up), truth).mean()),
    }


NATIVE_PLACEMENTS = ("free", "border")
"""Placements a native-size picture can hold (a "large" target exceeds the picture; "small" is 4x-and-up's)."""


def native_insert_tasks(count: int, seed: int = 0):
    """The `count` native-size insert tasks competence is measured on (every mask kind, free and at a border)."""
    from ..evaluation.tasks import MASK_KINDS, make_task

    for i in range(count):
        task_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        placement = NATIVE_PLACEMENTS[i % len(NATIVE_PLACEMENTS)]
        yield make_task(
            "insert", task_seed, NATIVE_SIZE, NATIVE_SIZE, NATIVE_SIZE, MASK_KINDS[i % len(MASK_KINDS)], placement
        )


def read_back(outputs, tasks) -> dict:
    """Share of `outputs` whose masked object is the task's target: colour and shape, colour, one object."""
    from ..evaluation.detector import count_objects, detect_object

    right = colour = single = 0
    for output, task in zip(outputs, tasks, strict=True):
        detected = detect_object(output, task.mask)
        right += detected == (task.target.colour, task.target.shape)
        colour += detected[0] == task.target.colour
        single += count_objects(output, task.mask) == 1
    n = len(tasks)
    return {"accuracy": right / n, "colour": colour / n, "single_object": single / n, "n": n}


def fill_tasks(pipe, tasks, settings) -> list[np.ndarray]:
    """Each task inpainted by `pipe` with `settings`, its noise seeded by the task's own seed: the result pictures."""
    return [
        pipe(
            prompt=task.prompt,
            image=task.image,
            mask_image=task.mask,
            generator=torch.Generator().manual_seed(task.seed),
            settings=settings,
        ).arrays[0]
        for task in tasks
    ]


def insert_accuracy(pipe, count: int = 48, seed: int = 0, steps: int = 20, **settings) -> dict:
    """The backbone's competence at its native size: share of inserts whose colour and shape are read back.

    `count` insert tasks of native-size pictures (`native_insert_tasks`), filled by `pipe`
    with the settings given (by default Patch-Adapter's, which at native size is one
    denoising pass). Returns {"accuracy", "colour", "single_object", "n"}.
    """
    from ..settings import InpaintSettings

    tasks = list(native_insert_tasks(count, seed))
    return read_back(fill_tasks(pipe, tasks, InpaintSettings(num_inference_steps=steps, **settings)), tasks)


@torch.no_grad()
def vae_insert_ceiling(vae, count: int = 48, seed: int = 0) -> dict:
    """The same read-back on VAE round trips of the inserts' truths: the most any latent fill can reach.

    A fill is decoded by the VAE, so an object the round trip blurs into a blob of
    another colour cannot be drawn by any UNet (measured: the first VAE stage read back
    0.08 of them, the first shipped VAE 0.23; docs/tiny-world.md).
    """
    tasks = list(native_insert_tasks(count, seed))
    decoded = round_trip_pictures(vae, np.stack([task.truth[..., :3] for task in tasks]))
    return read_back(list(decoded), tasks)


@torch.no_grad()
def phantom_objects(vae, count: int = 32, side: int = NATIVE_SIZE, seed: int = 0) -> float:
    """Objects the detector finds in VAE round trips of object-free backgrounds, per picture (truth: 0).

    The ceiling reads only where an object is: a decoder that paints objects where
    there are none reads as well there. Measured: the shipped VAE 0, VAE stage 2 0.06,
    a decoder fine-tuned against a patch critic with a texture-energy term 2.2 (docs/tiny-world.md).
    """
    from ..evaluation.detector import count_objects

    decoded = round_trip_pictures(vae, textured_backgrounds(count, side, seed))
    everywhere = np.ones((side, side), dtype=bool)
    return float(np.mean([count_objects(picture, everywhere) for picture in decoded]))


@torch.no_grad()
def mask_errors(pipe, latents, masked_latents, masks, prompts, timesteps=(100, 300, 500, 700, 900), seed=0) -> dict:
    """The UNet's noise-prediction error inside and outside the lessons' masks, per timestep and caption.

    Why inserts fail, in two numbers: outside the mask the answer can be copied from the
    masked latents, inside it must be drawn; and a model that uses its caption errs less
    inside the mask with the lesson's own caption than with none or another lesson's.
    `latents`, `masked_latents`: (B, 4, h, w) as the recipe encodes them; `masks`: the
    (B, 1, H, W) pixel masks; `prompts`: one caption each. Returns {"timesteps": [...],
    "caption" | "no_caption" | "other_caption": {"inside": [...], "outside": [...]}}.
    """
    from diffusers import DDPMScheduler

    from ..training.trainer import encode_captions, micro_time_ids, predict_noise, stage_latent_mask

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    factor = pipe.vae_scale_factor
    latents, masked_latents = latents.to(pipe._execution_device), masked_latents.to(pipe._execution_device)
    mask = stage_latent_mask(masks.float(), "stage2", factor).to(latents.device)
    inside_share = mask.expand(-1, latents.shape[1], -1, -1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents.device)
    prompts = list(prompts)
    captions = {"caption": prompts, "no_caption": [""] * len(prompts), "other_caption": prompts[1:] + prompts[:1]}
    result = {"timesteps": list(timesteps)}
    for kind, texts in captions.items():
        embeds, pooled = encode_captions(pipe, texts)
        time_ids = micro_time_ids(
            pipe, len(texts), latents.shape[-2] * factor, latents.shape[-1] * factor, embeds, pooled
        )
        inside, outside = [], []
        for t in timesteps:
            step = torch.full((len(texts),), t, device=latents.device)
            noisy = scheduler.add_noise(latents, noise, step)
            prediction = predict_noise(
                pipe.unet, noisy, mask, masked_latents, step, embeds, pooled, time_ids, {"dca_scale": 0.0}
            )
            error = (prediction.float() - noise) ** 2
            inside.append(float((error * inside_share).sum() / inside_share.sum().clamp_min(1)))
            outside.append(float((error * (1 - inside_share)).sum() / (1 - inside_share).sum().clamp_min(1)))
        result[kind] = {"inside": inside, "outside": outside}
    return result


def removal_round_trip_objects(pipe, size: int, count: int, seed: int = 0, steps: int = 10, vae=None) -> dict:
    """Share of removals whose fill holds an object: `resize`'s fill, and that fill after one VAE round trip.

    The quality benchmark's first `count` removals at size x size (its tasks, seed and
    noise) are filled by `resize`, whose upsampled fill is flat, as stage 2's references
    are; the round trip (no denoising) is what encoding and decoding that fill at full
    resolution adds. `vae`: the one to round-trip with (default the pipeline's; a
    candidate decoder can be measured on the same fills). Returns {"resize",
    "round_trip", "n"}; truth 0 for both.
    """
    from ..evaluation.benchmark import METHODS, benchmark_task
    from ..evaluation.detector import count_objects

    tasks = (benchmark_task(seed, index, size, size, pipe.native_size) for index in itertools.count())
    removals = list(itertools.islice((task for task in tasks if task.kind == "remove"), count))
    fills = fill_tasks(pipe, removals, METHODS["resize"].replace(num_inference_steps=steps))
    resize = round_trip = 0
    for fill, task in zip(fills, removals, strict=True):
        decoded = round_trip_pictures(pipe.vae if vae is None else vae, fill[None, ..., :3])[0]
        resize += count_objects(fill, task.mask) > 0
        round_trip += count_objects(np.where(task.mask[..., None], decoded, fill[..., :3]), task.mask) > 0
    return {"resize": resize / count, "round_trip": round_trip / count, "n": count}


def main(argv=None) -> int:
    """Print the competence figures of a tiny backbone folder (default: the shipped one)."""
    import argparse
    import json

    from ..pipeline import PatchAdapterPipeline

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="tiny", help="a tiny backbone's diffusers folder (default: tiny)")
    parser.add_argument("--count", type=int, default=48, help="insert tasks at native size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--removals", type=int, default=0, help="also round-trip resize's fills of this many benchmark removals"
    )
    parser.add_argument("--removal-size", type=int, default=512, help="the removals' side (4x native: 512)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = PatchAdapterPipeline.from_pretrained(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    figures = {
        "texture_energy_kept": texture_energy_kept(pipe.vae),
        "texture_spectrum_error": texture_spectrum_error(pipe.vae),
        "vae_insert_ceiling": vae_insert_ceiling(pipe.vae, args.count),
        "vae_phantom_objects": phantom_objects(pipe.vae),
        "insert_at_native": insert_accuracy(pipe, args.count, steps=args.steps),
    }
    if args.removals:
        figures["removal_round_trip_objects"] = removal_round_trip_objects(pipe, args.removal_size, args.removals)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
