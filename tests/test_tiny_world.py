"""The tiny world: its tokenizer, its training views and the recipe that trains the tiny backbone."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from patch_adapter.evaluation.detector import detect_object
from patch_adapter.tiny_world.scenes import OBJECT_COLOURS, SHAPES, VOCABULARY
from patch_adapter.tiny_world.tokenizer import tiny_tokenizer, word_tokenizer
from patch_adapter.tiny_world.views import export_scene_folder, scene_view


def test_every_vocabulary_word_is_one_token_and_other_text_still_tokenizes():
    tokenizer = tiny_tokenizer()
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in VOCABULARY]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(VOCABULARY)
    sentence = "an orange star and a green cross on a beige striped background"
    assert tokenizer.tokenize(sentence) == [w + "</w>" for w in sentence.split()]
    assert len(tokenizer.tokenize("a wooden bench")) > 3  # unknown words fall back to characters
    assert tokenizer.decode(tokenizer(sentence, add_special_tokens=False).input_ids) == sentence


def test_word_tokenizer_resolves_merges_that_split_other_words():
    # "an" and "and" share a first merge, which used to cut "orange" into "or an g e"
    tokenizer = word_tokenizer(["an", "and", "orange", "banana", "bandana"])
    assert all(len(tokenizer.tokenize(w)) == 1 for w in ["an", "and", "orange", "banana", "bandana"])


def test_views_are_deterministic_and_their_lessons_are_right():
    views = [scene_view(seed) for seed in range(60)]
    again = scene_view(7)
    assert np.array_equal(again.pixels, views[7].pixels) and np.array_equal(again.mask, views[7].mask)
    assert again.prompt == views[7].prompt
    lessons = {v.lesson for v in views}
    assert lessons == {"insert", "remove", "repaint"}
    words = set(VOCABULARY)
    assert all(set(v.prompt.split()) <= words and v.mask.any() and not v.mask.all() for v in views)

    inserts = [v for v in views if v.lesson == "insert"]
    read = [detect_object(v.pixels, v.mask) for v in inserts]
    named = [tuple(v.prompt.split()[1:]) for v in inserts]
    assert all(colour in OBJECT_COLOURS and shape in SHAPES for colour, shape in named)
    right = sum(r == n for r, n in zip(read, named, strict=True))
    assert right >= 0.9 * len(inserts), list(zip(read, named, strict=True))
    removes = [v for v in views if v.lesson == "remove"]
    assert all(v.prompt.endswith("background") for v in removes)
    assert all(detect_object(v.pixels, v.mask)[0] is None for v in removes)


def test_exported_scenes_are_a_valid_training_set(tmp_path):
    from patch_adapter.training.data import scan_dataset

    folder = export_scene_folder(tmp_path / "scenes", 4, (256, 384), seed=3)
    report = scan_dataset(str(folder), min_side=256)
    assert len(report.records) == 4 and not report.unreadable
    assert all(r.masks for r in report.records)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"].split()[-1] for r in rows] == ["background"] * 4


def test_vae_training_lowers_reconstruction_loss():
    from patch_adapter.tiny_world.architecture import build_tiny_components
    from patch_adapter.tiny_world.recipe import TinyRecipe, train_vae

    views = [scene_view(seed) for seed in range(16)]
    data = {"pixels": np.stack([v.pixels for v in views])}
    vae = build_tiny_components()["vae"]
    recipe = TinyRecipe(  # the copy loss alone, on random crops
        vae_steps=200, vae_batch=4, vae_crop=32, vae_energy_weight=0.0, vae_object_weight=0.0, vae_object_crops=0.0
    )
    torch.manual_seed(0)
    report = train_vae(vae, data, recipe)
    assert report["l1_last100"] < 0.88 * report["l1_first100"]  # measured 0.81


def test_a_training_loop_stops_at_stop_at_after_its_first_step():
    """`stop_at` ends a run on a lent machine in time; the report says how many steps were done."""
    import time

    from patch_adapter.tiny_world.architecture import build_tiny_components
    from patch_adapter.tiny_world.recipe import TinyRecipe, train_vae

    data = {"pixels": np.stack([scene_view(seed).pixels for seed in range(4)])}
    vae = build_tiny_components(latent_factor=4)["vae"]
    settings = dict(vae_steps=5, vae_batch=2, vae_crop=32, vae_check_every=100)
    assert train_vae(vae, data, TinyRecipe(**settings))["steps_done"] == 5
    assert train_vae(vae, data, TinyRecipe(**settings, stop_at=time.time() - 1))["steps_done"] == 1


@pytest.mark.parametrize("factor, channels", [(8, 4), (4, 4), (4, 8)])
def test_every_latent_shape_builds_an_inpainting_backbone_that_keeps_the_outside(factor, channels):
    """The tiny world's latent shapes: SDXL-inpainting's classes, the same native size, both stages above it."""
    from patch_adapter.pipeline import PatchAdapterPipeline
    from patch_adapter.tiny_world.architecture import NATIVE_SIZE, build_tiny_components
    from patch_adapter.tiny_world.recipe import latent_shape

    components = build_tiny_components(latent_factor=factor, latent_channels=channels)
    assert latent_shape(components["vae"]) == (factor, channels)
    assert components["unet"].config.in_channels == 2 * channels + 1
    pipe = PatchAdapterPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.vae_scale_factor, pipe.native_size) == (factor, NATIVE_SIZE)
    image = np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8)
    mask = np.zeros((192, 256), dtype=bool)
    mask[50:130, 90:170] = True
    result = pipe(prompt="a red star", image=image, mask_image=mask, num_inference_steps=2)
    assert result.plan.latent_factor == factor and result.plan.tiles  # patches on this VAE's latent grid
    out = result.arrays[0]
    assert out.shape == image.shape and np.array_equal(out[~mask], image[~mask])
    assert not np.array_equal(out[mask], image[mask])


def test_the_vae_stage_refuses_to_start_from_a_vae_of_another_latent_shape(tmp_path):
    from patch_adapter.tiny_world.architecture import build_tiny_components
    from patch_adapter.tiny_world.recipe import initial_vae

    build_tiny_components(latent_factor=8)["vae"].save_pretrained(tmp_path / "weights" / "vae")
    recipe = smoke_recipe(tmp_path, vae_init="shipped")  # the recipe's f4 latents
    with pytest.raises(ValueError, match=r"latent factor and channels \(8, 4\).*--vae-init random"):
        initial_vae(recipe)
    vae, init = initial_vae(dataclasses.replace(recipe, latent_factor=8))
    assert str(tmp_path / "weights" / "vae") in init


def test_the_vae_energy_term_asks_for_texture_strength_not_its_phase():
    from patch_adapter.tiny_world.competence import textured_backgrounds
    from patch_adapter.tiny_world.recipe import model_batch, vae_loss

    x = model_batch(textured_backgrounds(4, 64, seed=1))
    shifted = torch.roll(x, shifts=(1, 1), dims=(2, 3))  # the same texture at another phase
    flat = x.mean(dim=(2, 3), keepdim=True).expand_as(x)  # what a copying decoder returns
    _, same = vae_loss(x, x, 1.0)
    _, moved = vae_loss(shifted, x, 1.0)
    _, blurred = vae_loss(flat, x, 1.0)
    assert same["energy"] == 0.0
    assert moved["energy"] < 0.1 * blurred["energy"]  # phase is free...
    assert moved["l1"] > 0.5 * blurred["l1"]  # ...while the copy loss punishes it almost as much as flatness


def test_the_decoder_loss_asks_backgrounds_for_texture_not_its_phase_and_punishes_colour_where_none_is():
    from patch_adapter.tiny_world.competence import textured_backgrounds
    from patch_adapter.tiny_world.recipe import decoder_loss, model_batch

    x = model_batch(textured_backgrounds(4, 64, seed=1))
    shifted = torch.roll(x, shifts=(1, 1), dims=(2, 3))  # the same texture at another phase
    flat = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 4), scale_factor=4)  # what L1 asks for
    losses = {name: decoder_loss(r, x, 10.0, 1.0, 10.0)[0].item() for name, r in (("same", x), ("moved", shifted))}
    losses["flat"] = decoder_loss(flat, x, 10.0, 1.0, 10.0)[0].item()
    assert losses["same"] < 1e-6
    assert losses["moved"] < 0.2 * losses["flat"]  # texture at its own phase beats the flat mean
    assert (shifted - x).abs().mean() > 0.5 * (flat - x).abs().mean()  # which plain L1 would not say
    # texture of the decoder's own, a 4 px grid as strong as the world's, costs more than drawing none
    grid = flat + 2.5 * x.std() * own_grid(x.shape[-1])
    assert decoder_loss(grid, x, 10.0, 1.0, 10.0)[0].item() > losses["flat"]

    painted = x.clone()
    painted[:, :, 20:40, 20:40] = torch.tensor([-0.7, 0.6, -0.7]).view(1, 3, 1, 1)  # a green blob on the background
    _, parts = decoder_loss(painted, x, 10.0, 1.0, 10.0)
    assert decoder_loss(x, x, 10.0, 1.0, 10.0)[1]["colour"] == 0.0 and parts["colour"] > 0.05

    picture = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    picture[0, 8:24, 8:24] = OBJECT_COLOURS["green"]
    y = model_batch(picture)
    moved_object = torch.roll(y, shifts=(2, 2), dims=(2, 3))
    assert decoder_loss(moved_object, y, 10.0, 1.0, 10.0)[1]["objects"] > 0.05  # objects are copied pixel for pixel


class Identity(torch.nn.Module):
    """A perfect VAE: its latents are the picture (or, with `factor`, the picture seen at 1/factor)."""

    def __init__(self, factor: int = 1):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.factor = factor

    def encode(self, x):
        z = torch.nn.functional.avg_pool2d(x, self.factor)
        return type("Out", (), {"latent_dist": type("D", (), {"mode": lambda _: z})()})()

    def decode(self, z):
        return type(
            "Out", (), {"sample": torch.nn.functional.interpolate(z, scale_factor=self.factor, mode="bilinear")}
        )()


def test_the_world_texture_vanishes_under_a_4x_down_up():
    """The tiny world's rule: its texture is only there at full resolution (at most 10% of its energy survives)."""
    from patch_adapter.tiny_world.competence import texture_energy_kept

    kept = texture_energy_kept(Identity(), count=16)
    assert kept["round_trip"] == pytest.approx(1.0, abs=1e-3)
    assert kept["down_up_4x"] <= 0.1


