"""Decoding cost of the worst uploads within the limits: time and peak extra memory, before and after.

    python bench/decode.py [--size 224] [--baseline-ref 7f06220] [--quick]

Each case is an image an attacker (or an unlucky camera) can send under the default limits
(10 MB upload; 40 Mpx for a JPEG, 12 Mpx for any format decoded at full size): a 16-bit
greyscale PNG (the issue's case 5 was one of 6300x6300, ~90 kB), 8-bit RGB, RGBA and palette
PNGs, a 40 Mpx JPEG, a 32-bit float TIFF, and a 40 Mpx PNG that is now refused.
Every (case, implementation) pair runs in a fresh Python process: peak extra memory is that
process's peak RSS during ``load_image`` minus its RSS just before (Pillow allocates outside
Python, so tracemalloc would not see it); time is the best of ``--repeats`` calls.
"before" is ``recommender/images.py`` as of ``--baseline-ref`` (read with ``git show``),
"after" the working tree's. Targets: <= 0.3 s and <= 200 MB for every case.
Writes bench/results/decode.json (or decode-quick.json).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, machine, save_results  # noqa: E402

#: The commit whose images.py is the "before" column (the tree before issue 12's bounded decoding).
BASELINE_REF = "7f06220"
TARGET_SECONDS = 0.3
TARGET_MB = 200

#: name -> (description, width, height, refused by "after"). A JPEG may have up to the 40 Mpx cap
#: (it decodes at a reduced scale); every other format is decoded at full size and may have 30%
#: of it, 12 Mpx (images.full_decode_limit): those cases sit just under that, and one 40 Mpx PNG
#: shows the refusal's cost. "before" (no such limit) decodes all of them.
CASES = {
    "grey16_png": ("16-bit greyscale PNG 3460x3460", 3460, 3460, False),
    "rgb_png": ("8-bit RGB PNG 4000x2995 (12.0 Mpx)", 4000, 2995, False),
    "rgba_png": ("8-bit RGBA PNG 4000x2995, half transparent", 4000, 2995, False),
    "palette_png": ("palette PNG 4000x2995 with a transparent index", 4000, 2995, False),
    "jpeg": ("JPEG 7300x5470 (39.9 Mpx, quality 90)", 7300, 5470, False),
    "float_tiff": ("32-bit float greyscale TIFF 3460x3460 (deflate)", 3460, 3460, False),
    "rgb_png_40": ("8-bit RGB PNG 7300x5470 (39.9 Mpx): refused", 7300, 5470, True),
}


def make_image(name: str, width: int, height: int) -> bytes:
    """Encodes one worst case: smooth gradients with some structure, so files stay small (< 10 MB)."""
    import numpy as np
    from PIL import Image

    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    ramp = x * 0.7 + y * 0.3  # (height, width) in 0..1
    buffer = io.BytesIO()
    if name == "grey16_png":
        Image.fromarray((ramp * 50000 + 5000).astype(np.uint16)).save(buffer, format="PNG")
    elif name == "float_tiff":
        Image.fromarray(np.round(ramp * 20) * 50).save(  # bands: deflate keeps it small
            buffer, format="TIFF", compression="tiff_adobe_deflate"
        )
    else:
        grey = (ramp * 255).astype(np.uint8)
        rgb = np.stack([grey, grey[::-1], np.full_like(grey, 128)], axis=-1)
        if name.startswith("rgb_png"):
            Image.fromarray(rgb).save(buffer, format="PNG")
        elif name == "jpeg":
            Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
        elif name == "rgba_png":
            alpha = np.where(x > 0.5, 255, 0).astype(np.uint8) * np.ones_like(grey)
            Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=-1)).save(buffer, format="PNG")
        elif name == "palette_png":
            image = Image.fromarray(rgb).quantize(64)
            image.save(buffer, format="PNG", transparency=0)
        else:
            raise ValueError(name)
    return buffer.getvalue()


#: Runs in the child process: argv = module file, image file, size, repeats; prints one JSON line.
CHILD = r"""
import gc, importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("images_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module  # dataclasses look their module up there
spec.loader.exec_module(module)
data = open(sys.argv[2], "rb").read()
size, repeats = int(sys.argv[3]), int(sys.argv[4])
def status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
gc.collect()
before = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # resets VmHWM (the peak RSS) to the current RSS
times = []
for _ in range(repeats):
    started = time.perf_counter()
    array = module.load_image(data, size)
    times.append(time.perf_counter() - started)
peak = status_kb("VmHWM")
print(json.dumps({
    "seconds": min(times),
    "extra_mb": (peak - before) / 1024,
    "digest": __import__("hashlib").sha256(array.tobytes()).hexdigest(),
    "shape": list(array.shape),
}))
"""


def measure(module_file: Path, image_file: Path, size: int, repeats: int) -> dict:
    """One (implementation, image) measurement in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(module_file), str(image_file), str(size), str(repeats)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    if result.returncode != 0:
        return {
            "error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        }
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="backbone input size (default: %(default)s)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the 'before' images.py")
    parser.add_argument("--repeats", type=int, default=3, help="calls per measurement; the best time counts")
    parser.add_argument("--quick", action="store_true", help="images at 1/16 of the pixels, one call each")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as temporary:
        workdir = Path(temporary)
        after_file = ROOT / "recommender" / "images.py"
        before_file = workdir / "images_before.py"
        shown = subprocess.run(
            ["git", "show", f"{args.baseline_ref}:recommender/images.py"], capture_output=True, text=True, cwd=ROOT
        )
        implementations = {"after": after_file}
        if shown.returncode == 0:
            before_file.write_text(shown.stdout)
            implementations = {"before": before_file, "after": after_file}
        else:
            print(f"no baseline: git show {args.baseline_ref} failed ({shown.stderr.strip()})")

        print(f"machine: {machine()}")
        print(
            f"load_image(bytes, {args.size}): best of {repeats}, peak extra RSS; targets <= {TARGET_SECONDS} s, <= {TARGET_MB} MB"
        )
        header = f"{'case':<50} {'file':>8}"
        for label in implementations:
            header += f" | {label + ' s':>8} {label + ' MB':>9}"
        print(header + " | same pixels")
        rows = []
        for name, (description, width, height, refused) in CASES.items():
            if args.quick:
                width, height = width // 4, height // 4
                description += " (quick: 1/16 of the pixels)"
            data = make_image(name, width, height)
            image_file = workdir / f"{name}.bin"
            image_file.write_bytes(data)
            row = {"case": name, "description": description, "width": width, "height": height, "bytes": len(data)}
            row["refused"] = refused
            for label, module_file in implementations.items():
                row[label] = measure(module_file, image_file, args.size, repeats)
            digests = {row[label].get("digest") for label in implementations}
            row["same_pixels"] = None if refused else len(digests) == 1 and None not in digests
            rows.append(row)
            line = f"{description:<50} {len(data) / 1e6:>6.2f}MB"
            for label in implementations:
                figure = row[label]
                if "error" in figure:
                    line += f" | {'error: ' + figure['error']:>18}"
                else:
                    line += f" | {figure['seconds']:>8.3f} {figure['extra_mb']:>9.0f}"
            same = "-" if refused else "yes" if row["same_pixels"] else "no"
            print(line + f" | {same}", flush=True)
        decoded = [row["after"] for row in rows if not row["refused"]]
        met = all("error" not in f and f["seconds"] <= TARGET_SECONDS and f["extra_mb"] <= TARGET_MB for f in decoded)
        met = met and all("too large" in row["after"].get("error", "") for row in rows if row["refused"])
        print(f"targets met by 'after' on every case: {'yes' if met else 'no'}")
    path = save_results(
        "decode" + ("-quick" if args.quick else ""),
        {"size": args.size, "baseline_ref": args.baseline_ref, "repeats": repeats, "rows": rows, "targets_met": met},
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
