"""`dhf-cache view`: every endpoint of the viewer's server, over real HTTP on a free port.

The setting is the session's tiny cache (`train_cache`), copied, with a checkpoint trained for
two steps and two evaluations of it (the checkpoint, whose descriptors eval stores in the copy,
and one raw map), all made in-process. Clicks are checked against `match_points` on grids of
pixels; requests that try to leave what the viewer was given, a damaged cache and bad uploads
get one-line errors; nothing the viewer reads is changed.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL_NET, eval_args, invoke, source_dir
from dhf_cache.correspondence.matching import match_points

RAW_LAYER = "up_blocks.1.resnets.1"  # a 16 x 16 map of the tiny model at 64 px


@dataclass(frozen=True)
class ViewerSetting:
    cache: str  # a private copy of train_cache, holding the checkpoint's stored descriptors
    data: Path  # the SPair-layout data set
    run: Path
    evals: tuple[Path, Path]  # (checkpoint eval, raw eval)
    raw_key: str


_SETTING: dict[str, ViewerSetting] = {}


def viewer_setting(tmp_path_factory, train_cache: str, train_data: Path) -> ViewerSetting:
    """Made once per session (the browser test shares it): copy, train 2 steps, evaluate twice."""
    if "setting" not in _SETTING:
        started = time.perf_counter()
        root = tmp_path_factory.mktemp("viewer")
        cache = root / "cache.zarr"
        shutil.copytree(train_cache, cache)
        run = root / "run"
        result = invoke("train", "--cache", cache, "--dataset", f"spair:{train_data}", "--out", run, "--device", "cpu",
                        "--no-progress", "--steps", "2", "--val-every", "2", "--val-load-size", "64", *SMALL_NET)
        assert result.exit_code == 0, result.output
        timestep = json.loads((source_dir(cache) / "zarr.json").read_text())["attributes"]["dhf_cache"]["timesteps"][1]
        evals = (root / "eval-run", root / "eval-raw")
        for out, what in zip(evals, (["--checkpoint", run], ["--raw", f"{RAW_LAYER}@{timestep}"])):
            result = invoke(*eval_args(cache, train_data, out, "--drawings", "0", *what))
            assert result.exit_code == 0, result.output
        print(f"viewer setting made in {time.perf_counter() - started:.1f} s")
        _SETTING["setting"] = ViewerSetting(str(cache), train_data, run, evals, f"raw:sd:{RAW_LAYER}@{timestep}")
    return _SETTING["setting"]


def start_viewer(setting: ViewerSetting, cache: str | None = None, **inputs):
    from dhf_cache.viewer.data import ViewerData, ViewerInputs
    from dhf_cache.viewer.server import ViewerServer

    lines: list[str] = []
    data = ViewerData(ViewerInputs(cache=cache or setting.cache, checkpoints=(setting.run,), evals=setting.evals,
                                   device="cpu", **inputs), log=lines.append)
    server = ViewerServer(data, port=0, log=lines.append)
    server.start()
    return server, lines


def snapshot(*folders) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file below the folders, and the folders' own listings."""
    found = {}
    for folder in folders:
        folder = Path(folder)
        found[f"{folder}.lock"] = (folder.with_name(folder.name + ".lock").exists(), 0)
        for path in sorted(folder.rglob("*")):
            stat = path.stat()
            found[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return found


class Client:
    """Plain HTTP to the viewer (http.client: paths are sent exactly as written)."""

    def __init__(self, port: int):
        self.port = port

    def request(self, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type") or "", response.read()
        finally:
            connection.close()

    def json(self, path: str, status: int = 200, **kwargs):
        got, content_type, body = self.request(path, **kwargs)
        assert got == status, (path, got, body[:300])
        assert content_type.startswith("application/json")
        return json.loads(body)

    def error(self, path: str, status: int, **kwargs) -> str:
        message = self.json(path, status, **kwargs)["error"]
        assert isinstance(message, str) and "\n" not in message and "Traceback" not in message
        return message


@pytest.fixture(scope="module")
def setting(tmp_path_factory, train_cache, train_data) -> ViewerSetting:
    return viewer_setting(tmp_path_factory, train_cache, train_data)


@pytest.fixture(scope="module")
def viewer(setting):
    before = snapshot(setting.cache, setting.run, *setting.evals)
    server, lines = start_viewer(setting, max_upload_bytes=100_000)
    yield Client(server.port), lines, server
    server.stop()
    # read-only: no file of the cache, the run or the evaluations changed, none appeared
    assert snapshot(setting.cache, setting.run, *setting.evals) == before


def stored_descriptors(setting: ViewerSetting):
    """The checkpoint's descriptors as eval stored them (read here without the viewer)."""
    from dhf_cache.aggregator.checkpoint import load_checkpoint
    from dhf_cache.cache.descriptor_store import DescriptorStore
    from dhf_cache.cache.feature_cache import FeatureCache

    ckpt = load_checkpoint(setting.run, "cpu")
    cache = FeatureCache.open(setting.cache)
    net = ckpt.network
    store = DescriptorStore(cache, ckpt.fingerprint, (net.projection_dim, net.output_size, net.output_size), {})
    assert store.persistent and store.done_mask().sum() == 4  # eval stored the 4 test images
    index = cache.index_of()
    return lambda image_id: store.read(index[image_id])


def raw_maps(setting: ViewerSetting, key: str):
    from dhf_cache.cache.feature_cache import FeatureCache

    cache = FeatureCache.open(setting.cache)
    layer, timestep = key.split(":")[2].split("@")
    position = cache.timesteps.index(int(timestep))
    index = cache.index_of()
    return lambda image_id: torch.from_numpy(cache.read_features(index[image_id], [layer])[layer][position].astype(np.float32))


def decode(data_url: str) -> Image.Image:
    head, _, payload = data_url.partition(",")
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload)))


