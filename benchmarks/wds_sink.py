"""The WebDataset sink's cost per sample: today's sink against the sink of an earlier commit, same rows, one run.

    .venv/bin/python benchmarks/wds_sink.py [--rows 4000] [--repeat 5] [--before 3b8cb94]

Writes the same pair rows (a 60 KB JPEG each, full image_meta, two captions, scores, a JSON meta) to a tar
with each sink, alternating, and reports the median seconds and samples per second of each, and their ratio.
The earlier sink is read from git (`git show REV:curate/sinks/webdataset.py`) and imported beside today's.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from curate import schema  # noqa: E402
from curate.sinks.webdataset import WebDatasetSink  # noqa: E402


def rows(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(out, "JPEG", quality=90)
    jpeg = out.getvalue()
    made = []
    for i in range(count):
        made.append({
            "key": f"{i:016x}", "kind": "pair", "images": [{"bytes": jpeg, "path": None}],
            "image_meta": [{"url": f"http://images.example/{i}.jpg", "width": 320, "height": 256,
                            "original_width": 640, "original_height": 512, "sha256": "ab" * 32, "format": "jpg",
                            "original_format": "JPEG", "num_bytes": len(jpeg), "original_num_bytes": 2 * len(jpeg),
                            "pixel_sha256": "cd" * 32, "phash": -1234567890123 + i}],
            "segments": [{"text": None, "image": 0}, {"text": f"caption {i}", "image": None}],
            "captions": [{"name": "alt", "text": f"caption {i}"}, {"name": "dense", "text": f"a long caption {i}"}],
            "scores": {"clip_score": 0.31, "aesthetic": 5.2, "nsfw": None},
            "roles": ["generation"], "source": {"dataset": "bench", "id": str(i), "url": None, "license": "cc-by"},
            "meta": json.dumps({"row": i, "dedup": {"exact": {"group": f"{i:016x}"}}}),
        })
    return made


def earlier_sink(revision: str, folder: Path):
    code = subprocess.run(["git", "show", f"{revision}:curate/sinks/webdataset.py"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout
    path = folder / "webdataset_before.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("webdataset_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the Params annotations through the module
    spec.loader.exec_module(module)
    return module.WebDatasetSink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--before", default="3b8cb94")
    args = parser.parse_args()
    table = schema.from_rows(rows(args.rows))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        sinks = {"before": earlier_sink(args.before, folder), "now": WebDatasetSink}
        seconds: dict[str, list[float]] = {name: [] for name in sinks}
        for _ in range(args.repeat):
            for name, cls in sinks.items():
                sink = cls(cls.Params())
                started = time.perf_counter()
                assert sink.write([table], str(folder / f"{name}.tar")) == args.rows
                seconds[name].append(time.perf_counter() - started)
        sizes = {name: (folder / f"{name}.tar").stat().st_size for name in sinks}
    result = {name: {"median_s": round(statistics.median(values), 4),
                     "samples_per_s": round(args.rows / statistics.median(values)),
                     "tar_bytes": sizes[name]} for name, values in seconds.items()}
    result["now_over_before_time"] = round(result["now"]["median_s"] / result["before"]["median_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