def own_grid(side: int) -> torch.Tensor:
    """(1, 1, side, side) in {-1, 1}: a 4 px checker, the kind of texture a decoder draws on its own latent grid."""
    cells = torch.arange(side) // 2 % 2
    return (2.0 * ((cells[:, None] + cells[None, :]) % 2) - 1.0).float()[None, None]


class Gridder(Identity):
    """A VAE that sees the picture at 1/4 and draws a 4 px grid of its own as texture."""

    def __init__(self):
        super().__init__(factor=4)

    def decode(self, z):
        flat = super().decode(z).sample
        return type("Out", (), {"sample": flat + 0.15 * own_grid(flat.shape[-1])})()


def test_the_texture_spectrum_tells_the_worlds_texture_from_none_and_from_one_of_the_decoders_own():
    """Phase is free, the texture's frequencies are not: what texture energy alone cannot tell."""
    from patch_adapter.tiny_world.competence import texture_energy_kept, texture_spectrum_error

    assert texture_spectrum_error(Identity(), count=8)["round_trip"] == pytest.approx(0.0, abs=1e-4)
    flat = texture_spectrum_error(Identity(factor=4), count=8)
    assert flat["round_trip"] > 0.8 and flat["down_up_4x"] > 0.8  # measured 0.92 and 0.95
    gridded = texture_spectrum_error(Gridder(), count=8)["round_trip"]
    assert texture_energy_kept(Gridder(), count=8)["round_trip"] > 0.5  # "keeps" the energy...
    assert gridded > flat["round_trip"] + 0.2  # ...with texture further from the world's than none at all

    from patch_adapter.tiny_world.competence import spectrum_error, texture_spectrum, textured_backgrounds
    from patch_adapter.tiny_world.recipe import model_batch

    x = model_batch(textured_backgrounds(8, 64, seed=3))
    moved = torch.roll(x, shifts=(1, 3), dims=(2, 3))  # the same texture at another phase
    assert spectrum_error(texture_spectrum(moved), texture_spectrum(x)).max() < 0.1  # measured 0.03-0.05 (flat: 0.9)


