"""Hub ids as weights (d3s2.pipelines.hub), against the local hub server of tests/hub_server.py: huggingface_hub's
real download code fetches a tiny release-layout repo (``wushuang98/Direct3D-S2``: tiny models in the authors' key
conventions, refiners from the published key list, timm's DINOv2 layout) and a tiny d3s2-format repo, the pipeline
loads them and generates a mesh; a second run downloads nothing, ``--resolution 512`` fetches no 1024 file, a
transfer cut half-way leaves no file in the cache and the retry succeeds, offline runs give one line."""

import hashlib
import io
import os
from pathlib import Path

import pytest
import torch
import yaml

from d3s2.errors import D3S2Error
from d3s2.pipelines import hub as hubmod
from d3s2.pipelines.image_to_3d import ImageTo3DPipeline
from hub_server import FakeHub
from pipeline_helpers import make_tiny_weights, square_image
from release_fixtures import sphere_hooks, tiny_release

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RELEASE = "wushuang98/Direct3D-S2"
SUB = "direct3d-s2-v-1-1"
D3S2_REPO = "tester/d3s2-tiny"
FILES_512 = {"config.yaml", "model_dense.ckpt", "model_sparse_512.ckpt", "model_refiner.ckpt"}
FILES_1024 = {"model_sparse_1024.ckpt", "model_refiner_1024.ckpt"}


def _ckpt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _timm_dinov2(enc) -> bytes:
    """timm's layout of a DINOv2-reg encoder: reg_token, patch-only pos_embed, CLS position folded into cls_token."""
    from safetensors.torch import save

    sd = {k: v.clone() for k, v in enc.state_dict().items()}
    pos, cls = sd.pop("pos_embed"), sd.pop("cls_token")
    sd.pop("mask_token")
    sd["reg_token"] = sd.pop("register_tokens")
    sd["cls_token"] = cls + pos[:, :1]
    sd["pos_embed"] = pos[:, 1:].contiguous()
    return save(sd)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_weights(tmp_path_factory.mktemp("hub_tiny"))
    pipe = ImageTo3DPipeline.from_pretrained(folder, device="cpu", matting="border")
    return Path(folder), pipe


@pytest.fixture(scope="module")
def release():
    """A tiny release (the authors' config.yaml params and key layout) and the d3s2 models its weights came from."""
    return tiny_release("v1.1")


@pytest.fixture(scope="module")
def server(tiny, release):
    folder, pipe = tiny
    m = pipe.models
    config, ckpts, _ = release
    # refiners: full-size meta checkpoints (they load strictly, cannot run: the tests build with refiners=False)
    files = {"config.yaml": yaml.safe_dump(config).encode(),
             **{name: _ckpt_bytes(ckpt) for name, ckpt in ckpts.items()}}
    hub = FakeHub().start()
    hub.add_repo(RELEASE, {f"{sub}/{k}": v for k, v in files.items()
                           for sub in (SUB, "direct3d-s2-v-1-0")} | {"README.md": b"# release\n"})
    hub.add_repo("timm/vit_large_patch14_reg4_dinov2.lvd142m",
                 {"model.safetensors": _timm_dinov2(m["image_encoder"]), "config.json": b"{}"})
    hub.add_repo(D3S2_REPO, FakeHub.folder_files(folder))
    hub.add_repo("tester/bundle", FakeHub.folder_files(folder, prefix="tiny/"))
    hub.add_repo("tester/empty", {"README.md": b"nothing here\n"})
    yield hub, files
    hub.stop()


@pytest.fixture
def online(server, tmp_path, monkeypatch):
    """HF_ENDPOINT at the local server, a fresh cache, downloads on."""
    import huggingface_hub.constants as hf_constants

    hub, files = server
    if not hf_constants.ENDPOINT.startswith("http://127.0.0.1") or hf_constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported before tests/conftest.py set its endpoint")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", os.fspath(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", os.fspath(tmp_path / "torch"))  # no DINOv2 file found outside this test
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.reset()
    yield hub, files, tmp_path / "hf"
    hub.reset()


def _names(gets):
    return sorted(os.path.basename(p) for _, p in gets)


def _same_weights(a, b):
    for name, m in a.models.items():
        sd = b.models[name].state_dict()
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)


def _mesh(pipe, release: bool = False):
    extra = sphere_hooks(pipe) if release else {}
    meshes = pipe(square_image(), generator=torch.Generator().manual_seed(0), progress=False,
                  num_inference_steps={"dense": 4, "512": 2, "1024": 1}, **extra)
    return meshes[0]