# ------------------------------------------------------------------------------------ what there is
def test_info_lists_the_cache_checkpoints_and_evaluations(viewer, setting):
    client, _, _ = viewer
    info = client.json("/api/info")
    assert info["cache"] == setting.cache and [s["name"] for s in info["sources"]] == ["sd"]
    assert info["checkpoints"][0]["key"] == "ckpt:0" and info["checkpoints"][0]["stored"] == 4
    trained, raw = info["evals"]
    assert trained["default"] == "ckpt:0" and raw["default"] == setting.raw_key  # what each eval scored
    assert trained["n_pairs"] == raw["n_pairs"] > 0 and trained["flags"] == sorted(trained["flags"])
    assert trained["pck"]["bbox@0.1"]["per_point"] == json.loads((setting.evals[0] / "metrics.json").read_text())[
        "pck"]["bbox@0.1"]["per_point"]
    images = client.json("/api/images")["images"]
    test_images = {i for p in client.json("/api/pairs?eval=0")["pairs"] for i in (p["src"], p["trg"])}
    assert len(images) == info["images"] == 16  # every image of the cache; photos of the evaluated split's
    assert {i["id"] for i in images if i["photo"]} == test_images


def test_the_page_and_its_files_are_served(viewer):
    client, _, _ = viewer
    status, content_type, body = client.request("/")
    assert status == 200 and content_type.startswith("text/html") and b"/static/app.js" in body
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("index.html", "text/html")):
        status, content_type, _ = client.request(f"/static/{name}")
        assert status == 200 and kind in content_type, name