def test_the_vae_insert_ceiling_reads_back_what_a_round_trip_keeps():
    """A VAE that keeps the picture reads every insert back; one that sees it at 1/16 loses the shapes."""
    from patch_adapter.tiny_world.competence import vae_insert_ceiling

    perfect = vae_insert_ceiling(Identity(), count=12)
    assert perfect["accuracy"] == 1.0 and perfect["n"] == 12
    blurred = vae_insert_ceiling(Identity(factor=16), count=12)
    assert blurred["accuracy"] <= 0.5  # measured 0.0


class Painter(Identity):
    """A VAE that keeps the picture but paints a red disc into every one it decodes."""

    def decode(self, z):
        side = z.shape[-1]
        yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        disc = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 8) ** 2).float()
        red = torch.tensor([0.9, -0.9, -0.9]).view(1, 3, 1, 1)
        return type("Out", (), {"sample": z * (1 - disc) + red * disc})()


def test_phantom_objects_counts_what_a_vae_paints_where_there_is_none():
    from patch_adapter.tiny_world.competence import phantom_objects, vae_insert_ceiling

    assert phantom_objects(Identity(), count=8) == 0.0
    assert phantom_objects(Painter(), count=8) == 1.0
    assert vae_insert_ceiling(Painter(), count=12)["accuracy"] < 1.0  # a disc over the insert's place misreads


