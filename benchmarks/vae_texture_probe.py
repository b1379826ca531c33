"""Can a tiny f8 VAE draw the tiny world's texture? A probe for the tiny-world work.

Trains the tiny backbone's VAE architecture from scratch on 64 px crops of the procedural
scene views with a chosen loss, then scores 64 held-out crops: the Laplacian energy of
the round trip over the input's (the competence target asks for at least 0.5), how much
of it matches the input (correlation of the Laplacians), and, for comparison, what a 4x
down-up keeps (the target asks for at most 0.1).

Losses: "copy" is the recipe's (L1 + L1 of the Laplacian); "energy" adds a term that
asks each 8x8 block of the reconstruction for the input's Laplacian energy, so the
decoder may synthesize texture of the right strength instead of averaging it away.

    python benchmarks/vae_texture_probe.py --loss energy --steps 600 --channels 4
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F


def crops(count: int, seed: int, size: int = 64) -> torch.Tensor:
    """(count, 3, size, size) in [-1, 1]: one random crop of each of `count` scene views."""
    from patch_adapter.tiny_world.recipe import model_batch
    from patch_adapter.tiny_world.views import scene_view

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        pixels = scene_view(seed * 1_000_003 + i, 128).pixels
        top, left = rng.integers(0, 128 - size + 1, 2)
        out.append(pixels[top : top + size, left : left + size])
    return model_batch(np.stack(out))


def loss_of(kind: str, reconstruction: torch.Tensor, x: torch.Tensor, energy_weight: float) -> torch.Tensor:
    """The recipe's VAE loss; "copy" is it without the block-energy term."""
    from patch_adapter.tiny_world.recipe import vae_loss

    return vae_loss(reconstruction, x, energy_weight if kind == "energy" else 0.0)[0]


@torch.no_grad()
def scores(vae, held_out: torch.Tensor) -> dict:
    from patch_adapter.tiny_world.competence import laplacian

    reconstruction = vae.decode(vae.encode(held_out).latent_dist.mode()).sample.clamp(-1, 1)
    down_up = F.interpolate(F.interpolate(held_out, scale_factor=0.25, mode="area"), scale_factor=4, mode="bicubic")
    truth, ours = laplacian(held_out), laplacian(reconstruction)
    energy = (truth**2).mean().item()
    match = (truth * ours).mean().item() / energy
    return {
        "l1": F.l1_loss(reconstruction, held_out).item(),
        "energy_kept": (ours**2).mean().item() / energy,
        "energy_matching": match,
        "down_up_energy_kept": (laplacian(down_up) ** 2).mean().item() / energy,
    }


def main() -> None:
    from diffusers import AutoencoderKL

    from patch_adapter.tiny_world.architecture import tiny_configs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=("copy", "energy"), default="energy")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--channels", type=int, default=4, help="latent channels")
    parser.add_argument("--energy-weight", type=float, default=10.0, help="weight of the block-energy term")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--views", type=int, default=512)
    parser.add_argument("--json", help="write the scores here too")
    args = parser.parse_args()

    torch.manual_seed(0)
    train, held_out = crops(args.views, seed=1), crops(64, seed=2)
    vae = AutoencoderKL(**(tiny_configs()["vae"] | {"latent_channels": args.channels}))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for step in range(args.steps):
        x = train[torch.from_numpy(rng.integers(0, len(train), args.batch))]
        posterior = vae.encode(x).latent_dist
        loss = (
            loss_of(args.loss, vae.decode(posterior.sample()).sample, x, args.energy_weight)
            + 1e-6 * posterior.kl().mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    vae.eval()
    result = {**vars(args), "seconds": round(time.perf_counter() - started), **scores(vae, held_out)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
