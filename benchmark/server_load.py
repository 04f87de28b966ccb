"""Load on ``sglang serve`` over loopback: N clients creating, polling, downloading and deleting.

    python benchmark/server_load.py                          # 16 clients x 3 videos, queue bound 4
    python benchmark/server_load.py --clients 4 --videos 1   # a quick run

Starts its own server on the built-in model (loopback, a free port, a temporary ``--data-dir``)
with a small queue bound, so that the bound is hit: a create answered 429 waits its
``Retry-After`` and tries again. Every client drives the real ``openai`` client (retries off, so
every 429 is counted here): create, poll until finished, download the mp4, delete, and check the
id then answers 404. Nothing may be lost: every created video completes, downloads as an mp4 and
is gone after delete, from the listing and from the data folder. The server's resident memory is read from ``/proc`` after a warm-up video
and again after the load, with the process's job count, and written to
``benchmark/results/server-load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUEST = dict(prompt="a red circle moving left on a blue background", size="48x32", seconds="1")
EXTRA = {"num_inference_steps": 4}


@dataclass
class LoadResult:
    """What the clients saw, summed."""

    created: int = 0
    completed: int = 0
    downloaded: int = 0
    deleted: int = 0
    rejected_429: int = 0
    lost: list[str] = field(default_factory=list)  # one line per video that did not go all the way
    seconds: float = 0.0
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    videos_listed_after: int = -1
    mp4_files_after: int = -1  # mp4 files left in the data folder after every video was deleted


def resident_mib(pid: int) -> float:
    """The process's resident set size (``VmRSS``), from ``/proc``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """``sglang serve`` on the built-in model, loopback, a free port, the given extra flags."""

    def __init__(self, data_dir: str, flags: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "python"),
                                                                        os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "sglang.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--device", "cpu", "--data-dir", data_dir, *flags]
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.url = self._wait_for_url()
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_for_url(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            lines.append(line)
            match = re.search(r"at (http://[^ ]+)/v1", line)
            if match:
                return match.group(1)
        self.stop()
        raise RuntimeError("sglang serve did not start:\n" + "".join(lines))

    def _drain(self) -> None:
        for _ in self.proc.stdout:
            pass

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def client_loop(base_url: str, videos: int, result: LoadResult, lock: threading.Lock) -> None:
    """One client: ``videos`` times create (waiting out 429s), poll, download, delete, check 404."""
    import openai

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the client marks its videos API deprecated
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-load", max_retries=0, timeout=60.0)
    for _ in range(videos):
        while True:
            try:
                video = client.videos.create(**REQUEST, extra_body=EXTRA)
                break
            except openai.RateLimitError as exc:
                with lock:
                    result.rejected_429 += 1
                time.sleep(float(exc.response.headers.get("retry-after", "1")))
        with lock:
            result.created += 1
        finished = client.videos.poll(video.id, poll_interval_ms=50)
        if finished.status != "completed":
            with lock:
                result.lost.append(f"{video.id}: {finished.status} {finished.error}")
            continue
        content = client.videos.download_content(video.id).read()
        ok = content[4:8] == b"ftyp"
        client.videos.delete(video.id)
        try:
            client.videos.retrieve(video.id)
            gone = False
        except openai.NotFoundError:
            gone = True
        with lock:
            result.completed += 1
            result.downloaded += ok
            result.deleted += gone
            if not (ok and gone):
                result.lost.append(f"{video.id}: mp4 {'ok' if ok else 'bad'}, {'gone' if gone else 'still there'}")


def run_load(clients: int, videos: int, queue_bound: int, data_dir: str | None = None) -> LoadResult:
    """Start a server with ``queue_bound``, warm it up, run the clients, and measure."""
    import openai

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with tempfile.TemporaryDirectory() as scratch:
        server = Server(data_dir or scratch, ["--max-queued-videos", str(queue_bound)])
        try:
            warm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-load", max_retries=0, timeout=60.0)
            first = warm.videos.create(**REQUEST, extra_body=EXTRA)
            warm.videos.poll(first.id, poll_interval_ms=50)
            warm.videos.delete(first.id)
            result = LoadResult(rss_before_mib=resident_mib(server.proc.pid))
            lock = threading.Lock()
            start = time.perf_counter()
            threads = [threading.Thread(target=client_loop, args=(server.url, videos, result, lock))
                       for _ in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            result.seconds = time.perf_counter() - start
            result.rss_after_mib = resident_mib(server.proc.pid)
            result.videos_listed_after = len(warm.videos.list(limit=100).data)
            result.mp4_files_after = len(list(Path(data_dir or scratch).rglob("*.mp4")))
        finally:
            server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--videos", type=int, default=3, help="videos per client")
    parser.add_argument("--queue-bound", type=int, default=4, help="the server's --max-queued-videos")
    parser.add_argument("--output", default=str(REPO / "benchmark/results/server-load.json"))
    args = parser.parse_args(argv)
    result = run_load(args.clients, args.videos, args.queue_bound)
    summary = asdict(result)
    print(json.dumps(summary, indent=1))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmark/server_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.output).write_text(json.dumps({**summary, "clients": args.clients, "videos_per_client": args.videos,
                                             "queue_bound": args.queue_bound, "command": command.strip(),
                                             "load_average": os.getloadavg()}, indent=1) + "\n")
    expected = args.clients * args.videos
    intact = not result.lost and result.completed == expected == result.deleted
    return 0 if intact and result.videos_listed_after == 0 == result.mp4_files_after else 1


if __name__ == "__main__":
    sys.exit(main())