class Speckler(Identity):
    """A VAE that keeps the picture but paints a red 12 px square into every 32 px cell."""

    def decode(self, z):
        cells = (torch.arange(z.shape[-1]) % 32 < 12).float()
        squares = cells.view(1, 1, -1, 1) * cells.view(1, 1, 1, -1)
        red = torch.tensor([0.9, -0.9, -0.9]).view(1, 3, 1, 1)
        return type("Out", (), {"sample": z * (1 - squares) + red * squares})()


def test_removal_round_trip_objects_adds_what_the_round_trip_paints(pipe):
    from patch_adapter.tiny_world.competence import removal_round_trip_objects

    kept = removal_round_trip_objects(pipe, 256, 2, steps=2, vae=Identity())
    assert kept["n"] == 2 and kept["round_trip"] == kept["resize"]  # a lossless round trip adds nothing
    painted = removal_round_trip_objects(pipe, 256, 2, steps=2, vae=Speckler())
    assert painted["resize"] == kept["resize"] and painted["round_trip"] == 1.0


def test_the_vae_loss_counts_object_pixels_more():
    """An error on an object's pixel costs `object_weight` + 1 times one on the background (the L1 term)."""
    from patch_adapter.tiny_world.recipe import model_batch, object_share, vae_loss

    picture = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    picture[0, 8:24, 8:24] = OBJECT_COLOURS["green"]
    x = model_batch(picture)
    share = object_share(x)
    assert share[0, 0, 16, 16] == 1.0 and share[0, 0, 2, 2] == 0.0
    on_object, on_background = x.clone(), x.clone()
    on_object[0, :, 16, 16] += 0.5
    on_background[0, :, 2, 28] += 0.5  # as far from the object's edge, so the Laplacian terms are equal
    plain = [vae_loss(r, x, 0.0)[0] for r in (on_object, on_background)]
    assert plain[0] == pytest.approx(plain[1].item(), rel=1e-6)
    weighted = [vae_loss(r, x, 0.0, object_weight=10.0)[0] for r in (on_object, on_background)]
    weight_sum = (1 + 10 * share).sum().item()  # the L1: sum over pixels of weight x channel-mean error, over this
    assert (weighted[0] - weighted[1]).item() == pytest.approx(0.5 * (11 - 1) / weight_sum, rel=1e-4)


def test_object_share_is_zero_on_every_background_and_one_on_every_object_colour():
    from patch_adapter.tiny_world.competence import textured_backgrounds
    from patch_adapter.tiny_world.recipe import model_batch, object_share

    assert object_share(model_batch(textured_backgrounds(12, 64, seed=2))).max() == 0.0
    colours = np.array([[list(OBJECT_COLOURS.values())]], dtype=np.uint8)  # (1, 1, 6, 3)
    assert object_share(model_batch(colours)).min() == 1.0


def test_vae_crops_centre_on_objects():
    from patch_adapter.evaluation.detector import BACKGROUND_CHROMA, chroma
    from patch_adapter.tiny_world.recipe import TinyRecipe, object_pixels, vae_crops

    views = [v for v in (scene_view(seed) for seed in range(40)) if v.lesson == "insert"]
    pixels = np.stack([v.pixels for v in views])
    objects = object_pixels(pixels, chunk=3)  # in chunks, as one array: the detector's rule per view
    assert all(
        np.array_equal(o, np.linalg.norm(chroma(p), axis=-1) > BACKGROUND_CHROMA)
        for o, p in zip(objects, pixels, strict=True)
    )
    rng = np.random.default_rng(0)
    index = np.arange(len(views))

    def with_object(crops):
        return np.mean([(np.linalg.norm(chroma(c), axis=-1) > BACKGROUND_CHROMA).any() for c in crops])

    always = vae_crops(rng, pixels, objects, index, TinyRecipe(vae_crop=32, vae_object_crops=1.0))
    assert always.shape == (len(views), 32, 32, 3) and with_object(always) == 1.0
    never = vae_crops(rng, pixels, objects, index, TinyRecipe(vae_crop=32, vae_object_crops=0.0))
    assert with_object(never) < 0.9  # random crops often miss the object


