"""Make a tiny real img2dataset output (webdataset and parquet) from 8 COCO images served on loopback.

Made with img2dataset 1.47.0. Run with the Python of a venv where img2dataset is installed:
    /tmp/bench-img2dataset-venv/bin/python make_output.py <captioned-images folder> <output folder>
Two more URLs fail on purpose: one 404 and one that serves text instead of an image.
"""

import csv
import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

IMAGES = 8


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    serve = out / "_serve"
    serve.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in open(source / "captions.jsonl", encoding="utf-8")]
    # The smallest images whose license allows modified copies (CC BY 2.0, CC BY-SA 2.0; not ND).
    rows = sorted((r for r in records if r["license_id"] in (4, 5)), key=lambda r: r["bytes"])[:IMAGES]
    for row in rows:
        shutil.copy(source / row["file_name"], serve / Path(row["file_name"]).name)
    (serve / "not-an-image.jpg").write_text("this is not an image\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    listing = out / "_urls.csv"
    with open(listing, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption", "license"])
        for row in rows:
            writer.writerow([f"{base}/{Path(row['file_name']).name}", row["caption"], row["license_url"]])
        writer.writerow([f"{base}/missing.jpg", "a picture that is not there", None])
        writer.writerow([f"{base}/not-an-image.jpg", "a text file served as jpg", None])
    try:
        for fmt in ("webdataset", "parquet"):
            subprocess.run([
                str(Path(sys.executable).parent / "img2dataset"), "--url_list", str(listing), "--input_format", "csv",
                "--url_col", "url", "--caption_col", "caption", "--save_additional_columns", '["license"]',
                "--output_format", fmt, "--output_folder", str(out / fmt), "--processes_count", "1",
                "--thread_count", "4", "--number_sample_per_shard", "100", "--image_size", "96",
                "--resize_mode", "keep_ratio", "--encode_format", "jpg", "--encode_quality", "80",
                "--enable_wandb", "False", "--retries", "0",
            ], check=True)
    finally:
        server.shutdown()
    shutil.rmtree(serve)
    listing.unlink()


if __name__ == "__main__":
    main()