def test_pairs_and_a_pair_carry_the_predictions_errors_and_flags(viewer, setting):
    from dhf_cache.correspondence.pck import bbox_length
    from dhf_cache.datasets import open_dataset

    client, _, _ = viewer
    rows = client.json("/api/pairs?eval=0")["pairs"]
    lines = [json.loads(l) for l in (setting.evals[0] / "predictions.jsonl").read_text().splitlines()]
    records = {p.name: p for p in open_dataset(f"spair:{setting.data}").pairs("test")}
    assert [r["name"] for r in rows] == [l["pair"] for l in lines]
    for row, line in zip(rows, lines):
        record = records[row["name"]]
        assert (row["src"], row["trg"], row["flags"]) == (record.src, record.trg, record.flags)
        dist = np.linalg.norm(np.array(line["pred_kps"], dtype=float) - np.array(line["trg_kps"]), axis=1)
        np.testing.assert_allclose(row["err"], dist / bbox_length(line["trg_bndbox"]), atol=1e-5)
    detail = client.json("/api/pair?eval=0&pair=1")
    assert detail["src_size"] == list(records[detail["name"]].src_size) and detail["photos"] == {"src": True, "trg": True}
    assert detail["pred_kps"] == lines[1]["pred_kps"] and detail["trg_bbox"] == lines[1]["trg_bndbox"]


def test_photo_is_the_image_upright_as_a_jpeg(viewer, setting):
    client, _, _ = viewer
    image_id = client.json("/api/pair?eval=0&pair=0")["src"]
    status, content_type, body = client.request(f"/api/photo?id={urllib.parse.quote(image_id)}")
    assert status == 200 and content_type == "image/jpeg"
    with Image.open(io.BytesIO(body)) as im, Image.open(setting.data / "JPEGImages" / image_id) as original:
        assert im.format == "JPEG" and im.size == original.size


# ------------------------------------------------------------------------------------ clicks
@pytest.mark.parametrize("load", [64, 224])
def test_click_argmax_equals_match_points_for_checkpoint_and_raw_maps(viewer, setting, load):
    client, _, _ = viewer
    providers = {"ckpt:0": stored_descriptors(setting), setting.raw_key: raw_maps(setting, setting.raw_key)}
    detail = client.json("/api/pair?eval=0&pair=2")
    (w, h), trg_size = detail["src_size"], detail["trg_size"]
    # a grid over the whole source, its corners, a pixel's edge and points outside (clipped as keypoints are)
    points = [(float(x), float(y)) for x in np.linspace(0, w - 1, 4) for y in np.linspace(0, h - 1, 3)]
    points += [(w / 2 + 0.5, h / 3 + 0.5), (-3.0, h + 5.0), (w - 0.01, 0.0)]
    for key, provider in providers.items():
        src, trg = provider(detail["src"]), provider(detail["trg"])
        for x, y in points:
            # one point per call, as a click: matched with others, a near tie (1e-7) may round the other way
            (want,) = match_points(src, trg, [[x, y]], detail["src_size"], trg_size, load)
            answer = client.json(f"/api/click?eval=0&pair=2&desc={urllib.parse.quote(key)}&x={x!r}&y={y!r}&load={load}")
            assert answer["argmax"] == [float(want[0]), float(want[1])], (key, x, y)
            assert answer["load_size"] == load and answer["range"][0] <= answer["score"] == answer["range"][1]
        heat = decode(answer["heatmap"])
        assert heat.size == (load, load) and heat.mode == "RGB"


def test_pca_of_a_checkpoint_descriptor_and_of_a_raw_map(viewer, setting):
    client, _, _ = viewer
    image_id = client.json("/api/images")["images"][0]["id"]
    for key, shape in (("ckpt:0", [32, 16, 16]), (setting.raw_key, None)):
        answer = client.json(f"/api/pca?id={urllib.parse.quote(image_id)}&desc={urllib.parse.quote(key)}")
        picture = decode(answer["pca"])
        assert picture.mode == "RGB" and picture.size == (answer["shape"][2], answer["shape"][1])
        assert shape is None or answer["shape"] == shape
        assert len(answer["explained"]) == 3 and 0 < sum(answer["explained"]) <= 1 + 1e-9
        assert answer == client.json(f"/api/pca?id={urllib.parse.quote(image_id)}&desc={urllib.parse.quote(key)}")