def test_parse_hub_id():
    p = hubmod.parse_hub_id
    assert p(RELEASE) == hubmod.HubId(RELEASE) and p(RELEASE).is_release
    assert p(f"{RELEASE}/direct3d-s2-v-1-0") == hubmod.HubId(RELEASE, "direct3d-s2-v-1-0")
    assert p("a/b/c/d/") == hubmod.HubId("a/b", "c/d")
    assert p("timm/vit_large_patch14_reg4_dinov2.lvd142m").repo_id == "timm/vit_large_patch14_reg4_dinov2.lvd142m"
    for local in ("./a/b", "/abs/a/b", "~/a/b", "one", "a/../b", "a\\b", "C:/a/b", "", "a//b"):
        assert p(local) is None, local
    assert hubmod.release_files(512) == tuple(sorted(FILES_512, key=list(hubmod.RELEASE_FILES_512).index))
    assert set(hubmod.release_files(None)) == FILES_512 | FILES_1024
    with pytest.raises(D3S2Error, match="512 or 1024"):
        hubmod.release_files(768)


@pytest.mark.slow
def test_release_downloads_what_the_resolution_needs_then_nothing(online, tiny, release):
    hub, files, cache = online
    src = release[2]
    enc = tiny[1].models["image_encoder"]
    pipe = ImageTo3DPipeline.from_pretrained(RELEASE, device="cpu", resolution=512, image_encoder=enc,
                                             matting="border", refiners=False)
    # the 512 files and DINOv2 (not cached anywhere yet), nothing of the 1024 stage
    assert _names(hub.content_gets()) == sorted(FILES_512 | {"model.safetensors"})
    assert set(pipe.models) == set(src) - {"ss_vae_1024", "ss_dit_1024"} | {"image_encoder"}
    for name in set(pipe.models) - {"image_encoder"}:
        for k, v in src[name].state_dict().items():
            assert torch.equal(v, pipe.models[name].state_dict()[k]), (name, k)
    mesh = _mesh(pipe, release=True)
    assert len(mesh.faces) > 0
    # cached files are what the server holds (no partial or mixed file)
    snap = next((cache / "models--wushuang98--Direct3D-S2" / "snapshots").iterdir()) / SUB
    assert sorted(p.name for p in snap.iterdir()) == sorted(FILES_512)
    for p in snap.iterdir():
        assert p.read_bytes() == files[p.name]

    # a second run: no content request (one metadata request for the branch), same models
    hub.reset()
    again = ImageTo3DPipeline.from_pretrained(RELEASE, device="cpu", resolution=512, image_encoder=enc,
                                              matting="border", refiners=False)
    assert hub.content_gets() == [] and len(hub.requests) <= 1
    _same_weights(pipe, again)

    # the 1024 stage later: exactly its two files
    hub.reset()
    full = ImageTo3DPipeline.from_pretrained(RELEASE, device="cpu", resolution=1024, image_encoder=enc,
                                             matting="border", refiners=False)
    assert _names(hub.content_gets()) == sorted(FILES_1024)
    for name, m in src.items():
        for k, v in m.state_dict().items():
            assert torch.equal(v, full.models[name].state_dict()[k]), (name, k)

    # load_official_pipeline takes the same hub ids and keywords; v1.0 by subfolder (same bytes: blobs shared)
    from d3s2.pipelines.release_pipeline import load_official_pipeline

    hub.reset()
    v10 = load_official_pipeline(f"{RELEASE}/direct3d-s2-v-1-0", device="cpu", resolution=512, image_encoder=enc,
                                 matting="border", refiners=False)
    assert hub.content_gets() == [] and "ss_dit_512" in v10.models


def test_dinov2_from_the_hub_loads_strictly_and_is_found_in_the_cache(online, tiny):
    from d3s2.models.image_encoder import DINOv2Encoder, find_dinov2_weights

    hub, _, cache = online
    enc = tiny[1].models["image_encoder"]
    assert find_dinov2_weights() is None
    path = hubmod.fetch_dinov2_weights()
    assert path.name == "model.safetensors" and cache in path.parents
    assert find_dinov2_weights() == path  # where load_official_pipeline's encoder looks
    loaded = DINOv2Encoder(enc.config, weights=path).eval()
    x = torch.rand(2, 4, enc.config.image_size, enc.config.image_size)
    with torch.no_grad():
        assert torch.allclose(loaded(x), enc.eval()(x), atol=1e-5)
    hub.reset()
    assert hubmod.fetch_dinov2_weights() == path and hub.content_gets() == []