def smoke_recipe(tmp_path, **changes):
    from patch_adapter.tiny_world.recipe import TinyRecipe

    settings = dict(
        output=str(tmp_path / "weights"),
        stages=str(tmp_path / "stages"),
        work=str(tmp_path / "work"),
        threads=1,
        views=32,
        vae_init="random",
        vae_steps=3,
        vae_batch=2,
        vae_check_every=2,
        decoder_steps=3,
        decoder_batch=2,
        decoder_max_phantoms=float("inf"),  # 3 steps of a random VAE paint anything; this checks the plumbing
        decoder_min_spectrum_gain=-float("inf"),
        unet_steps=3,
        unet_batch=2,
        competence_tasks=2,
        adapter_scenes=2,
        adapter_sizes=(256,),
        stage1={"max_steps": 2},
        stage2={"max_steps": 2},
    )
    return TinyRecipe(**(settings | changes))


def test_recipe_runs_stage_by_stage_and_its_folder_loads_with_its_adapters(tmp_path):
    from safetensors.torch import load_file

    from patch_adapter.adapters import BUNDLED_ADAPTER_FILE, adapter_state_dict
    from patch_adapter.pipeline import PatchAdapterPipeline
    from patch_adapter.tiny_world.recipe import (
        adapters_stage,
        backbone_vae,
        decoder_stage,
        denoiser_stage,
        retrain_adapters,
        train_tiny,
        vae_stage,
    )

    recipe = smoke_recipe(tmp_path)
    stages = tmp_path / "stages"
    train_tiny(recipe, stages=("vae",))  # a stage alone writes its result, and nothing else
    assert (stages / "vae" / "report.json").is_file() and not (stages / "denoiser").exists()
    vae_bytes = (stages / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    out = train_tiny(recipe)  # the rest; the finished stage is not run again
    assert (stages / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == vae_bytes
    rounds = json.loads((stages / "denoiser" / "report.json").read_text())["rounds"]
    assert len(rounds) == recipe.denoiser_rounds == 3
    report = json.loads((out / "recipe_report.json").read_text())
    assert report["vae"]["scaling_factor"] > 0 and len(report["denoiser"]["rounds"]) == 3
    assert set(report["vae"]["texture_energy_kept"]) == {"round_trip", "down_up_4x"}
    assert report["vae"]["phantom_objects"] >= 0.0
    pipe = PatchAdapterPipeline.from_pretrained(str(out), device="cpu")
    bare = PatchAdapterPipeline.from_pretrained(str(out), device="cpu", adapter=False)
    assert pipe.unet.dtype == torch.float32  # stored in fp16, loaded as asked
    shipped = load_file(str(out / BUNDLED_ADAPTER_FILE))
    loaded, untrained = adapter_state_dict(pipe.unet), adapter_state_dict(bare.unet)
    assert shipped.keys() == loaded.keys()
    assert all(torch.equal(shipped[k].float(), loaded[k]) for k in shipped)
    assert any(not torch.equal(loaded[k], untrained[k]) for k in loaded if ".to_out_ref." not in k)
    # the VAE the backbone ships is the decoder stage's: the VAE stage's encoder with a tuned decoder
    stage_vae = load_file(str(stages / "vae" / "diffusion_pytorch_model.safetensors"))
    tuned_vae = load_file(str(stages / "decoder" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v.float(), pipe.vae.state_dict()[k]) for k, v in tuned_vae.items())
    encoder = [k for k in stage_vae if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(stage_vae[k], tuned_vae[k]) for k in encoder)
    assert any(not torch.equal(stage_vae[k], tuned_vae[k]) for k in stage_vae if k.startswith("decoder."))
    assert report["decoder"]["encoder"] and set(report["decoder"]["after"]) == {
        "texture_energy_kept",
        "texture_spectrum_error",
        "insert_ceiling",
        "phantom_objects",
    }

    # a decoder tuned again after the adapters: the backbone is reassembled with it, the adapters are kept
    adapter_bytes = (out / BUNDLED_ADAPTER_FILE).read_bytes()
    shutil.rmtree(stages / "decoder")
    decoder_stage(dataclasses.replace(recipe, seed=1))
    adapters_stage(recipe)
    retuned = load_file(str(stages / "decoder" / "diffusion_pytorch_model.safetensors"))
    shipped_vae = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, shipped_vae[k]) for k, v in retuned.items())
    assert any(not torch.equal(v, tuned_vae[k]) for k, v in retuned.items())
    assert (out / BUNDLED_ADAPTER_FILE).read_bytes() == adapter_bytes
    # the RPA retrained on the shipped backbone: shipped and kept in the adapters stage, the DCA kept, and the
    # stage then assembles the retrained file (it once shipped the retrained RPA and kept the old one)
    retrain_adapters(dataclasses.replace(recipe, work=str(tmp_path / "retrain"), seed=2), ("rpa",))
    retrained = load_file(str(out / BUNDLED_ADAPTER_FILE))
    assert (stages / "adapters" / BUNDLED_ADAPTER_FILE).read_bytes() == (out / BUNDLED_ADAPTER_FILE).read_bytes()
    assert all(torch.equal(v, retrained[k]) for k, v in shipped.items() if ".attn2.processor." in k)
    assert any(not torch.equal(v, retrained[k]) for k, v in shipped.items() if ".attn1.processor." in k)
    adapters_stage(recipe)
    assert (stages / "adapters" / BUNDLED_ADAPTER_FILE).read_bytes() == (out / BUNDLED_ADAPTER_FILE).read_bytes()
    # a denoiser round after the adapters: the kept adapters are refused, and once they are deleted the stage
    # trains its adapter runs again instead of reusing the work folder's runs on the old denoiser (it once did)
    work = tmp_path / "work"
    dca_bytes = (work / "stage1" / "dca.safetensors").read_bytes()
    denoiser_stage(dataclasses.replace(recipe, denoiser_rounds=recipe.denoiser_rounds + 1))
    with pytest.raises(RuntimeError, match="adapters .* were trained on another VAE or denoiser"):
        adapters_stage(recipe)
    shutil.rmtree(stages / "adapters")
    adapters_stage(recipe)
    learnt = json.loads((stages / "adapters" / "trained_on.json").read_text())
    assert len(learnt["denoiser"]["rounds"]) == recipe.denoiser_rounds + 1
    assert all(json.loads((work / run / "trained_on.json").read_text()) == learnt for run in ("stage1", "stage2"))
    assert (work / "stage1" / "dca.safetensors").read_bytes() != dca_bytes
    # a decoder tuned on another VAE stage's encoder is refused
    shutil.rmtree(stages / "vae")
    vae_stage(dataclasses.replace(recipe, seed=1))
    with pytest.raises(RuntimeError, match="another VAE stage's encoder"):
        backbone_vae(recipe)
    with pytest.raises(RuntimeError, match="adapters .* were trained on another VAE or denoiser"):
        adapters_stage(recipe)  # kept adapters learnt the old VAE's latents: refused before any reassembly
    with pytest.raises(RuntimeError, match="adapters .* were trained on another VAE or denoiser"):
        adapters_stage(dataclasses.replace(recipe, work=str(tmp_path / "fresh")))  # a fresh clone: no backbone built


