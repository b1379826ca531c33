"""Training both adapters on the tiny backbone: learning, a frozen backbone, exact resume,
the pipeline reading the result, the command line, and two processes through accelerate.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from patch_adapter.adapters import adapter_state_dict, install_adapters, read_manifest
from patch_adapter.backbone import load_backbone
from patch_adapter.cli import main
from patch_adapter.pipeline import PatchAdapterPipeline
from patch_adapter.training.config import resolve_config
from patch_adapter.training.data import make_toy_dataset
from patch_adapter.training.trainer import train

KIND = {"stage1": "dca", "stage2": "rpa"}
QUIET = dict(dataloader_num_workers=0, report_to="none", validation_steps=-1)


def run(stage, data, output, **settings):
    return train(resolve_config(stage, overrides=dict(data=str(data), output=str(output), **QUIET, **settings)))


def memorise(stage, tmp_path_factory, **settings):
    """Train on one fixed batch (image, mask, noise, timestep): the loss must fall if gradients reach the adapter.

    With fresh noise every step the random-weight tiny backbone gives the adapters
    little to learn from in a short run (about -7% in 60 steps); one repeated batch
    is the classic check that the loop, the loss and the optimizer work together.
    """
    root = tmp_path_factory.mktemp(stage)
    data = make_toy_dataset(root / "data", count=1, size=64 if stage == "stage1" else 256)
    return run(
        stage,
        data,
        root / "out",
        overfit_batches=1,
        caption_dropout=0.0,
        lr_warmup_steps=0,
        mask_mix={"box": 1.0},
        seed=0,
        **settings,
    )


@pytest.fixture(scope="module")
def trained_stage1(tmp_path_factory):
    # 64 px buckets: the tiny UNet's cross-attention then spans a larger share of the output
    return memorise("stage1", tmp_path_factory, max_steps=100, learning_rate=0.1, resolution=64)


@pytest.fixture(scope="module")
def trained_stage2(tmp_path_factory):
    return memorise("stage2", tmp_path_factory, max_steps=80, learning_rate=0.03)


def first_and_last(losses):
    return float(np.mean(losses[:10])), float(np.mean(losses[-10:]))


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_loss_falls_on_a_fixed_batch(stage, request):
    result = request.getfixturevalue(f"trained_{stage}")
    first, last = first_and_last(result.losses)
    assert last < 0.7 * first, (first, last)
    logged = [json.loads(line) for line in (result.output / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == result.losses
    assert all(r["steps_per_s"] > 0 and r["lr"] > 0 for r in logged)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_backbone_stays_frozen_and_checkpoints_hold_only_the_adapter(stage, request):
    result = request.getfixturevalue(f"trained_{stage}")
    kind = KIND[stage]
    fresh = load_backbone("tiny")  # what the trainer started from
    install_adapters(fresh["unet"])
    initial = adapter_state_dict(fresh["unet"], [kind])
    trained = result.pipeline
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        before, after = fresh[name].state_dict(), getattr(trained, name).state_dict()
        frozen = set(before) - set(initial)  # the backbone, and the other stage's adapter
        changed = sorted(k for k in frozen if not torch.equal(before[k], after[k]))
        assert not changed, f"{name}: {changed[:3]}"
    assert any(not torch.equal(initial[k], v) for k, v in adapter_state_dict(trained.unet, [kind]).items())

    checkpoint = result.output / f"checkpoint-{result.steps}"
    assert set(load_file(str(checkpoint / "adapter.safetensors"))) == set(initial)
    weight_files = [p.name for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    assert sorted(weight_files) == ["adapter.safetensors", "optimizer.bin", "scheduler.bin"]
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    assert len(optimizer["state"]) == len(initial)  # Adam moments for the adapter's tensors only
    assert read_manifest(result.weights)["adapters"] == [kind]
    assert set(load_file(str(result.weights))) == set(initial)


# --------------------------------------------------------------------------- the pipeline reads the result


def inpaint(pipe, size):
    image = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=bool)
    mask[size // 4 : size // 2, size // 4 : 3 * size // 4] = True
    out = pipe(
        prompt="a red circle",
        image=image,
        mask_image=mask,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
    ).arrays[0]
    return out.astype(int), mask


@pytest.mark.parametrize("stage, size", [("stage1", 128), ("stage2", 256)])
def test_trained_adapter_loads_into_the_pipeline_and_changes_its_output(stage, size, request):
    result = request.getfixturevalue(f"trained_{stage}")
    plain = PatchAdapterPipeline.from_pretrained("tiny", device="cpu", adapter=False)  # not the shipped adapters
    plain.set_progress_bar_config(disable=True)
    adapted = PatchAdapterPipeline.from_pretrained("tiny", device="cpu", adapter=False)
    adapted.load_adapter(result.weights)
    adapted.set_progress_bar_config(disable=True)
    trained = load_file(str(result.weights))
    loaded = adapter_state_dict(adapted.unet, [KIND[stage]])
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    before, mask = inpaint(plain, size)
    after, _ = inpaint(adapted, size)
    assert np.abs(after - before)[mask].max() > 0  # how much depends on the backbone; that it acts does not
    assert np.array_equal(after[~mask], before[~mask])


# --------------------------------------------------------------------------- resume


def test_resume_continues_exactly(tmp_path):
    data = make_toy_dataset(tmp_path / "data", count=3, size=(160, 128))
    settings = dict(
        learning_rate=1e-3,
        lr_warmup_steps=4,
        ema_decay=0.9,
        gradient_accumulation_steps=2,
        checkpointing_steps=3,
        seed=5,
        resolution=64,
    )
    whole = run("stage1", data, tmp_path / "whole", max_steps=6, **settings)
    run("stage1", data, tmp_path / "split", max_steps=3, **settings)
    resumed = run("stage1", data, tmp_path / "split", max_steps=6, resume="latest", **settings)
    assert resumed.steps == 6 and len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(whole.losses[3:], abs=1e-6)
    for name in ("checkpoint-6/adapter.safetensors", "dca.safetensors"):  # raw weights, and the EMA export
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "split" / name))
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
    logs = [
        [json.loads(x)["loss"] for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
        for d in ("whole", "split")
    ]
    assert logs[1] == pytest.approx(logs[0], abs=1e-6)  # one line per step, none repeated


# --------------------------------------------------------------------------- unreadable data


def test_corrupt_images_are_skipped_counted_and_reported(tmp_path):
    data = make_toy_dataset(tmp_path / "data", count=2, size=64, captions="sidecar")
    (data / "broken.png").write_bytes(b"not an image at all")
    good = (data / "scene_0000.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    result = run("stage1", data, tmp_path / "out", max_steps=1, batch_size=3, resolution=64)
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["skipped_unreadable"] == 2
    assert sorted(summary["skipped_files"]) == [str(data / "broken.png"), str(data / "truncated.png")]
    assert result.skipped == summary["skipped_files"]


# --------------------------------------------------------------------------- command line


def test_cli_trains_stage1_with_a_config_file_under_the_flags(tmp_path, capsys):
    data = make_toy_dataset(tmp_path / "data", count=2, size=64)
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "max_steps": 50,
                "learning_rate": 0.002,
                "lr_warmup_steps": 0,
                "resolution": 64,
                "dataloader_num_workers": 0,
                "report_to": "none",
                "validation_inference_steps": 2,
                "stage2": {"learning_rate": 0.5},  # another stage's table: not used here
            }
        )
    )
    out = tmp_path / "out"
    code = main(
        [
            "train",
            "stage1",
            "--model",
            "tiny",
            "--data",
            str(data),
            "--output",
            str(out),
            "--max-steps",
            "2",
            "--seed",
            "3",
            "--config",
            str(config),
        ]
    )
    assert code == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert read_manifest(out / "dca.safetensors")["adapters"] == ["dca"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # the flag won over the file's max_steps
    assert all(set(r) == {"step", "loss", "lr", "steps_per_s"} and r["lr"] == 0.002 for r in log)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["max_steps"], resolved["seed"], resolved["learning_rate"]) == (2, 3, 0.002)
    assert (out / "validation" / "step-0000002.png").is_file()


@pytest.mark.parametrize(
    "text, key", [("learning_rat: 0.001\n", "learning_rat"), ("stage2:\n  dca_scal: 1\n", "dca_scal")]
)
def test_cli_rejects_an_unknown_config_key(tmp_path, capsys, text, key):
    config = tmp_path / "train.yaml"
    config.write_text(text)
    code = main(
        ["train", "stage1", "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--config", str(config)]
    )
    assert code == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_accelerate_launch(tmp_path):
    data = make_toy_dataset(tmp_path / "data", count=4, size=64)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"resolution": 64, **QUIET}))
    out = tmp_path / "out"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "-m",
        "patch_adapter.cli",
        "train",
        "stage1",
        "--model",
        "tiny",
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--seed",
        "0",
        "--config",
        str(config),
    ]
    # output to files, not pipes: workers that outlive a killed launcher would hold pipes open
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        launcher = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            launcher.wait(timeout=180)
        except subprocess.TimeoutExpired:
            launcher.terminate()  # torch's launcher stops its workers on SIGTERM
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
            pytest.fail(
                "two-process training did not finish in 180 s:\n" + (tmp_path / "stderr.txt").read_text()[-3000:]
            )
    assert launcher.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    checkpoint = out / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert (checkpoint / "adapter.safetensors").is_file() and (out / "dca.safetensors").is_file()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2  # written once, by the main process
    assert (tmp_path / "stdout.txt").read_text().count("trained 2 steps") == 1


def test_mask_weight_adds_the_error_inside_the_mask():
    """`denoising_loss(mask_weight=w)` is the whole-latent MSE plus w times the MSE inside the mask."""
    from diffusers import DDPMScheduler

    from patch_adapter.training.trainer import denoising_loss

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :2, :4] = 1  # a small mask in the first sample, none in the second
    prediction = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def unet(*args, **kwargs):
        return (prediction,)

    def loss(weight):
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        value = denoising_loss(
            unet, scheduler, latents, mask, latents, None, None, None, {}, generator, torch.float32, mask_weight=weight
        )
        return value, (prediction - noise) ** 2

    plain, error = loss(0.0)
    assert plain == pytest.approx(error.mean().item(), rel=1e-6)  # as before: the whole-latent MSE
    weighted, _ = loss(3.0)
    inside = error[0][:, :2, :4].mean().item()  # the second sample has no mask: it adds nothing
    assert weighted.item() == pytest.approx(error.mean().item() + 3.0 * inside / 2, rel=1e-6)
    assert weighted.item() > plain.item() + 0.1


def test_max_timestep_draws_only_the_timesteps_below_it():
    """`denoising_loss(max_timestep=m)` gives the UNet timesteps in [0, m) only; m outside the schedule is refused."""
    from diffusers import DDPMScheduler

    from patch_adapter.training.trainer import denoising_loss

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    latents = torch.zeros(64, 4, 2, 2)
    mask = torch.ones(64, 1, 2, 2)
    seen = []

    def unet(noisy, timesteps, **kwargs):
        seen.append(timesteps.clone())
        return (torch.zeros_like(noisy[:, :4]),)

    def draw(limit):
        seen.clear()
        args = (unet, scheduler, latents, mask, latents, None, None, None, {}, torch.Generator().manual_seed(0))
        denoising_loss(*args, torch.float32, max_timestep=limit)
        return seen[0]

    everything = draw(None)
    assert everything.max() >= 600  # 64 draws from [0, 1000): the test below could fail
    limited = draw(600)
    assert limited.max() < 600 and limited.min() >= 0 and len(set(limited.tolist())) > 32
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="max_timestep"):
            draw(bad)


@pytest.mark.parametrize("key, value", [("mask_weight", -1.0), ("max_timestep", -5), ("detail_weight", -0.5)])
def test_config_refuses_negative_loss_settings(key, value):
    from patch_adapter.training.config import TrainConfig

    with pytest.raises(ValueError, match=key):
        TrainConfig(**{key: value})


def test_a_run_hands_its_loss_settings_to_the_loss(tmp_path, monkeypatch):
    """The loss settings of a run's config reach `denoising_loss` (not dropped on the way)."""
    from patch_adapter.training import trainer

    calls = []
    original = trainer.denoising_loss

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "denoising_loss", recording)
    data = make_toy_dataset(tmp_path / "data", count=1, size=256)
    run("stage2", data, tmp_path / "out", max_steps=1, mask_weight=2.5, max_timestep=600, detail_weight=5.0, seed=0)
    assert calls
    assert all((c["mask_weight"], c["max_timestep"], c["detail_weight"]) == (2.5, 600, 5.0) for c in calls)