def test_d3s2_repo_and_subfolder(online, tiny):
    hub, _, _ = online
    folder, src = tiny
    pipe = ImageTo3DPipeline.from_pretrained(D3S2_REPO, device="cpu", resolution=512, matting="border")
    assert _names(hub.content_gets()) == sorted(["pipeline.yaml", "image_encoder.safetensors", "dense_vae.safetensors",
                                                 "dense_dit.safetensors", "ss_vae_512.safetensors",
                                                 "ss_dit_512.safetensors"])
    assert "ss_dit_1024" not in pipe.models
    for name in pipe.models:
        for k, v in src.models[name].state_dict().items():
            assert torch.equal(v, pipe.models[name].state_dict()[k]), (name, k)
    assert len(_mesh(pipe).faces) > 0
    hub.reset()
    ImageTo3DPipeline.from_pretrained(D3S2_REPO, device="cpu", resolution=512, matting="border")
    assert hub.content_gets() == []
    # every file (resolution None), pinned to the commit; the repo in a subfolder of another repo
    hub.reset()
    commit = hub.repos[D3S2_REPO].commit
    full = ImageTo3DPipeline.from_pretrained(D3S2_REPO, device="cpu", revision=commit, matting="border")
    assert _names(hub.content_gets()) == ["ss_dit_1024.safetensors", "ss_vae_1024.safetensors"]
    _same_weights(src, full)
    sub = ImageTo3DPipeline.from_pretrained("tester/bundle/tiny", device="cpu", matting="border")
    _same_weights(src, sub)


def test_hub_errors_are_one_line(online):
    hub, _, _ = online
    cases = [("tester/missing", {}, "the hub has no model repo tester/missing"),
             (D3S2_REPO, {"revision": "v9"}, "revision 'v9' not found in tester/d3s2-tiny"),
             ("tester/empty", {}, "holds neither pipeline.yaml .*nor direct3d-s2-v-1-1/config.yaml"),
             (D3S2_REPO, {"resolution": 768}, "512 or 1024")]
    for repo, kw, words in cases:
        with pytest.raises(D3S2Error, match=words) as err:
            ImageTo3DPipeline.from_pretrained(repo, device="cpu", matting="border", **kw)
        assert "\n" not in str(err.value)
    # something that answers without the hub's headers (a proxy page): cannot reach the hub
    hub.not_a_hub = True
    with pytest.raises(D3S2Error, match=r"authors' weights are not in the cache and cannot reach the hub at "
                                        r"http://127\.0\.0\.1.*download config\.yaml, model_dense\.ckpt") as err:
        ImageTo3DPipeline.from_pretrained(RELEASE, device="cpu", matting="border")
    assert "\n" not in str(err.value)


def _cache_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() or p.is_symlink()]


@pytest.mark.slow
def test_interrupted_download_leaves_no_file_and_the_retry_succeeds(online, tiny):
    hub, files, cache = online
    enc = tiny[1].models["image_encoder"]
    kw = dict(device="cpu", resolution=512, image_encoder=enc, matting="border", refiners=False)
    hub.drop_always.add(f"{SUB}/model_sparse_512.ckpt")  # every attempt stops half-way (the client retries 5 times)
    with pytest.raises(D3S2Error, match="model_sparse_512.ckpt .*failed.*run the command again") as err:
        ImageTo3DPipeline.from_pretrained(RELEASE, **kw)
    assert "\n" not in str(err.value)
    sha = hashlib.sha256(files["model_sparse_512.ckpt"]).hexdigest()
    left = _cache_files(cache)
    assert not [p for p in left if p.name.endswith(".incomplete") or p.name == sha]
    assert not [p for p in left if p.name == "model_sparse_512.ckpt"]
    for p in left:  # whatever is there is complete
        if "snapshots" in p.parts:
            assert p.read_bytes() == files[p.name]
    hub.drop_always.clear()
    hub.reset()
    pipe = ImageTo3DPipeline.from_pretrained(RELEASE, **kw)  # the retry fetches only what is missing
    assert _names(hub.content_gets()) == ["model.safetensors", "model_refiner.ckpt", "model_sparse_512.ckpt"]
    snap = next((cache / "models--wushuang98--Direct3D-S2" / "snapshots").iterdir()) / SUB
    assert (snap / "model_sparse_512.ckpt").read_bytes() == files["model_sparse_512.ckpt"]
    assert "ss_dit_512" in pipe.models
    # one drop in a transfer: the client's own retry completes the file, and it is intact
    hub.drop_once.add(f"{SUB}/model_sparse_1024.ckpt")
    hub.reset()
    ImageTo3DPipeline.from_pretrained(RELEASE, **{**kw, "resolution": 1024})
    assert (snap / "model_sparse_1024.ckpt").read_bytes() == files["model_sparse_1024.ckpt"]