def test_mixing_weights_are_the_checkpoints_softmax(viewer, setting):
    from dhf_cache.aggregator.checkpoint import load_checkpoint

    client, _, _ = viewer
    answer = client.json("/api/mixing?checkpoint=0")
    (table,) = answer["tables"]
    ckpt = load_checkpoint(setting.run, "cpu")
    np.testing.assert_allclose(table["weights"], ckpt.network.mixing_weights_table().numpy(), rtol=1e-6)
    assert table["layers"] == ckpt.layer_names and table["timesteps"] == ckpt.timesteps
    assert abs(sum(map(sum, table["weights"])) - 1) < 1e-5
    assert table["keys"][0][0] == f"raw:sd:{ckpt.layer_names[0]}@{ckpt.timesteps[0]}"


# ------------------------------------------------------------------------------------ bad requests
def test_unknown_items_and_bad_parameters_are_one_line_errors(viewer):
    client, lines, _ = viewer
    assert "evaluation 7" in client.error("/api/pairs?eval=7", 404)
    assert "pair 999" in client.error("/api/pair?eval=0&pair=999", 404)
    assert "no such map" in client.error("/api/click?eval=0&pair=0&desc=raw:sd:nolayer@1&x=1&y=1&load=64", 404)
    assert "ckpt:I" in client.error("/api/pca?id=x&desc=bogus", 404)
    assert "checkpoint '3'" in client.error("/api/mixing?checkpoint=3", 404)
    assert "expected a finite number" in client.error("/api/click?eval=0&pair=0&desc=ckpt:0&x=nan&y=1&load=64", 400)
    assert "expected an integer" in client.error("/api/click?eval=0&pair=0&desc=ckpt:0&x=1&y=1&load=big", 400)
    assert "load size 4" in client.error("/api/click?eval=0&pair=0&desc=ckpt:0&x=1&y=1&load=4", 400)
    assert "parameter desc: missing" in client.error("/api/click?eval=0&pair=0&x=1&y=1&load=64", 400)
    assert "no such page" in client.error("/api/nothing", 404)
    assert any("404" in line and "/api/pairs?eval=7" in line for line in lines)  # and in the log


def test_paths_from_requests_never_reach_the_file_system(viewer, setting):
    client, _, _ = viewer
    secret = Path(setting.data).resolve() / "JPEGImages"
    attempts = [
        "/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py", "/static/%2e%2e%2fdata.py",
        "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/../../etc/passwd", "/static/../../../../etc/passwd",
        "/api/photo?id=../../../../etc/passwd", "/api/photo?id=/etc/passwd",
        "/api/photo?id=" + urllib.parse.quote(str(next(secret.rglob("*.jpg")))),  # an absolute path of a real image
        "/api/photo?id=" + urllib.parse.quote("cat/../../../../../etc/passwd"),
        "/api/pca?desc=ckpt:0&id=" + urllib.parse.quote("/etc/passwd"),
    ]
    for path in attempts:
        status, content_type, body = client.request(path)
        assert status in (400, 403, 404), (path, status)
        assert content_type.startswith("application/json"), path
        assert b"root:" not in body and b"import" not in body and b"\xff\xd8" not in body, path  # no file, no JPEG


def test_requests_for_other_hosts_and_uploads_from_other_sites_are_refused(viewer, tmp_path):
    client, _, _ = viewer
    assert "Host 'attacker.example' refused" in client.error("/api/info", 403, headers={"Host": "attacker.example"})
    assert client.json("/api/info", headers={"Host": "localhost:1234"})["checkpoints"]
    body, type_ = multipart({"checkpoint": "0"}, {"a": ("a.png", b"x"), "b": ("b.png", b"y")})
    message = client.error("/api/upload", 403, method="POST", body=body,
                           headers={"Content-Type": type_, "Origin": "http://attacker.example"})
    assert "attacker.example" in message


