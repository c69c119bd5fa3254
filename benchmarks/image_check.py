"""How long checking a corpus's images takes: ``find_problems`` with ``image_problem``, in this process and as Ray
Data tasks on a local cluster, so the time for LLaVA-Pretrain's 558K caption images can be estimated per CPU.

    OMP_NUM_THREADS=1 python benchmarks/image_check.py --images 2000 --cpus 2 --out benchmarks/results/image_check.md

The images are JPEGs of LLaVA-Pretrain's size (its images are resized to at most 336 px on the short side) with
photo-like content (smooth gradients plus noise), written once into a temporary folder. A check is what a run does
per image: confine the path to its folder, read the header, decode every pixel. Also timed: a wrong folder, where
every image is missing (no decode), which is how fast such a run reaches its ``data.max_skip_ratio`` stop.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRETRAIN_PAIRS = 558_128  # blip_laion_cc_sbu_558k.json


def write_images(folder: Path, count: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:336, 0:448]
    names = []
    for k in range(count):
        base = (x * (k % 7 + 1) + y * (k % 5 + 1)) % 256
        pixels = np.stack([base, (base + 85 * (k % 3)) % 256, 255 - base], axis=-1).astype(np.int16)
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        name = f"{k // 1000:05d}/{k:09d}.jpg"
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / name, quality=90)
        names.append(name)
    return names


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    args = parser.parse_args()

    import ray

    from mmdc.data.blocks import find_problems
    from mmdc.data.images import image_problem

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        names = write_images(folder, args.images)
        size = sum((folder / n).stat().st_size for n in names) / len(names)
        check = partial(image_problem, image_root=str(folder), max_pixels=40_000_000)
        serial_s, bad = timed(lambda: find_problems(names, check, parallel=False))
        assert bad == {}
        wrong = partial(image_problem, image_root=str(Path(tmp) / "wrong"), max_pixels=40_000_000)
        missing_s, missing = timed(lambda: find_problems(names, wrong, parallel=False))
        assert len(missing) == len(names)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            find_problems(names[:20], check, parallel=True, values_per_task=5)  # start the workers first
            parallel_s, bad = timed(lambda: find_problems(names, check, parallel=True))
            assert bad == {}
        finally:
            ray.shutdown()

    per_image_ms = serial_s / len(names) * 1000
    lines = [
        f"# Checking images: {args.images} JPEGs of {size / 1024:.0f} KiB (448 x 336)",
        "",
        f"`{' '.join(sys.argv)}` on {platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end: other work shared the CPUs).",
        "",
        "| how | wall s | images/s | ms per image per CPU |",
        "|---|---|---|---|",
        f"| this process (`parallel=False`) | {serial_s:.2f} | {len(names) / serial_s:.0f} | {per_image_ms:.2f} |",
        f"| Ray Data tasks, {args.cpus} CPUs (`parallel=True`) | {parallel_s:.2f} | {len(names) / parallel_s:.0f} "
        f"| {parallel_s * args.cpus / len(names) * 1000:.2f} |",
        f"| a wrong folder: every image missing, this process | {missing_s:.2f} | {len(names) / missing_s:.0f} | "
        f"{missing_s / len(names) * 1000:.3f} |",
        "",
        f"At {per_image_ms:.2f} ms per image per CPU, LLaVA-Pretrain's {PRETRAIN_PAIRS:,} caption images take "
        f"{PRETRAIN_PAIRS * per_image_ms / 1000 / 60:.0f} CPU-minutes: about "
        f"{PRETRAIN_PAIRS * per_image_ms / 1000 / 60 / 16:.1f} minutes on 16 free CPUs, "
        f"{PRETRAIN_PAIRS * per_image_ms / 1000 / 60 / 64:.1f} on 64, if the tasks scale with the CPUs (they spread "
        "over every node with free CPUs; reading from shared storage can be slower than this local disk). A wrong "
        f"folder is found in {PRETRAIN_PAIRS * missing_s / len(names):.0f} s of one CPU.",
        "",
        "Not shown by a run on a few busy CPUs: the scaling itself. The estimate for a cluster rests on the "
        "per-image CPU time above and on the tasks being independent. Below one task's worth of images (512) the "
        "check runs in the calling process, so small runs never pay for a Ray Data job.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
