"""``d3s2 generate``: images -> meshes with :class:`~d3s2.pipelines.image_to_3d.ImageTo3DPipeline`.

Each image is written to ``OUT_DIR/<image stem>.<format>`` atomically (with ``--preview`` also
``OUT_DIR/<image stem>.preview.png``: the input beside a render of the mesh). A bad image (missing, not an image,
corrupt, empty mask, no shape found) prints one line on stderr and the others still run; the exit status is 1 when any
image failed. Before any model work the outputs are planned and checked (:mod:`d3s2.pipelines.outputs`: two inputs
that would write the same file, an unwritable ``-o``) and the sampler settings validated
(:mod:`d3s2.pipelines.validation`). A bad ``--weights`` folder stops everything (exit 2, from the CLI's D3S2Error handler). Without
``--weights`` the bundled demo model is used (:mod:`d3s2.pipelines.bundled`), with a note on stderr; ``--examples``
adds the bundled example images to the inputs. A hub id as ``--weights`` is downloaded by :mod:`d3s2.pipelines.hub`
(only the files ``--resolution`` needs); ``--matting`` picks the background removal (:mod:`d3s2.pipelines.matting`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from d3s2.errors import D3S2Error
from d3s2.geometry.report import MeshReport

__all__ = ["add_parser", "run_generate", "format_stats"]


class _GuidanceFlag(argparse.Action):
    """Stores the guidance scale and which of ``--guidance-scale`` / ``--cfg`` gave it (named in error messages)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.guidance_flag = option_string


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="image(s) to 3D mesh(es)",
                       description="Generate a mesh per image with the Direct3D-S2 pipeline (structure, 512 and "
                                   "optionally 1024 stage).")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="input images (RGBA with transparent background best)")
    p.add_argument("-o", "--output", default=".", metavar="OUT_DIR",
                   help="folder for the meshes (default: the current folder)")
    p.add_argument("--weights", metavar="PATH_OR_HUB_ID",
                   help="pipeline folder (save_pretrained output, or the authors' release folder with config.yaml), "
                        "or a Hugging Face hub id: wushuang98/Direct3D-S2 (the authors' weights, downloaded once "
                        "into the hub cache; .../direct3d-s2-v-1-0 for v1.0) or a repo holding pipeline.yaml; "
                        "default: the bundled demo model")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of --weights (default: main)")
    p.add_argument("--matting", choices=("birefnet", "border", "none"), default=None,
                   help="background removal for images without alpha: birefnet (the release's model, extra "
                        "'matting'), border (border-colour segmentation, plain backgrounds), none (the whole image "
                        "is the object); default: birefnet when installed, else border with a warning")
    p.add_argument("--examples", action="store_true", help="also run the bundled example images (renders of meshes "
                                                           "the demo model never saw)")
    p.add_argument("--preview", action="store_true", help="also write OUT_DIR/<stem>.preview.png: the input image "
                                                          "beside a shaded render of the mesh")
    p.add_argument("--resolution", type=int, choices=(512, 1024), default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faces", type=int, default=None, help="decimate to about this many faces")
    p.add_argument("--format", choices=("glb", "obj", "ply", "stl"), default="glb")
    p.add_argument("--steps-dense", type=int, default=None, help="structure-stage steps (release: 50)")
    p.add_argument("--steps-512", type=int, default=None, help="512-stage steps (release: 30)")
    p.add_argument("--steps-1024", type=int, default=None, help="1024-stage steps (release: 15)")
    p.add_argument("--guidance-scale", type=float, default=None, dest="guidance_scale", action=_GuidanceFlag,
                   help="classifier-free guidance scale for every stage (release: 7.0)")
    p.add_argument("--cfg", type=float, dest="guidance_scale", action=_GuidanceFlag,
                   help=argparse.SUPPRESS)  # the flag's former name, still accepted
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--low-vram", action="store_true", help="keep each model on the GPU only for its stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-refine", action="store_true", help="skip the release's refiners (mesh the SS-VAE output)")
    p.set_defaults(func=run_generate)


def format_stats(stats: list[dict]) -> str:
    parts = []
    for s in stats:
        item = f"{s['stage']} {s['seconds']:.2f}s"
        if s.get("peak_gpu_bytes") is not None:
            item += f" ({s['peak_gpu_bytes'] / 2**30:.2f} GiB peak)"
        parts.append(item)
    return ", ".join(parts)


def _print_warnings(caught) -> None:
    for w in caught or ():
        print(f"d3s2 generate: warning: {w.message}", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from d3s2.geometry.export import save_mesh
    from d3s2.pipelines.bundled import BUNDLED_NOTE, example_images, resolve_weights
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

    images = list(args.images)
    if args.examples:
        found = example_images()
        if not found:
            raise D3S2Error("--examples: this install has no bundled example images (d3s2/assets/examples/); "
                            "give image paths instead")
        images += [os.fspath(p) for p in found]
    if not images:
        raise D3S2Error("no input images: give IMAGE paths or --examples")
    from d3s2.pipelines.validation import check_generate_args

    check_generate_args(args)
    from d3s2.pipelines.outputs import plan_outputs

    plans = plan_outputs(images, args.output, args.format, args.preview)  # before any model work
    weights, bundled = resolve_weights(args.weights)
    if bundled:
        print(f"d3s2 generate: no --weights given, {BUNDLED_NOTE}", file=sys.stderr)
    pipe = ImageTo3DPipeline.from_pretrained(weights, device=args.device, low_vram=args.low_vram or None,
                                             revision=args.revision, resolution=args.resolution,
                                             matting=args.matting)
    if args.resolution == 1024 and pipe.resolution_1024 is None:  # once, not as the same error for every image
        raise D3S2Error("--resolution 1024: these weights have no 1024 stage (ss_vae_1024 / ss_dit_1024); "
                        "use --resolution 512")
    if args.no_refine:
        import dataclasses

        pipe.settings = dataclasses.replace(pipe.settings, refine=False)
    steps = {"dense": args.steps_dense, "512": args.steps_512, "1024": args.steps_1024}
    failed = 0
    for plan in plans:
        image, target, preview = plan.image, plan.mesh, plan.preview
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = pipe(image, generator=torch.Generator().manual_seed(args.seed), resolution=args.resolution,
                              num_inference_steps=steps, guidance_scale=args.guidance_scale, faces=args.faces,
                              progress=not args.no_progress)
            save_mesh(out.meshes[0], target, args.format)
            if args.preview:
                from d3s2.pipelines.preview import write_preview

                write_preview(preview, image, out.meshes[0], device=str(pipe.device))
        except D3S2Error as exc:
            failed += 1
            _print_warnings(caught)
            print(f"d3s2 generate: error: {image}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # noqa: BLE001 - an unexpected failure of one image must not stop the batch
            failed += 1
            _print_warnings(caught)
            msg = " ".join(str(exc).split())[:300]
            print(f"d3s2 generate: error: {image}: unexpected {type(exc).__name__}: {msg}", file=sys.stderr)
            continue
        _print_warnings(caught)
        m = out.meshes[0]
        extra = f" + {os.fspath(preview)}" if args.preview else ""
        report = m.metadata.get("d3s2_report")
        shape = f"; {MeshReport(**report).summary()}" if report else ""
        print(f"{image} -> {os.fspath(target)}{extra} ({len(m.vertices)} vertices, {len(m.faces)} faces{shape}): "
              f"{format_stats(out.stats)}")
    if failed:
        print(f"d3s2 generate: {failed} of {len(images)} image(s) failed", file=sys.stderr)
        return 1
    return 0
