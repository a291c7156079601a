"""What a large file costs the server's memory: an N MB file uploaded (``POST /v1/files``, multipart, streamed from disk
by the official client) and downloaded (``GET /v1/files/{id}/content``, read a block at a time), against a fresh
`python -m tunesmith serve` on the embedded model. For each, the server process's peak resident memory growth
(VmHWM from /proc/<pid>/status, before and after) beside the file's size: holding the file whole, as a server that
reads an upload or a download into memory does, costs at least the file's size (ratio 1.0).

The upload is an evals file (purpose ``evals``: its lines checked a line at a time), and optionally a fine-tuning file
(``--fine-tune``: the data stage's checks, which read the file whole).

    python benchmarks/file_memory.py --mb 300
    python benchmarks/file_memory.py --mb 100 --fine-tune --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_neighbour import KEYS, start  # noqa: E402

KEY = KEYS["quiet"]


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), in MB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(status[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


def evals_file(path: Path, mb: int) -> Path:
    """About ``mb`` MB of evals lines, written without holding them."""
    line = json.dumps({"item": {"question": "x" * 900, "answer": "y"}}).encode() + b"\n"
    with path.open("wb") as out:
        for _ in range(mb * 1024 * 1024 // len(line)):
            out.write(line)
    return path


def chat_file(path: Path, mb: int) -> Path:
    line = json.dumps({"messages": [{"role": "user", "content": "card arrival " * 60},
                                    {"role": "assistant", "content": "card_arrival"}]}).encode() + b"\n"
    with path.open("wb") as out:
        for _ in range(mb * 1024 * 1024 // len(line)):
            out.write(line)
    return path


def measured(pid: int, work) -> dict:
    """``work()``'s seconds and the server's peak memory growth while it ran (its VmHWM before is its peak so far:
    the growth is what this work added on top of everything before)."""
    before = memory_mb(pid)
    t0 = time.perf_counter()
    result = work()
    after = memory_mb(pid)
    return {"seconds": round(time.perf_counter() - t0, 2), "rss_before_mb": round(before["VmRSS"], 1),
            "peak_before_mb": round(before["VmHWM"], 1), "peak_after_mb": round(after["VmHWM"], 1),
            "peak_growth_mb": round(after["VmHWM"] - before["VmHWM"], 1), "result": result}


def upload(client: openai.OpenAI, path: Path, purpose: str) -> str:
    with path.open("rb") as f:
        return client.files.create(file=(path.name, f), purpose=purpose).id


def download(client: openai.OpenAI, file_id: str) -> int:
    size = 0
    with client.files.with_streaming_response.content(file_id) as response:
        for block in response.iter_bytes(1 << 20):
            size += len(block)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300, help="the file's size in MB")
    parser.add_argument("--fine-tune", action="store_true", help="also upload a fine-tuning file of that size")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, url = start("builtin", tmp, [])
        try:
            client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=1800)
            path = evals_file(tmp / "rows.jsonl", args.mb)
            size = path.stat().st_size
            runs = {"upload_evals": measured(proc.pid, lambda: upload(client, path, "evals"))}
            file_id = runs["upload_evals"]["result"]
            runs["download"] = measured(proc.pid, lambda: download(client, file_id))
            assert runs["download"]["result"] == size
            if args.fine_tune:
                chat = chat_file(tmp / "train.jsonl", args.mb)
                runs["upload_fine_tune"] = measured(proc.pid, lambda: upload(client, chat, "fine-tune"))
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)
    file_mb = size / 1024 / 1024
    for name, run in runs.items():
        run["growth_per_file_mb"] = round(run["peak_growth_mb"] / file_mb, 3)
        print(f"{name}: a {file_mb:.0f} MB file in {run['seconds']} s; the server's peak memory grew "
              f"{run['peak_growth_mb']} MB ({run['growth_per_file_mb']} of the file's size; holding it whole: >= 1.0)")
    if args.out:
        args.out.write_text(json.dumps({"file_mb": round(file_mb, 1), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
