"""
The small things the other files need, each in one place: logging, reading and writing files so that a
crash never leaves half of one, downloads that resume, and where downloads are cached. Torch-free and
project-free (it imports nothing of ours), so any file can import it without a circle. (judge.py and
mauve.py import none of it: each stands alone, to be copied on its own.)
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from urllib.parse import urlparse

import requests


def log(msg):
    """Progress lines go to stderr, so stdout stays clean for results."""
    print(msg, file=sys.stderr, flush=True)


def cache_dir():
    """Where downloads are kept: $NANOCPO_CACHE, default ~/.cache/nanocpo."""
    return os.environ.get("NANOCPO_CACHE") or os.path.expanduser("~/.cache/nanocpo")


def hub_endpoint():
    """The model hub: $HF_ENDPOINT, default https://huggingface.co. Only its host is ever sent $HF_TOKEN."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def inside(folder, name):
    """folder/name, refused (ValueError, before anything is written) unless it resolves inside folder: names
    read from a remote or a file may be absolute, hold '..', or go through a symlink that points out."""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(f"{name!r}: refused, it would be written outside {folder}")
    return path


def number(kind, low, strict=False, high=None):
    """An argparse type: a finite `kind` >= low (> low if strict), <= high if given.
    argparse names the flag."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if not math.isfinite(value) or value < low or (strict and value == low):  # nan, inf: refused too
            bound = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"must be a finite number {bound} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value
    return parse


def refuse_same_paths(**paths):
    """ValueError if two of the named files are one (compared resolved: symlinks, '..', relative paths):
    `judge --out gens.jsonl --generations gens.jsonl` would overwrite its own input."""
    seen = {}
    for flag, path in paths.items():
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{seen[real]} and {flag} are the same file ({path}); give them different paths")
        seen[real] = flag


# ----------------------------------------------------------------------------- token ids
def cut_at_eos(ids, eos_id):
    """Ids up to and including the first EOS; all of them if there is none."""
    ids = list(ids)
    return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids


# ----------------------------------------------------------------------------- files
def read_jsonl(path, skip_torn_last_line=False, check=None):
    """The JSON values of a JSON-lines file (blank lines skipped). A bad line is a ValueError naming
    path:line. skip_torn_last_line: a last line without its newline (a crash while appending) is dropped.
    check(value, "path:line"), if given, sees every value and may raise a ValueError naming its line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    torn = lines.pop() if lines else b""  # the text after the final newline: empty unless torn
    rows = []
    for lineno, raw in enumerate(lines + ([] if skip_torn_last_line else [torn]), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
        if check is not None:
            check(rows[-1], where)
    return rows


def text_field(field):
    """read_jsonl's check that every row has `field` as a string."""
    def check(row, where):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ValueError(f"{where}: expected an object whose {field!r} is a string")
    return check


def end_torn_line(f, path):
    """Before appending to path through f: if a crash left it without a final newline, drop that torn line."""
    with open(path, "rb") as g:
        text = g.read()
    if text and not text.endswith(b"\n"):
        f.flush()
        with open(path, "r+b") as g:
            g.truncate(text.rfind(b"\n") + 1)
        f.seek(0, os.SEEK_END)


def write_atomic(path, text):
    """Write to a temp file beside path, then rename: a crash never leaves a half-written result."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path, rows):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_folder_atomic(dest, fill):
    """fill(tmp) writes a folder's files into a fresh temp folder beside dest, which is then renamed to dest.
    An existing dest is replaced whole, with two renames: at every moment one complete copy is on disk."""
    dest = os.path.abspath(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp", dir=os.path.dirname(dest))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; what we save is not
        fill(tmp)
        if os.path.exists(dest):
            os.rename(dest, tmp + ".old")
            os.rename(tmp, dest)
            shutil.rmtree(tmp + ".old")
        else:
            os.rename(tmp, dest)
    except BaseException:
        if os.path.exists(tmp + ".old") and not os.path.exists(dest):
            os.rename(tmp + ".old", dest)  # failed between the two renames: put the old copy back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# ----------------------------------------------------------------------------- downloads
def download(url, dest_path, retries=5):
    """Stream url into dest_path + ".part", then rename it to dest_path once complete. After an interruption
    the next request asks only for the missing bytes (HTTP Range); a server that ignores Range is read from
    the start. A progress line (bytes, MB/s) goes to stderr. FileNotFoundError naming the URL on 404; a 5xx is
    retried; an HTML page is refused (ValueError); a body shorter than its Content-Length is never renamed
    into place (the rest is asked for again)."""
    part = dest_path + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest_path)), exist_ok=True)
    token = os.environ.get("HF_TOKEN") if urlparse(url).netloc == urlparse(hub_endpoint()).netloc else None
    for attempt in range(retries + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be file offsets, not gzip offsets
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=60) as r:
                if r.status_code == 404:
                    raise FileNotFoundError(f"{url}: 404 Not Found")
                if r.status_code in (401, 403):  # the hub answers 401 for repos that don't exist, too
                    raise PermissionError(f"{url}: {r.status_code}: no such repo, or it needs HF_TOKEN")
                if r.status_code == 416:  # our .part does not fit the file (it changed?): start over
                    os.remove(part)
                    continue
                if r.status_code >= 500 and attempt < retries:  # the server's trouble, often brief: try again
                    print(f"{url}: {r.status_code} {r.reason}, retrying", file=sys.stderr)
                    time.sleep(attempt)
                    continue
                r.raise_for_status()
                refuse_html(url, r)
                if r.status_code != 206:
                    have = 0  # the server ignored Range and sends everything
                total = have + int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
                stream_to(part, r, have, total)
            if total is None or os.path.getsize(part) == total:
                os.replace(part, dest_path)
                return dest_path
            got = os.path.getsize(part)
            print(f"{url}: body cut short ({got} of {total} bytes), resuming", file=sys.stderr)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries:
                raise
            print(f"\n{url}: {type(e).__name__}, resuming", file=sys.stderr)
            time.sleep(attempt)
    raise OSError(f"{url}: download still incomplete after {retries + 1} attempts")


def refuse_html(url, response):
    """A login page, an error page or a captive portal answers 200 with HTML: that is never the file we asked
    for (we fetch JSON, JSON-lines, text, weights), so it is refused before a byte of it is kept."""
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if kind in ("text/html", "application/xhtml+xml"):
        raise ValueError(f"{url}: the server sent an HTML page ({kind}), not the file; nothing was saved")


def stream_to(part, response, have, total):
    """Append the response's body to part, printing one progress line that rewrites itself."""
    t0 = last = time.time()
    got = 0
    with open(part, "ab" if have else "wb") as f:
        try:
            for chunk in response.iter_content(1 << 16):  # small: a cut connection loses < 64 KiB
                f.write(chunk)
                got += len(chunk)
                if time.time() - last > 0.5 or got + have == total:
                    last = time.time()
                    size = f"/{total / 1e6:.1f}" if total else ""
                    print(f"\r{os.path.basename(part[:-5])}: {(have + got) / 1e6:.1f}{size} MB, "
                          f"{got / 1e6 / max(last - t0, 1e-6):.1f} MB/s", end="", file=sys.stderr, flush=True)
        finally:
            print(file=sys.stderr)