@pytest.mark.parametrize(
    "rule",
    [
        {"decoder_max_phantoms": -1.0},  # any decoder paints more than -1 objects
        {"decoder_min_spectrum_gain": float("inf")},  # no decoder's texture comes infinitely closer to the world's
    ],
)
def test_a_decoder_that_paints_phantom_objects_or_texture_unlike_the_worlds_is_not_shipped(tmp_path, rule):
    from patch_adapter.tiny_world.recipe import backbone_vae, decoder_stage, load_stage_vae, vae_stage

    recipe = smoke_recipe(tmp_path, **rule)
    vae_stage(recipe)
    folder = decoder_stage(recipe)
    report = json.loads((folder / "report.json").read_text())
    assert next(iter(rule)) in report["rejected"] and report["after"]["phantom_objects"] >= 0
    assert sorted(p.name for p in folder.iterdir()) == ["report.json"]  # no weights to ship
    shipped, stage = backbone_vae(recipe).state_dict(), load_stage_vae(recipe).state_dict()
    assert all(torch.equal(shipped[k], stage[k]) for k in stage)  # the VAE stage's decoder is kept
    assert decoder_stage(recipe) == folder  # done: a rerun does not train it again


def test_a_denoiser_round_continues_from_the_last_rounds_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    from patch_adapter.tiny_world.architecture import build_tiny_components
    from patch_adapter.tiny_world.recipe import denoiser_stage, vae_stage

    # rounds that change nothing
    recipe = smoke_recipe(tmp_path, unet_lr=0.0, unet_warmup=1, ema_decay=0.0, denoiser_rounds=2)
    vae_stage(recipe)
    folder = denoiser_stage(recipe)
    first = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
    shape = dict(latent_factor=recipe.latent_factor, latent_channels=recipe.latent_channels)
    initial = build_tiny_components(seed=recipe.seed, **shape)["unet"].state_dict()
    assert all(torch.equal(v, initial[k].half().float()) for k, v in first.items())
    folder = denoiser_stage(recipe)  # round 2 starts from round 1's weights (not the seed's again)
    second = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
    assert all(torch.equal(v, first[k]) for k, v in second.items())
    assert len(json.loads((folder / "report.json").read_text())["rounds"]) == 2
    assert denoiser_stage(recipe) == folder  # done: a third run adds nothing
    assert len(json.loads((folder / "report.json").read_text())["rounds"]) == 2
    shutil.rmtree(tmp_path / "stages" / "vae")
    vae_stage(dataclasses.replace(recipe, seed=1))  # another VAE: the rounds were trained on the old one's latents
    with pytest.raises(RuntimeError, match="another VAE"):
        denoiser_stage(recipe)


