"""Issue 22 (hardening) for ``d3s2 generate``: outputs that collide or cannot be written and bad sampler settings are
refused before any model work, a bad image in a batch does not stop the others."""

import os

import pytest

from d3s2.cli import main
from pipeline_helpers import square_image


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(square_image(path))


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# weights that do not exist: the old code got past the checks and failed on them instead
NO_WEIGHTS = ["--weights", "/nonexistent/weights"]


def test_two_inputs_with_one_stem_are_refused_up_front(tmp_path, capsys):
    a, b = _img(tmp_path / "a" / "good.png"), _img(tmp_path / "b" / "good.png")
    out = tmp_path / "out"
    assert main(["generate", a, b, "-o", str(out), *NO_WEIGHTS]) == 2
    err = _one_error(capsys)
    assert "would both be written to" in err and a in err and b in err and "good.glb" in err
    assert not out.exists()


def test_case_only_collisions_and_repeated_inputs_are_refused(tmp_path, capsys):
    a, b = _img(tmp_path / "x" / "Cat.png"), _img(tmp_path / "y" / "cat.webp")
    assert main(["generate", a, b, "-o", str(tmp_path / "o"), *NO_WEIGHTS]) == 2
    assert "would both be written" in _one_error(capsys)
    assert main(["generate", a, a, "-o", str(tmp_path / "o"), *NO_WEIGHTS]) == 2
    assert "given twice" in _one_error(capsys)


def test_an_output_that_would_overwrite_an_input_is_refused(tmp_path, capsys):
    src = _img(tmp_path / "a.preview.png")
    other = _img(tmp_path / "sub" / "a.png")
    assert main(["generate", src, other, "-o", str(tmp_path), "--preview", *NO_WEIGHTS]) == 2
    assert "would overwrite the input image" in _one_error(capsys)
    assert os.path.getsize(src) > 0


def test_unwritable_output_is_found_before_loading(tmp_path, capsys):
    img = _img(tmp_path / "a.png")
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["generate", img, "-o", str(f), *NO_WEIGHTS]) == 2
    assert "is a file, not a folder" in _one_error(capsys)
    assert main(["generate", img, "-o", str(f / "sub"), *NO_WEIGHTS]) == 2
    assert "cannot be created" in _one_error(capsys)
    (tmp_path / "o" / "a.glb").mkdir(parents=True)
    assert main(["generate", img, "-o", str(tmp_path / "o"), *NO_WEIGHTS]) == 2
    assert "is a folder" in _one_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_is_found_before_loading(tmp_path, capsys):
    img = _img(tmp_path / "a.png")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["generate", img, "-o", str(ro / "out"), *NO_WEIGHTS]) == 2
        assert "cannot write in" in _one_error(capsys)
    finally:
        ro.chmod(0o755)


def test_read_only_output_probe(tmp_path, monkeypatch):
    """The probe write fails as on a read-only mount (root ignores permission bits, so fake the failure)."""
    import tempfile

    from d3s2.errors import D3S2Error
    from d3s2.fileio import check_writable_dir

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(D3S2Error, match="cannot write in .*Permission denied"):
        check_writable_dir(tmp_path / "new" / "deeper", "-o")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--steps-dense", "0"], "--steps-dense must be a whole number of sampling steps in [1, 1000], got 0"),
    (["--steps-dense", "-3"], "--steps-dense must be"),
    (["--steps-512", "0"], "--steps-512 must be"),
    (["--steps-1024", "0"], "--steps-1024 must be"),
    (["--steps-dense", "100000000"], "in [1, 1000]"),
    (["--cfg", "nan"], "--cfg must be a finite number"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--cfg", "-1"], "--cfg must be a guidance scale in [0, 100]"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--seed", str(2**64)], "--seed must be an integer"),
    (["--faces", "2"], "--faces 2 is too small"),
])
def test_bad_sampler_flags_are_refused_before_loading(tmp_path, capsys, flags, needle):
    img = _img(tmp_path / "a.png")
    assert main(["generate", img, "-o", str(tmp_path / "o"), *NO_WEIGHTS, *flags]) == 2
    assert needle in _one_error(capsys)
    assert not (tmp_path / "o").exists()


def test_pipeline_call_checks_every_stage_before_running(one_torch_thread):
    from d3s2.errors import D3S2Error
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

    pipe = ImageTo3DPipeline.from_config("pipeline_tiny", device="cpu")
    for kwargs, needle in (({"num_inference_steps": {"dense": 2, "512": 0}}, r"num_inference_steps\['512'\]"),
                           ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
                           ({"shift": {"1024": 0.0}}, r"shift\['1024'\] must be a timestep shift"),
                           ({"num_inference_steps": {"structure": 2}}, "unknown stage 'structure'")):
        with pytest.raises(D3S2Error, match=needle):
            pipe(square_image(), progress=False, **kwargs)
        assert pipe.last_stats == []  # not even preprocessing ran