def test_detail_error_is_zero_for_the_truth_and_counts_a_flat_fill_inside_the_mask_only():
    from diffusers import DDPMScheduler

    from patch_adapter.training.trainer import detail_error

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([100])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    alpha_bar = scheduler.alphas_cumprod[100]
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1

    def prediction_for(clean):  # the epsilon whose clean-latent estimate is `clean`
        return (noisy - alpha_bar.sqrt() * clean) / (1 - alpha_bar).sqrt()

    def error(clean):
        return detail_error(scheduler, noisy, prediction_for(clean), latents, timesteps, mask).item()

    assert error(latents) == pytest.approx(0.0, abs=1e-8)
    flat = latents.mean(dim=(2, 3), keepdim=True).expand_as(latents)
    flat_inside = torch.where(mask.bool(), flat, latents)
    flat_outside = torch.where(mask.bool(), latents, flat)
    assert error(flat_inside) > 0.05
    # only the columns next to the mask's edge see the flat outside through the 3x3 blur
    assert error(flat_outside) < error(flat_inside) / 2


def test_detail_weight_adds_the_detail_error_of_the_same_draw():
    """`denoising_loss(detail_weight=w)` is the MSE plus w times `detail_error` of the noise and timesteps it drew."""
    from diffusers import DDPMScheduler

    from patch_adapter.training import trainer

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    seen = {}

    def unet(noisy, timesteps, **kwargs):
        seen.update(noisy=noisy[:, :4], timesteps=timesteps)  # the UNet's input: noisy latents, mask, masked
        return (torch.zeros_like(noisy[:, :4]),)  # predicts no noise: a fill that keeps the noisy latents' grain

    def loss(weight):
        args = (unet, scheduler, latents, mask, latents, None, None, None, {}, torch.Generator().manual_seed(0))
        return trainer.denoising_loss(*args, torch.float32, detail_weight=weight).item()

    plain = loss(0.0)
    detail = trainer.detail_error(
        scheduler, seen["noisy"], torch.zeros_like(latents), latents, seen["timesteps"], mask
    ).mean()
    assert detail.item() > 1e-3  # the test below could fail
    assert loss(4.0) == pytest.approx(plain + 4.0 * detail.item(), rel=1e-5)
