"""The release's refiner networks (d3s2.models.refiner, nn.unet3d, nn.adaptive_filter): full-size strict loading on
the meta device against the reference key file, one-line errors for wrong checkpoints, the release config.yaml
translation, tiny forwards, and the lean no-grad paths against the plain PyTorch ones."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from d3s2.config import build_model, load_model_config
from d3s2.errors import D3S2Error
from d3s2.models.refiner import (REFINERS, SDFRefiner, SDFRefinerConfig, SignRefiner, SignRefinerConfig,
                                 build_refiner, load_refiner_checkpoint)
from d3s2.nn import unet3d
from d3s2.nn.adaptive_filter import adaptive_filter, adaptive_filter_reference
from d3s2.nn.unet3d import (FP32GroupNorm, ResnetBlock3d, group_norm_silu, group_norm_silu_parts,
                            group_norm_silu_reference)
from d3s2.pipelines.official import load_release
from d3s2.pipelines.release_config import read_release_config
from release_fixtures import KEYS, meta_checkpoints, release_config, tiny_refiners, write_release_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COMPONENT = {"refiner_512": "refiner", "refiner_1024": "refiner_1024"}


def _meta_sd(which):
    return {k: torch.empty(s, device="meta") for k, s in KEYS[COMPONENT[which]]["keys"].items()}


@pytest.mark.parametrize("which", ["refiner_512", "refiner_1024"])
def test_full_size_keys_shapes_and_counts(which):
    ref = KEYS[COMPONENT[which]]
    model = load_refiner_checkpoint({"refiner": _meta_sd(which)}, which)
    sd = model.state_dict()
    assert set(sd) == set(ref["keys"]) and len(sd) == ref["num_keys"]
    assert all(list(sd[k].shape) == s for k, s in ref["keys"].items())
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert all(p.device.type == "meta" for p in model.parameters())  # the checkpoint's tensors, no fresh init
    assert model.patch_size == ref["params"]["patch_size"]
    assert isinstance(model, REFINERS[which][0]) and not model.training
    if which == "refiner_512":
        assert model.feature_channels == 32


def test_checkpoint_file_and_errors(tmp_path):
    sd = _meta_sd("refiner_512")
    path = tmp_path / "model_refiner.ckpt"
    torch.save({"refiner": sd}, path)
    assert isinstance(load_refiner_checkpoint(path, "refiner_512"), SDFRefiner)
    with pytest.raises(D3S2Error, match=r"missing keys \(first: latent_mlp"):  # the 1024 refiner has no MLP
        load_refiner_checkpoint({"refiner": _meta_sd("refiner_1024")}, "refiner_512")
    with pytest.raises(D3S2Error, match=r"19 unexpected keys \(first: (latent_mlp|adaptive_conv|mid_conv)"):
        load_refiner_checkpoint({"refiner": sd}, "refiner_1024")
    renamed = dict(sd)
    renamed["conv_out.weightx"] = renamed.pop("conv_out.weight")
    with pytest.raises(D3S2Error, match=r"1 missing keys \(first: conv_out.weight\)"):
        load_refiner_checkpoint(renamed, "refiner_512")
    bad = dict(sd)
    bad["mid_conv.weight"] = torch.empty(8, 8, 3, 3, 1, device="meta")
    torch.save({"refiner": bad}, path)
    with pytest.raises(D3S2Error) as info:
        load_refiner_checkpoint(path, "refiner_512")
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "mid_conv.weight is [8, 8, 3, 3, 1]" in msg
    with pytest.raises(D3S2Error, match="missing refiner checkpoint"):
        load_refiner_checkpoint(tmp_path / "nope.ckpt", "refiner_512")
    with pytest.raises(D3S2Error, match="unknown refiner 'refiner_2048'"):
        load_refiner_checkpoint(sd, "refiner_2048")


def test_release_config_translation_and_folder(tmp_path):
    rel = read_release_config(release_config("v1.1"))
    (k512, c512), (k1024, c1024) = rel.refiners["refiner_512"], rel.refiners["refiner_1024"]
    assert (k512, k1024) == ("sdf_refiner", "sign_refiner")
    assert (c512.patch_size, c1024.patch_size, c512.layers_per_block, c1024.layers_mid_block) == (192, 256, 2, 2)
    assert rel.use_fp16["refiner_512"] and rel.use_fp16["refiner_1024"]
    assert "refiner_1024" not in read_release_config(release_config("v1.1"), with_1024=False).refiners
    extra = release_config("v1.1")
    extra["refiner"]["params"]["num_heads"] = 4
    with pytest.raises(D3S2Error, match="refiner: unknown parameter 'num_heads'"):
        read_release_config(extra)
    odd = release_config("v1.1")
    odd["refiner_1024"]["params"]["res"] = 1024
    with pytest.raises(D3S2Error, match="refiner_1024: res=1024 is not supported"):
        read_release_config(odd)
    odd["refiner_1024"]["params"].update(res=512, patch_size=100)
    with pytest.raises(D3S2Error, match="patch_size 100 is not a multiple of 8"):
        read_release_config(odd)
    # a release folder: both refiners load strictly; without their files they are None
    folder = write_release_folder(tmp_path / "rel", release_config("v1.1"), meta_checkpoints("v1.1"))
    got = load_release(folder)
    assert isinstance(got.refiner_512, SDFRefiner) and isinstance(got.refiner_1024, SignRefiner)
    assert got.refiner_1024.config.patch_size == 256 and got.files["refiner_512"].name == "model_refiner.ckpt"
    assert load_release(folder, resolution=512).refiner_1024 is None
    assert load_release(folder, refiners=False).refiner_512 is None
    (folder / "model_refiner_1024.ckpt").unlink()
    assert load_release(folder).refiner_1024 is None
    sd = meta_checkpoints("v1.1")["model_refiner.ckpt"]
    sd["refiner"].pop("conv_in.bias")
    torch.save(sd, folder / "model_refiner.ckpt")
    with pytest.raises(D3S2Error, match=r"model_refiner\.ckpt \[refiner\]: .*first: conv_in.bias"):
        load_release(folder)


def test_yaml_configs_are_the_release_models():
    for name, cls, comp in (("refiner_512", SDFRefiner, "refiner"), ("refiner_1024", SignRefiner, "refiner_1024")):
        cfg = load_model_config(name)
        assert cfg.params == cls.config_class() and cfg.params.patch_size == KEYS[comp]["params"]["patch_size"]
        assert set(build_refiner(name, cfg.params, empty=True).state_dict()) == set(KEYS[comp]["keys"])
    assert isinstance(build_model(load_model_config("refiner_1024"), device="meta"), SignRefiner)


def test_fp16_cast_keeps_group_norms_fp32():
    m = tiny_refiners()["refiner_512"].to(torch.float16)
    assert m.dtype == torch.float16 and m.latent_mlp.net[0].weight.dtype == torch.float16
    norms = [mod for mod in m.modules() if isinstance(mod, FP32GroupNorm)]
    assert norms and all(p.dtype == torch.float32 for n in norms for p in n.parameters())
    assert m.to(torch.float32).adaptive_conv1[0].weight.dtype == torch.float32


def test_tiny_forward_shapes_and_input_errors():
    ref = tiny_refiners()
    sdf = torch.ones(2, 1, 16, 16, 8)
    feats = torch.randn(2, 8, 16, 16, 8)
    with torch.no_grad():
        out = ref["refiner_512"](sdf, feats)
        prob = ref["refiner_1024"](sdf)
    assert out.shape == prob.shape == (2, 1, 16, 16, 8)
    assert torch.isfinite(out).all() and out.abs().max() < 1 and ((prob > 0) & (prob < 1)).all()
    with pytest.raises(D3S2Error, match="multiple of 2"):
        ref["refiner_1024"](torch.ones(1, 1, 16, 15, 16))
    with pytest.raises(D3S2Error, match=r"features must be \[B, 8, D, H, W\]"):
        ref["refiner_512"](sdf, feats[:, :4])
    with pytest.raises(D3S2Error, match="norm_groups 3 does not divide"):
        SDFRefiner(SDFRefinerConfig(block_out_channels=[4, 8], norm_groups=3, patch_size=16))
    with pytest.raises(D3S2Error, match="patch_size 10 is not a multiple of 4"):
        SignRefiner(SignRefinerConfig(block_out_channels=[4, 8, 8], norm_groups=2, patch_size=10))


@pytest.mark.parametrize("which", ["refiner_512", "refiner_1024"])
def test_lean_forward_equals_plain_path(which, monkeypatch):
    model = tiny_refiners()[which]
    monkeypatch.setattr(unet3d, "SLAB_ELEMENTS", 1000)  # many slabs, a partial last one
    g = torch.Generator().manual_seed(1)
    sdf = torch.ones(1, 1, 16, 16, 16)
    sdf[:, :, 5:11] = torch.rand(1, 1, 6, 16, 16, generator=g) * 2 - 1
    args = (sdf, torch.randn(1, 8, 16, 16, 16, generator=g)) if which == "refiner_512" else (sdf,)
    plain = model(*args).detach()  # autograd on: the reference GroupNorm / filter / MLP
    with torch.no_grad():
        lean = model(*args)
    assert torch.isfinite(plain).all()
    assert (lean - plain).abs().max() <= 1e-5 * plain.abs().max()


@pytest.mark.parametrize("shape,groups", [((1, 8, 5, 3, 7), 4), ((2, 40, 9, 4, 4), 4), ((1, 4, 1, 1, 1), 2),
                                          ((3, 6, 2, 5, 1), 3)])
def test_group_norm_silu_matches_plain(shape, groups):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3 + 5  # a large mean: the variance pass must be centred
    norm = FP32GroupNorm(groups, shape[1])
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(shape[1], generator=g))
        norm.bias.copy_(0.1 * torch.randn(shape[1], generator=g))
    for act in (True, False):
        want = group_norm_silu_reference(x, norm, act)
        for slab in (1, 2, None):
            got = group_norm_silu(x, norm, act, slab=slab)
            assert torch.allclose(got, want, atol=2e-6, rtol=1e-5), (act, slab)
        y = x.clone()
        assert group_norm_silu(y, norm, act, out=y, slab=2) is y and torch.allclose(y, want, atol=2e-6, rtol=1e-5)
    assert torch.allclose(want, F.group_norm(x, groups, norm.weight, norm.bias, norm.eps))  # act=False is plain GN
    assert group_norm_silu(torch.empty(0, 8, 2, 2, 2), norm).shape == (0, 8, 2, 2, 2)


def test_half_precision_lean_paths_stay_within_fp16_rounding():
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 40, 6, 5, 4, generator=g) * 2 + 3).half()
    norm = FP32GroupNorm(4, 40).half()  # parameters stay fp32, as the release's
    with torch.no_grad():
        want = group_norm_silu_reference(x, norm).float()
        got = group_norm_silu(x, norm, slab=2)
        parts = group_norm_silu_parts([x[:, :30].clone(), x[:, 30:].clone()], norm)
        assert got.dtype == torch.float16
        for y in (got.float(), torch.cat(parts, 1).float()):
            assert (y - want).abs().max() <= 2e-3 * want.abs().max()  # ~ one fp16 ulp
        w, v = torch.randn(2, 27, 6, 5, 4, generator=g).half(), torch.randn(2, 8, 6, 5, 4, generator=g).half()
        ref = adaptive_filter_reference(v, w).float()
        assert (adaptive_filter(v, w.clone()).float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_concatenation_free_norm_and_block_match_plain():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 5, 3, 4, 6, generator=g) + 2, torch.randn(2, 3, 3, 4, 6, generator=g) * 0.5
    norm = FP32GroupNorm(2, 8)  # groups of 4 channels: the second spans a's last channel and all of b
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(8, generator=g))
    want = group_norm_silu_reference(torch.cat([a, b], 1), norm)
    pa, pb = a.clone(), b.clone()
    got = group_norm_silu_parts([pa, pb], norm, slab=2)
    assert got[0] is pa and got[1] is pb  # in place
    assert torch.allclose(torch.cat(got, 1), want, atol=2e-6, rtol=1e-5)
    block = ResnetBlock3d(8, 4, 2, 1e-5)
    plain = block(torch.cat([a, b], 1)).detach()
    with torch.no_grad():
        lean = block.forward_cat(a.clone(), b.clone())
    assert torch.allclose(lean, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 5, 5, 5), (2, 8, 3, 7, 4), (1, 3, 1, 1, 1)])
def test_adaptive_filter_matches_naive_loop(shape):
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=g)
    w = torch.randn((shape[0], 27, *shape[2:]), generator=g)
    want = _naive(x, w)
    assert torch.allclose(adaptive_filter_reference(x, w), want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        got = adaptive_filter(x, w.clone())
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        adaptive_filter(x, w[:, :26])


def _naive(x, w):
    """Scalar-index statement of the filter: out[c, p] = sum_t w_t[p] / sum|w[p]| * x[c, p + offset_t], 3 passes."""
    wn = w / w.abs().sum(1, keepdim=True).clamp_min(1e-12)
    b, c, d, h, e = x.shape
    for _ in range(3):
        out = torch.zeros_like(x)
        for t in range(27):
            di, dj, dk = t // 9 - 1, t // 3 % 3 - 1, t % 3 - 1
            shifted = torch.zeros_like(x)
            for z in range(d):
                for y in range(h):
                    for q in range(e):
                        zz, yy, qq = z + di, y + dj, q + dk
                        if 0 <= zz < d and 0 <= yy < h and 0 <= qq < e:
                            shifted[:, :, z, y, q] = x[:, :, zz, yy, qq]
            out += shifted * wn[:, t:t + 1]
        x = out
    return x


@pytest.mark.parametrize("which,patch,bound_gib", [("refiner_512", 192, 1.5), ("refiner_1024", 256, 2.8)])
def test_full_size_patch_activation_peak(which, patch, bound_gib):
    """The lean forward's live activations at the release's patch size in fp16, measured on the meta device (the
    authors' sequence holds 3.8 / 8.25 GiB: fp32 copies around every GroupNorm and full concatenations)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from live_bytes import meta_patch_peak

    model = build_refiner(which, empty=True).to(torch.float16)
    x = torch.empty(1, 1, patch, patch, patch, device="meta", dtype=torch.float16)
    args = (x,) if which == "refiner_1024" else (x, torch.empty(1, 32, *x.shape[2:], device="meta", dtype=x.dtype))
    peak = meta_patch_peak(model, *args) / 2 ** 30
    assert 0.5 < peak <= bound_gib, peak


@pytest.mark.slow
@pytest.mark.parametrize("which", ["refiner_512", "refiner_1024"])
def test_the_authors_patch_when_their_snapshot_is_here(which):
    """The full-size release networks on a 16^3 patch against the authors' classes, through the parity harness's
    per-patch sequences (skipped without the snapshot)."""
    snap = next((p for p in (Path(__file__).resolve().parents[1] / ".snapshots" / "Direct3D-S2",
                             Path("/work/main/.snapshots/Direct3D-S2")) if (p / "direct3d_s2").is_dir()), None)
    if snap is None:
        pytest.skip("no snapshot of the authors' code (.snapshots/Direct3D-S2)")
    pytest.importorskip("skimage")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "parity"))
    from official import get_class, import_official, random_state_dict
    from refiner_rows import band_patch, theirs_sdf_patch, theirs_sign_patch

    import_official(snap)
    cls = "Voxel_RefinerXL_sign" if which == "refiner_1024" else "Voxel_RefinerXL"
    theirs = get_class(f"direct3d_s2.models.refiner.unet_refiner.{cls}")(**KEYS[COMPONENT[which]]["params"]).eval()
    sd = random_state_dict(theirs, 3)
    theirs.load_state_dict(sd)
    ours = load_refiner_checkpoint({"refiner": sd}, which)
    sdf, feats, band = band_patch(16, 32)
    assert 0 < band < 16 ** 3 and sdf.max() == 1 and feats[0][:, sdf[0, 0] == 1].abs().max() == 0
    with torch.no_grad():
        want = theirs_sign_patch(theirs, sdf) if which == "refiner_1024" else theirs_sdf_patch(theirs, sdf, feats)
        got = ours(sdf) if which == "refiner_1024" else ours(sdf, feats)
    assert want.std() > 0 and (got - want).abs().max() <= 1e-5 * want.abs().max()