def test_offline_is_one_line_and_never_asks_the_server(online, tiny, monkeypatch):
    hub, _, _ = online
    enc = tiny[1].models["image_encoder"]
    kw = dict(device="cpu", image_encoder=enc, matting="border", refiners=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(D3S2Error, match=r"wushuang98/Direct3D-S2: the authors' weights are not available offline; "
                                        r"download config\.yaml, model_dense\.ckpt, model_sparse_512\.ckpt, "
                                        r"model_refiner\.ckpt from http://127\.0\.0\.1:\d+/wushuang98/Direct3D-S2/"
                                        r"tree/main/direct3d-s2-v-1-1 into one folder") as err:
        ImageTo3DPipeline.from_pretrained(RELEASE, resolution=512, **kw)
    assert "\n" not in str(err.value) and "1024" not in str(err.value)
    with pytest.raises(D3S2Error, match="not a local folder, and not available offline: neither pipeline.yaml"):
        ImageTo3DPipeline.from_pretrained(D3S2_REPO, device="cpu", matting="border")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(D3S2Error, match="not available offline.*model_sparse_1024.ckpt.*only needed for"):
        ImageTo3DPipeline.from_pretrained(RELEASE, local_files_only=True, **kw)
    assert hub.requests == []
    # filled once online, then offline: loads from the cache without a single request
    ImageTo3DPipeline.from_pretrained(RELEASE, resolution=512, **kw)
    ImageTo3DPipeline.from_pretrained(D3S2_REPO, resolution=512, device="cpu", matting="border")
    hub.reset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = ImageTo3DPipeline.from_pretrained(RELEASE, resolution=512, **kw)
    ImageTo3DPipeline.from_pretrained(D3S2_REPO, resolution=512, device="cpu", matting="border")
    assert hub.requests == [] and "ss_dit_512" in pipe.models
    # the 1024 files were never fetched: offline, asking for them names them
    with pytest.raises(D3S2Error, match="not available offline; download .*model_sparse_1024.ckpt"):
        ImageTo3DPipeline.from_pretrained(RELEASE, resolution=1024, **kw)


def test_cli_generate_with_a_hub_id(online, tmp_path, capsys, monkeypatch):
    from d3s2.cli import main

    hub, _, _ = online
    img = square_image(tmp_path / "obj.png")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")  # the one command: no -o, the mesh lands in the current folder
    args = ["generate", os.fspath(img), "--weights", D3S2_REPO, "--steps-dense", "2", "--steps-512", "1",
            "--no-progress", "--device", "cpu", "--matting", "border"]
    assert main(args) == 0
    assert (tmp_path / "out" / "obj.glb").is_file()
    assert hub.content_gets() and not [p for _, p in hub.content_gets() if "1024" in p]  # --resolution 512
    args += ["-o", os.fspath(tmp_path / "out2")]
    assert main([*args, "--revision", "nope"]) == 2
    assert not (tmp_path / "out2").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("d3s2 generate: error: tester/d3s2-tiny: revision 'nope' not found")


def test_a_branch_moving_during_the_download_does_not_mix_versions(online):
    hub, files, _ = online
    original = dict(hub.repos[RELEASE].files)
    first = hub.repos[RELEASE].commit
    changed = {**original, f"{SUB}/model_dense.ckpt": b"a newer dense checkpoint"}
    hub.after_get[f"{SUB}/config.yaml"] = lambda: hub.add_repo(RELEASE, changed)  # main moves after the 1st file
    try:
        got = hubmod.fetch_weights(RELEASE, resolution=512)
        assert got.commit == first and got.folder.parent.name == first
        assert (got.folder / "model_dense.ckpt").read_bytes() == files["model_dense.ckpt"]
        # the next run follows main to the new commit; unchanged files are not transferred again
        hub.reset()
        newer = hubmod.fetch_weights(RELEASE, resolution=512)
        assert newer.commit != first and (newer.folder / "model_dense.ckpt").read_bytes() == b"a newer dense checkpoint"
        assert _names(hub.content_gets()) == ["model_dense.ckpt"]
    finally:
        hub.add_repo(RELEASE, original)  # commit ids follow the content: main is back at the first commit
    assert hub.repos[RELEASE].commit == first
