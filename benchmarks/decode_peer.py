"""Decoding a folder of mixed-size images, selfsup's cache fill beside torchvision's ImageFolder-style
Dataset + DataLoader doing the same resize (issue 25 §6), on the same files, one after the other.

Both decode every image of the folder once, turn it upright, resize its shorter side to ``--size``
and crop the centre square, using every core: selfsup through ``selfsup.data.load_data`` (its
process pool, into a fresh cache), torchvision through ``DataLoader(num_workers=cores)`` over
``Resize(size) + CenterCrop(size) + PILToTensor()``. Images/s, and per core.

    python benchmarks/decode_peer.py --folder /tmp/own_images/my_images --size 32
        # runs the torchvision side in the peer environment (benchmarks/peers/setup.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEER_PYTHON = os.environ.get("PEERS_VENV", "/work/peers-venv") + "/bin/python"


def selfsup_side(folder: str, size: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from selfsup.data import load_data
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        splits = load_data(folder, default_size=size, cache_dir=cache)
        seconds = time.perf_counter() - t0
    return {"side": "selfsup load_data (cache fill)", "images": len(splits.train), "seconds": seconds}


def torchvision_side(folder: str, size: int) -> dict:
    import torch
    from PIL import Image, ImageOps
    from torchvision import transforms

    files = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())
    transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])

    class Folder(torch.utils.data.Dataset):  # ImageFolder without classes: a flat, unlabelled folder
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            with Image.open(files[i]) as im:
                return transform(ImageOps.exif_transpose(im).convert("RGB"))

    loader = torch.utils.data.DataLoader(Folder(), batch_size=256, num_workers=os.cpu_count(), shuffle=False)
    t0 = time.perf_counter()
    n = sum(len(batch) for batch in loader)
    return {"side": f"torchvision Dataset + DataLoader({os.cpu_count()} workers)", "images": n,
            "seconds": time.perf_counter() - t0, "torch": torch.__version__}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--side", choices=["both", "selfsup", "torchvision"], default="both")
    a = p.parse_args()
    if a.side == "selfsup":
        print(json.dumps(selfsup_side(a.folder, a.size)))
        return 0
    if a.side == "torchvision":
        print(json.dumps(torchvision_side(a.folder, a.size)))
        return 0
    cores = os.cpu_count()
    results = []
    for side, python in (("selfsup", sys.executable), ("torchvision", PEER_PYTHON)):
        out = subprocess.run([python, __file__, "--folder", a.folder, "--size", str(a.size), "--side", side],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r["images_per_s"] = r["images"] / r["seconds"]
        r["images_per_s_per_core"] = r["images_per_s"] / cores
        results.append(r)
        print(f"{r['side']:<45} {r['images']} images in {r['seconds']:.1f} s: {r['images_per_s']:.0f} img/s, "
              f"{r['images_per_s_per_core']:.0f} per core", flush=True)
    print(f"ratio selfsup / torchvision: {results[0]['images_per_s'] / results[1]['images_per_s']:.2f}x "
          f"({cores} cores, shorter side -> {a.size} + centre crop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