def test_the_core_never_imports_the_tiny_world():
    """Loading "tiny" and inpainting with it reads the shipped folder by path: no tiny-world code runs."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "import patch_adapter.adapters, patch_adapter.backbone, patch_adapter.tiling, patch_adapter.cli\n"
        "from patch_adapter import PatchAdapterPipeline\n"
        "pipe = PatchAdapterPipeline.from_pretrained('tiny', device='cpu')\n"
        "mask = np.zeros((128, 128), bool); mask[40:80, 40:80] = True\n"
        "pipe(prompt='a red star', image=np.zeros((128, 128, 3), np.uint8), mask_image=mask, num_inference_steps=2)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('patch_adapter.tiny_world', 'patch_adapter.evaluation'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_the_committed_vae_stage_is_what_its_report_says():
    """The recipe's VAE stage in the package: its figures recompute, and its round trips keep the objects."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    import patch_adapter.tiny_world as world
    from patch_adapter.tiny_world.competence import phantom_objects, texture_energy_kept, vae_insert_ceiling
    from patch_adapter.tiny_world.recipe import latent_shape

    stage = Path(world.__file__).parent / "stages" / "vae"
    report = json.loads((stage / "report.json").read_text())
    vae = AutoencoderKL.from_pretrained(stage, torch_dtype=torch.float32).eval()
    assert latent_shape(vae) == (4, 4) == (report["recipe"]["latent_factor"], report["recipe"]["latent_channels"])
    ceiling = vae_insert_ceiling(vae, count=report["insert_ceiling"]["n"])
    assert ceiling["accuracy"] == pytest.approx(report["insert_ceiling"]["accuracy"], abs=2.5 / ceiling["n"])
    # measured 0.85 (0.90 on 192 tasks); VAE stage 2 (f8, trained on 2 cores) 0.50, the first shipped VAE 0.23
    assert ceiling["accuracy"] >= 0.75
    kept = texture_energy_kept(vae)
    assert kept["round_trip"] == pytest.approx(report["texture_energy_kept"]["round_trip"], abs=0.01)
    assert kept["down_up_4x"] <= 0.1
    assert phantom_objects(vae) <= 0.05  # measured 0 (VAE stage 2: 0.06)