def test_a_missing_or_damaged_chunk_is_an_error_line_and_the_server_goes_on(setting, tmp_path):
    """A copy of the cache with the raw map of one image truncated, another's deleted, and one
    stored descriptor chunk deleted: each click naming them is one line (page and log)."""
    from dhf_cache.cache.feature_cache import FeatureCache
    from dhf_cache.datasets import open_dataset

    cache = tmp_path / "damaged.zarr"
    shutil.copytree(setting.cache, cache)
    pairs = open_dataset(f"spair:{setting.data}").pairs("test")
    rows = [json.loads(l) for l in (setting.evals[0] / "predictions.jsonl").read_text().splitlines()]
    pair_index = next(k for k, row in enumerate(rows) if row["pair"] == pairs[0].name)
    ids = FeatureCache.open(str(cache)).image_ids
    src, trg = ids.index(pairs[0].src), ids.index(pairs[0].trg)
    folder = source_dir(cache)
    (folder / "features" / RAW_LAYER / "c" / str(trg) / "0" / "0" / "0" / "0").unlink()
    chunk = folder / "features" / RAW_LAYER / "c" / str(src) / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:50])
    descriptor_chunks = sorted((folder / "descriptors").glob(f"*/maps/c/{src}/0/0/0"))
    assert len(descriptor_chunks) == 1
    descriptor_chunks[0].unlink()
    server, lines = start_viewer(setting, cache=str(cache))
    try:
        client = Client(server.port)
        raw = urllib.parse.quote(setting.raw_key)
        message = client.error(f"/api/click?eval=0&pair={pair_index}&desc={raw}&x=10&y=10&load=64", 500)
        assert pairs[0].src in message and RAW_LAYER in message and "dhf-cache verify --repair" in message
        message = client.error(f"/api/pca?id={urllib.parse.quote(pairs[0].trg)}&desc={raw}", 500)
        assert pairs[0].trg in message and "chunk missing" in message
        message = client.error(f"/api/click?eval=0&pair={pair_index}&desc=ckpt:0&x=10&y=10&load=64", 500)
        assert "descriptors/" in message and "chunk missing" in message and "dhf-cache prune" in message
        assert sum(pairs[0].src in line or pairs[0].trg in line for line in lines) >= 3  # each one in the log
        assert client.json("/api/info")["images"] == 16  # the server goes on
    finally:
        server.stop()


def test_a_cache_behind_an_fsspec_url_answers_the_same(setting):
    """The object-store path (zarr's reads through fsspec, not the local direct reads): the same
    cache copied into fsspec's in-memory file system gives the same clicks and stored descriptors."""
    import fsspec

    from dhf_cache.viewer.data import ViewerData, ViewerInputs

    memory = fsspec.filesystem("memory")
    memory.put(setting.cache, "/dhf-cache-viewer-test/cache.zarr", recursive=True)
    try:
        inputs = dict(checkpoints=(setting.run,), evals=setting.evals[:1], device="cpu")
        remote = ViewerData(ViewerInputs(cache="memory://dhf-cache-viewer-test/cache.zarr", **inputs), log=lambda _: None)
        local = ViewerData(ViewerInputs(cache=setting.cache, **inputs), log=lambda _: None)
        assert remote.checkpoints[0].stored_count() == local.checkpoints[0].stored_count() == 4
        for key in ("ckpt:0", setting.raw_key):
            for point in ((5.0, 7.0), (40.5, 30.0)):
                assert remote.click(0, 0, key, point, 64)["argmax"] == local.click(0, 0, key, point, 64)["argmax"]
    finally:
        memory.rm("/dhf-cache-viewer-test", recursive=True)


