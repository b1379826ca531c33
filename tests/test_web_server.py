"""The web app's endpoints, in process: upload, mask, plan, run, cancel, download, refusals."""

import io
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient  # needs httpx (the test extra)

from conftest import random_image
from patch_adapter.web.jobs import parse_settings, plan_for
from patch_adapter.web.server import WebState, create_app, expand_grid, reduce_to_grid

PORT = 7861
BASE = f"http://127.0.0.1:{PORT}"
FAST = {"steps": 2, "guidance_scale": 1.0, "prompt": "a red circle"}


def png_bytes(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def state(pipe, tmp_path):
    state = WebState(tmp_path / "web", model="tiny", pipe=pipe, max_upload_bytes=2_000_000)
    yield state
    state.close()


@pytest.fixture
def client(state):
    with TestClient(create_app(state, port=PORT), base_url=BASE) as client:
        yield client


def upload(client, pixels, name="picture.png"):
    response = client.post("/api/images", content=png_bytes(pixels), headers={"X-Filename": name})
    assert response.status_code == 200, response.text
    return response.json()


def send_mask(client, image, mask, version=1):
    bits = np.packbits(mask).tobytes()
    response = client.put(f"/api/images/{image['id']}/mask", content=bits, headers={"X-Mask-Version": str(version)})
    assert response.status_code == 200, response.text
    return response.json()


def wait(client, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


def test_page_and_config_carry_the_cli_defaults(client):
    assert "Patch-Adapter" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200
    config = client.get("/api/config").json()
    settings = {s["name"]: s for s in config["settings"]}
    assert settings["steps"]["default"] == 30 and settings["guidance_scale"]["default"] == 7.5
    assert settings["method"]["choices"][0] == "patch-adapter" and settings["refine_strength"]["advanced"]
    assert config["native_size"] == 128 and config["model_state"] == "ready"


def test_upload_mask_plan_run_download_is_bit_identical_outside(client):
    pixels = random_image(300, 400, seed=1)
    image = upload(client, pixels)
    assert (image["width"], image["height"], image["cell"]) == (400, 300, 1)
    mask = np.zeros((300, 400), dtype=bool)
    mask[100:180, 150:260] = True
    assert send_mask(client, image, mask)["pixels"] == mask.sum()

    plan = client.post("/api/plan", json={"image_id": image["id"], "settings": FAST}).json()
    expected = plan_for(parse_settings(FAST), (400, 300), mask, native=128)
    assert plan["unet_evaluations"] == expected.unet_evaluations and plan["patches"] == len(expected.tiles) > 0
    assert all(t["width"] == 128 for group in plan["groups"] for t in group)

    job = client.post("/api/jobs", json={"image_id": image["id"], "mask_version": 1, "settings": FAST}).json()
    job = wait(client, job["id"])
    assert job["state"] == "done", job["error"]
    assert job["progress"] == 1.0
    results = client.get("/api/results").json()["results"]
    assert [r["id"] for r in results] == [job["result_id"]] and results[0]["settings"]["steps"] == 2
    response = client.get(results[0]["url"])
    assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
    out = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert np.array_equal(out[~mask], pixels[~mask])
    assert not np.array_equal(out[mask], pixels[mask])
    meta = Image.open(io.BytesIO(response.content)).text
    assert '"num_inference_steps": 2' in meta["patch_adapter"] and "prompt: a red circle" in meta["parameters"]


def test_progress_names_each_patch_group(client):
    image = upload(client, random_image(160, 640, seed=7))
    mask = np.zeros((160, 640), dtype=bool)
    mask[60:80, 20:40] = mask[60:80, 600:620] = True  # two groups of patches, far apart
    send_mask(client, image, mask)
    job = client.post("/api/jobs", json={"image_id": image["id"], "mask_version": 1, "settings": FAST}).json()
    assert job["groups"] == 2
    job = wait(client, job["id"])
    assert job["state"] == "done" and job["group"] == 2 and job["stage"].startswith("patches")


def test_mask_png_round_trips_and_mask_file_loads(client, tmp_path):
    image = upload(client, random_image(64, 96, seed=2))
    mask = np.zeros((64, 96), dtype=bool)
    mask[10:30, 20:50] = True
    send_mask(client, image, mask)
    png = client.get(f"/api/images/{image['id']}/mask.png")
    assert png.status_code == 200
    saved = np.asarray(Image.open(io.BytesIO(png.content)).convert("L")) > 127
    assert np.array_equal(saved, mask)
    loaded = client.post(f"/api/images/{image['id']}/mask-file", content=png.content).json()
    assert loaded["pixels"] == mask.sum() and loaded["version"] == 2 and loaded["note"] is None
    bits = client.get(f"/api/images/{image['id']}/mask.bits").content
    assert np.array_equal(np.unpackbits(np.frombuffer(bits, np.uint8), count=mask.size).reshape(mask.shape), mask)


def test_a_16_bit_tiff_opens_with_an_8_bit_view_and_keeps_16_bits(client, tmp_path):
    from patch_adapter.image_io import save_image

    pixels = random_image(40, 56, seed=6).astype(np.uint16) * 257
    save_image(tmp_path / "deep.tif", pixels)
    image = client.post("/api/images", content=(tmp_path / "deep.tif").read_bytes()).json()
    assert image["bit_depth"] == 16
    view = np.asarray(Image.open(io.BytesIO(client.get(f"/api/images/{image['id']}/display.png").content)))
    assert view.dtype == np.uint8 and np.array_equal(view, (pixels // 257).astype(np.uint8))


@pytest.mark.parametrize(
    "body, message",
    [
        (b"this is not a picture", "notes.txt is not an image file"),
        (b"", "empty"),
    ],
)
def test_bad_uploads_get_a_message_and_the_server_keeps_running(client, body, message):
    response = client.post("/api/images", content=body, headers={"X-Filename": "notes.txt"})
    assert response.status_code == 400 and message in response.json()["error"]
    assert "uploads" not in response.json()["error"]  # named as the user's file, not the server's path
    assert client.get("/api/config").status_code == 200


def test_mask_of_another_size_and_empty_masks_are_refused(client):
    image = upload(client, random_image(64, 96, seed=3))
    wrong = client.post(f"/api/images/{image['id']}/mask-file", content=png_bytes(np.full((64, 64), 255, np.uint8)))
    assert wrong.status_code == 400 and "mask is 64x64 but the image is 96x64" in wrong.json()["error"]
    black = client.post(f"/api/images/{image['id']}/mask-file", content=png_bytes(np.zeros((64, 96), np.uint8)))
    assert black.status_code == 400 and "empty" in black.json()["error"]
    plan = client.post("/api/plan", json={"image_id": image["id"], "settings": FAST}).json()
    assert plan["empty_mask"] and plan["unet_evaluations"] == 0
    run = client.post("/api/jobs", json={"image_id": image["id"], "mask_version": 0, "settings": FAST})
    assert run.status_code == 400 and "mask is empty" in run.json()["error"]
    bits = client.put(f"/api/images/{image['id']}/mask", content=b"\x00" * 5, headers={"X-Mask-Version": "1"})
    assert bits.status_code == 400 and "packs into" in bits.json()["error"]


def test_bad_settings_stale_masks_and_unknown_ids_are_refused(client):
    image = upload(client, random_image(64, 96, seed=4))
    mask = np.zeros((64, 96), dtype=bool)
    mask[5:20, 5:20] = True
    send_mask(client, image, mask, version=3)
    for settings, message in [
        ({"method": "magic"}, "invalid choice"),
        ({"steps": "many"}, "invalid int"),
        ({"tile_size": 100}, "multiple of 8"),
        ({"rm": "-rf"}, "unknown setting"),
    ]:
        response = client.post("/api/jobs", json={"image_id": image["id"], "mask_version": 3, "settings": settings})
        assert response.status_code == 400 and message in response.json()["error"], (settings, response.text)
    stale = client.post("/api/jobs", json={"image_id": image["id"], "mask_version": 2, "settings": FAST})
    assert stale.status_code == 400 and "mask version" in stale.json()["error"]
    for path in (
        "/api/images/../../etc/passwd/mask.png",
        "/api/images/0123456789abcdef/mask.png",
        "/api/results/nope.png",
        "/api/jobs/nope",
    ):
        assert client.get(path).status_code == 404, path


def test_cancel_stops_a_running_job_within_a_step_and_the_queue_goes_on(client):
    image = upload(client, random_image(512, 768, seed=5))
    mask = np.zeros((512, 768), dtype=bool)
    mask[50:450, 50:700] = True
    send_mask(client, image, mask)
    slow = {**FAST, "steps": 200, "refine_strength": 1.0}
    first = client.post("/api/jobs", json={"image_id": image["id"], "mask_version": 1, "settings": slow}).json()
    quick = {**FAST, "method": "resize"}
    second = client.post("/api/jobs", json={"image_id": image["id"], "mask_version": 1, "settings": quick}).json()
    listing = client.get("/api/jobs").json()["jobs"]
    assert [j["state"] for j in listing][1] == "queued"  # one job at a time
    deadline = time.monotonic() + 30
    while client.get(f"/api/jobs/{first['id']}").json()["progress"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    running = client.get(f"/api/jobs/{first['id']}").json()
    assert running["state"] == "running" and running["stage"] and running["eta_s"] is not None
    asked = time.monotonic()
    client.post(f"/api/jobs/{first['id']}/cancel")
    assert wait(client, first["id"])["state"] == "cancelled"
    assert time.monotonic() - asked < 5
    assert wait(client, second["id"])["state"] == "done"


def test_host_and_origin_must_be_this_server(client):
    assert client.get("/api/config", headers={"Host": f"localhost:{PORT}"}).status_code == 200
    assert client.get("/api/config", headers={"Origin": BASE}).status_code == 200
    rebinding = client.get("/api/config", headers={"Host": f"attacker.example:{PORT}"})
    assert rebinding.status_code == 403 and "is not this server" in rebinding.json()["error"]
    assert client.get("/api/config", headers={"Host": "127.0.0.1:9999"}).status_code == 403
    cross = client.post("/api/images", content=b"x", headers={"Origin": "http://attacker.example"})
    assert cross.status_code == 403 and "cross-site" in cross.json()["error"]
    assert client.get("/", headers={"Origin": "null"}).status_code == 403
    embedded = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    assert client.get("/api/results", headers=embedded).status_code == 403
    assert client.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}).status_code == 200


def test_upload_cap_refuses_while_streaming(client, state):
    big = b"\x89PNG" + b"\0" * 2_100_000
    response = client.post("/api/images", content=big)
    assert response.status_code == 413 and "--max-upload-mb" in response.json()["error"]

    def chunks():  # no Content-Length: the cap must hold while reading
        for _ in range(30):
            yield b"\0" * 100_000

    response = client.post("/api/images", content=chunks())
    assert response.status_code == 413
    assert not any((state.workdir / "uploads").iterdir())  # nothing left behind


def test_grid_of_large_pictures_is_exact():
    grid = np.zeros((3, 4), dtype=bool)
    grid[1, 2] = True
    full = expand_grid(grid, 2, 5, 7)
    assert full.shape == (5, 7) and full.sum() == 4 and full[2:4, 4:6].all()
    assert np.array_equal(reduce_to_grid(full, 2), grid)


def test_pictures_above_8192_px_get_a_2x2_mask_grid(client, state):
    image = upload(client, np.zeros((40, 8200, 3), np.uint8))
    assert (image["cell"], image["mask_width"], image["mask_height"]) == (2, 4100, 20)
    grid = np.zeros((20, 4100), dtype=bool)
    grid[3:6, 4090:4100] = True
    send_mask(client, image, grid)
    mask = state.images[image["id"]].mask
    assert mask.shape == (40, 8200) and mask.sum() == grid.sum() * 4 and mask[6:12, 8180:8200].all()
    bits = client.get(f"/api/images/{image['id']}/mask.bits").content
    assert np.array_equal(np.unpackbits(np.frombuffer(bits, np.uint8), count=grid.size).reshape(grid.shape), grid)


def test_temporary_folder_is_removed_at_exit(pipe, tmp_path):
    state = WebState(tmp_path / "web", pipe=pipe)
    with TestClient(create_app(state, port=PORT), base_url=BASE) as client:
        upload(client, random_image(32, 32))
        assert any((tmp_path / "web" / "uploads").iterdir())
    assert not (tmp_path / "web").exists()


def test_serve_is_a_cli_command():
    from patch_adapter.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.max_upload_mb, args.model) == ("127.0.0.1", 7860, 300, "tiny")
