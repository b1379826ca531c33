"""The tiny world: its tokenizer, its training views and the recipe that trains the tiny backbone."""

import json

import numpy as np
import torch

from patch_adapter.backbone import tiny_tokenizer, word_tokenizer
from patch_adapter.evaluation.detector import detect_object
from patch_adapter.evaluation.scenes import OBJECT_COLOURS, SHAPES, VOCABULARY
from patch_adapter.training.scene_views import export_scene_folder, scene_view


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
    from patch_adapter.backbone import build_tiny_components
    from patch_adapter.training.tiny_backbone import TinyRecipe, train_vae

    views = [scene_view(seed) for seed in range(16)]
    data = {"pixels": np.stack([v.pixels for v in views])}
    vae = build_tiny_components()["vae"]
    recipe = TinyRecipe(vae_steps=200, vae_batch=4, vae_crop=32)
    torch.manual_seed(0)
    report = train_vae(vae, data, recipe)
    assert report["l1_last100"] < 0.88 * report["l1_first100"]  # measured 0.81


def test_recipe_runs_end_to_end_and_its_folder_loads_with_its_adapters(tmp_path):
    from safetensors.torch import load_file

    from patch_adapter.adapters import BUNDLED_ADAPTER_FILE, adapter_state_dict
    from patch_adapter.pipeline import PatchAdapterPipeline
    from patch_adapter.training.tiny_backbone import TinyRecipe, train_tiny

    recipe = TinyRecipe(
        output=str(tmp_path / "weights"),
        work=str(tmp_path / "work"),
        threads=1,
        views=32,
        vae_steps=3,
        vae_batch=2,
        unet_steps=3,
        unet_batch=2,
        adapter_scenes=2,
        adapter_sizes=(256,),
        stage1={"max_steps": 2},
        stage2={"max_steps": 2},
    )
    out = train_tiny(recipe)
    report = json.loads((out / "recipe_report.json").read_text())
    assert report["vae"]["scaling_factor"] > 0
    pipe = PatchAdapterPipeline.from_pretrained(str(out), device="cpu")
    bare = PatchAdapterPipeline.from_pretrained(str(out), device="cpu", adapter=False)
    assert pipe.unet.dtype == torch.float32  # stored in fp16, loaded as asked
    shipped = load_file(str(out / BUNDLED_ADAPTER_FILE))
    loaded, untrained = adapter_state_dict(pipe.unet), adapter_state_dict(bare.unet)
    assert shipped.keys() == loaded.keys()
    assert all(torch.equal(shipped[k].float(), loaded[k]) for k in shipped)
    assert any(not torch.equal(loaded[k], untrained[k]) for k in loaded if ".to_out_ref." not in k)