# ------------------------------------------------------------------------------------ uploads
def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "dhfcacheviewertestboundary"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_for_job(client: Client, job: dict, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    seen = {job["stage"]}
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
        job = client.json(f"/api/job?id={job['id']}")
        seen.add(job["stage"])
    job["seen"] = seen
    return job


def test_uploaded_photos_match_as_dhf_cache_match_does(viewer, setting):
    from dhf_cache.api import Hyperfeatures

    client, _, _ = viewer
    pair = client.json("/api/pair?eval=0&pair=0")
    a, b = (setting.data / "JPEGImages" / pair["src"]), (setting.data / "JPEGImages" / pair["trg"])
    body, type_ = multipart({"checkpoint": "0", "grid": "2"}, {"a": ("a.jpg", a.read_bytes()), "b": ("../../b.jpg", b.read_bytes())})
    job = wait_for_job(client, client.json("/api/upload", method="POST", body=body, headers={"Content-Type": type_}))
    assert job["state"] == "done", job
    assert job["step"] == job["steps"] and len(job["seen"]) >= 2  # the page saw it progress
    hf = Hyperfeatures.from_checkpoint(setting.run, device="cpu")
    points_a, points_b = hf.match(a, b, grid=2)
    assert job["result"]["points_a"] == points_a.tolist() and job["result"]["points_b"] == points_b.tolist()
    # a click on A: the argmax match_points gives for that point
    _, expected = hf.match(a, b, points=[[20.5, 30.0]], load_size=96)
    answer = client.json(f"/api/upload-click?job={job['id']}&x=20.5&y=30.0&load=96")
    assert answer["argmax"] == expected[0].tolist() and decode(answer["heatmap"]).size == (96, 96)


def test_uploads_are_size_limited_and_decoded_safely(viewer):
    client, lines, _ = viewer
    big = os.urandom(150_000)  # the fixture's limit is 100 kB
    body, type_ = multipart({"checkpoint": "0"}, {"a": ("big.jpg", big), "b": ("b.jpg", b"x")})
    assert "exceeds the upload limit" in client.error("/api/upload", 400, method="POST", body=body,
                                                      headers={"Content-Type": type_})
    body, type_ = multipart({"checkpoint": "0"}, {"a": ("a.jpg", b"not an image at all"), "b": ("b.jpg", b"GIF89a")})
    job = wait_for_job(client, client.json("/api/upload", method="POST", body=body, headers={"Content-Type": type_}))
    assert job["state"] == "error" and job["error"].startswith("photo A (a.jpg): not a readable image file")
    assert ".upload" not in job["error"]
    body, type_ = multipart({"checkpoint": "5"}, {"a": ("a.jpg", b"x"), "b": ("b.jpg", b"y")})
    assert "checkpoint 5" in client.error("/api/upload", 404, method="POST", body=body, headers={"Content-Type": type_})
    assert "malformed request" in client.error("/api/upload", 400, method="POST", body=b"--x\r\n",
                                               headers={"Content-Type": "multipart/form-data; boundary=x"})
    body, type_ = multipart({"checkpoint": "0"}, {"a": ("a.jpg", b"x")})
    assert "photo B: expected one file" in client.error("/api/upload", 400, method="POST", body=body,
                                                        headers={"Content-Type": type_})
    assert "unknown or expired" in client.error("/api/job?id=nope", 404)
    assert "not finished" in client.error(f"/api/upload-click?job={job['id']}&x=1&y=1&load=64", 400)


# ------------------------------------------------------------------------------------ the command
def test_view_command_prints_its_address_and_refuses_a_busy_port(setting, monkeypatch):
    from dhf_cache.viewer import server as server_module

    monkeypatch.setattr(server_module.ViewerServer, "wait", lambda self: None)  # return at once, then stop
    result = invoke("view", "--cache", setting.cache, "--eval", setting.evals[1], "--port", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "dhf-cache view: open http://127.0.0.1:" in result.output and "warning" not in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = invoke("view", "--cache", setting.cache, "--port", busy.getsockname()[1], "--device", "cpu")
    assert result.exit_code == 2 and "cannot listen there" in result.output and "Traceback" not in result.output
    result = invoke("view", "--cache", setting.cache, "--eval", setting.cache, "--device", "cpu")
    assert result.exit_code == 1 and "no metrics.json" in result.output


def test_only_loopback_hosts_skip_the_warning():
    from dhf_cache.viewer.server import host_name, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    assert host_name("[::1]:8765") == "::1" and host_name("LOCALHOST:80") == "localhost"