def test_sampler_config_bounds_apply_to_pipeline_files():
    from d3s2.errors import D3S2Error
    from d3s2.flow.sampler import SamplerConfig
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

    with pytest.raises(D3S2Error, match="sampler steps"):
        SamplerConfig(steps=0)
    with pytest.raises(D3S2Error, match="sampler shift"):
        SamplerConfig(shift=float("nan"))
    from d3s2.config import load_yaml, resolve_config_path

    data = load_yaml(resolve_config_path("pipeline_tiny"))
    data["components"]["dense_dit"] = {"config": "dense_dit_tiny", "sampler": {"steps": 100000000}}
    with pytest.raises(D3S2Error, match=r"dense_dit.sampler.*|sampler steps"):
        ImageTo3DPipeline.from_config(data)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, one_torch_thread):
    from pipeline_helpers import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("weights"))


FAST = ["--no-progress", "--steps-dense", "2", "--steps-512", "2", "--faces", "500"]


def test_a_decompression_bomb_is_one_line_and_the_batch_goes_on(tmp_path, weights, capsys, monkeypatch):
    from PIL import Image

    # a 200x200 image over a lowered limit stands in for a 400-megapixel one (same PIL code path, no 400 MB)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    bomb = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(bomb)
    good = _img(tmp_path / "good.png")
    out = tmp_path / "o"
    rc = main(["generate", str(bomb), good, "-o", str(out), "--weights", str(weights), *FAST])
    cap = capsys.readouterr()
    assert rc == 1
    errors = [line for line in cap.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "bomb.png" in errors[0] and "too large to decode safely" in errors[0]
    assert "downscale it below" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["good.glb"]


def test_an_unexpected_error_in_one_image_does_not_stop_the_batch(tmp_path, weights, capsys, monkeypatch):
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

    real = ImageTo3DPipeline.__call__

    def flaky(self, image, *a, **k):
        if "boom" in str(image):
            raise RuntimeError("simulated failure\nsecond line")
        return real(self, image, *a, **k)

    monkeypatch.setattr(ImageTo3DPipeline, "__call__", flaky)
    boom, good = _img(tmp_path / "boom.png"), _img(tmp_path / "good.png")
    out = tmp_path / "o"
    rc = main(["generate", boom, good, "-o", str(out), "--weights", str(weights), *FAST])
    cap = capsys.readouterr()
    assert rc == 1
    errors = [line for line in cap.err.splitlines() if "error:" in line]
    assert errors == [f"d3s2 generate: error: {boom}: unexpected RuntimeError: simulated failure second line"]
    assert sorted(p.name for p in out.iterdir()) == ["good.glb"]


def test_an_object_that_covers_almost_nothing_warns(tmp_path):
    import warnings

    import numpy as np
    from PIL import Image

    from d3s2.pipelines.preprocess import preprocess_image

    dot = tmp_path / "dot.png"
    Image.fromarray(np.array([[[200, 100, 50, 128]]], np.uint8)).save(dot)  # 1x1, semi-transparent
    with pytest.warns(UserWarning, match=r"dot.png: the object covers almost nothing \(0.5 pixels of mask in a 1x1"):
        preprocess_image(str(dot), size=28)
    faint = np.zeros((64, 64, 4), np.uint8)
    faint[..., :3] = 200
    faint[..., 3] = 5  # visible to the mask (> 0) but nearly transparent everywhere
    with pytest.warns(UserWarning, match="almost transparent"):
        preprocess_image(faint, size=28)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess_image(square_image(), size=28)  # an ordinary object: no warning
        preprocess_image(square_image(), size=28, mode="release")


def test_generate_prints_the_tiny_object_warning(tmp_path, weights, capsys):
    import numpy as np
    from PIL import Image

    dot = tmp_path / "dot.png"
    Image.fromarray(np.array([[[200, 100, 50, 128]]], np.uint8)).save(dot)
    main(["generate", str(dot), "-o", str(tmp_path / "o"), "--weights", str(weights), *FAST])
    warns = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert any("covers almost nothing" in w for w in warns), warns


@pytest.mark.parametrize("stage", ["structure", "sparse 512"])
def test_nan_stage_output_is_not_reported_as_no_shape(stage, one_torch_thread):
    import torch

    from d3s2.errors import D3S2Error
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

    pipe = ImageTo3DPipeline.from_config("pipeline_tiny", device="cpu")
    vae = pipe.models["dense_vae" if stage == "structure" else "ss_vae_512"]
    with torch.no_grad():
        for p in vae.parameters():
            p.fill_(float("nan"))
    kwargs = {}
    if stage != "structure":  # skip the structure stage: a fixed token set
        r = pipe.models["dense_vae"].config.resolution
        kwargs["structure_coords"] = torch.tensor([[0, r // 2, r // 2, r // 2], [0, r // 2 + 1, r // 2, r // 2]])
    with pytest.raises(D3S2Error, match=f"the {stage} stage produced NaN or infinite values"):
        pipe(square_image(), num_inference_steps=1, progress=False, **kwargs)


def test_resolution_1024_without_its_stage_is_one_error(tmp_path, capsys):
    from d3s2.pipelines.bundled import bundled_model_path

    if bundled_model_path() is None:
        pytest.skip("no bundled demo model")
    a, b = _img(tmp_path / "a.png"), _img(tmp_path / "b.png")
    assert main(["generate", a, b, "-o", str(tmp_path / "o"), "--resolution", "1024", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "no 1024 stage" in err[0], err