def test_the_committed_decoder_stage_draws_texture_like_the_worlds_and_keeps_the_objects():
    """The recipe's decoder stage in the package: the VAE stage's encoder, texture of the world's spectrum."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    import patch_adapter.tiny_world as world
    from patch_adapter.tiny_world.competence import (
        phantom_objects,
        texture_energy_kept,
        texture_spectrum_error,
        vae_insert_ceiling,
    )
    from patch_adapter.tiny_world.recipe import TinyRecipe, backbone_vae, encoder_digest, load_stage_vae

    stages = Path(world.__file__).parent / "stages"
    report = json.loads((stages / "decoder" / "report.json").read_text())
    assert "rejected" not in report
    shipped = backbone_vae(TinyRecipe(stages=str(stages)))
    tuned = AutoencoderKL.from_pretrained(stages / "decoder", torch_dtype=torch.float32).eval()
    assert all(
        torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), tuned.state_dict().values(), strict=True)
    )
    assert encoder_digest(tuned) == encoder_digest(load_stage_vae(TinyRecipe(stages=str(stages)))) == report["encoder"]
    before, after = report["before"], report["after"]
    kept = texture_energy_kept(tuned)["round_trip"]
    assert kept == pytest.approx(after["texture_energy_kept"]["round_trip"], abs=0.01)
    assert kept > 4 * before["texture_energy_kept"]["round_trip"]  # measured 0.47 against 0.09
    spectrum = texture_spectrum_error(tuned)["round_trip"]
    assert spectrum == pytest.approx(after["texture_spectrum_error"]["round_trip"], abs=0.01)
    assert spectrum < 0.6 * before["texture_spectrum_error"]["round_trip"]  # measured 0.43 against 1.02
    assert phantom_objects(tuned) <= 0.05  # measured 0
    assert vae_insert_ceiling(tuned)["accuracy"] >= 0.75  # measured 0.83 (the VAE stage's decoder 0.85)


def test_the_committed_denoiser_rounds_learnt_the_committed_vaes_latents():
    """Rounds trained on another VAE's latents are refused; the committed ones match the committed VAE."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    import patch_adapter.tiny_world as world
    from patch_adapter.tiny_world.recipe import DENOISER_PARTS, TinyRecipe, check_same_vae, latent_shape, load_stage_vae

    stages = Path(world.__file__).parent / "stages"
    vae = load_stage_vae(TinyRecipe(stages=str(stages)))
    rounds = json.loads((stages / "denoiser" / "report.json").read_text())["rounds"]
    assert len(rounds) == TinyRecipe().denoiser_rounds
    assert check_same_vae(rounds, vae, stages / "denoiser") == rounds[0]["vae"]
    unet = UNet2DConditionModel.from_pretrained(stages / "denoiser", subfolder="unet")
    factor, channels = latent_shape(vae)
    assert unet.config.sample_size * factor == 128 and unet.config.in_channels == 2 * channels + 1
    assert all((stages / "denoiser" / part).is_dir() for part in DENOISER_PARTS)


def test_the_shipped_backbone_draws_the_asked_colour_as_one_object_at_native_size(pipe):
    """The shipped backbone's competence on a small sample (`competence.insert_accuracy`, no adapters).

    The first shipped backbone drew the asked colour in 0.42 of inserts (24 tasks), and
    the denoiser rounds on the first VAE stage drew one object in 0.75-0.83 (48 tasks):
    the floors below fail for them.
    """
    from patch_adapter.tiny_world.competence import insert_accuracy

    result = insert_accuracy(pipe, count=24, steps=10, dca_scale=0.0)
    assert result["n"] == 24
    assert result["colour"] >= 0.8, result  # measured 1.00 (24 of 24); 48 tasks at 20 steps: 1.00
    assert result["single_object"] >= 0.8, result  # measured 0.875 (21 of 24); 48 tasks at 20 steps: 0.94
    # colour and shape both right: 0.12 here, 0.31 on 48 tasks; the target of 0.85 is not met (docs/tiny-world.md)


def test_mask_errors_tell_the_drawn_part_from_the_copied_part(tiny_pipe):
    """A UNet that copies the answer outside the mask and guesses zero inside errs 0 outside and ~1 inside."""
    from types import SimpleNamespace

    from patch_adapter.tiny_world.competence import mask_errors

    alphas = tiny_pipe.scheduler.alphas_cumprod

    def copying_unet(sample, timestep, **kwargs):
        noisy, mask, masked = sample[:, :4], sample[:, 4:5], sample[:, 5:]
        a = alphas[timestep].view(-1, 1, 1, 1)
        return ((1 - mask) * (noisy - a.sqrt() * masked) / (1 - a).sqrt(),)

    pipe = SimpleNamespace(
        scheduler=tiny_pipe.scheduler,
        vae_scale_factor=8,
        unet=copying_unet,
        encode_prompt=tiny_pipe.encode_prompt,
        _execution_device=torch.device("cpu"),
        time_ids=tiny_pipe.time_ids,
    )
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(4, 1, 128, 128, dtype=torch.bool)
    masks[:, :, 32:96, 40:80] = True
    errors = mask_errors(pipe, latents, latents, masks, ["a red star", "a blue circle", "", "a green cross"])
    for kind in ("caption", "no_caption", "other_caption"):
        assert max(errors[kind]["outside"]) < 1e-6
        assert all(0.8 < e < 1.2 for e in errors[kind]["inside"])
