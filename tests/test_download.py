"""End-to-end tests of broden.download against a local HTTP server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import broden.download as download_mod
from broden.download import (MANIFEST_NAME, MIRRORS_ENV, ArchiveError, DownloadError,
                             candidate_urls, download_dataset, get_spec)
from broden.errors import InputError
from broden.writer import BrodenWriter
from dissect.cli import main as cli_main

NAME = "broden1_224"


@pytest.fixture(autouse=True)
def _no_env_mirrors(monkeypatch):
    monkeypatch.delenv(MIRRORS_ENV, raising=False)


def _broden_zip(tmp: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """A tiny Broden dir (3 images of 8x8) zipped under broden1_224/."""
    rng = np.random.default_rng(0)
    root = tmp / "src" / NAME
    w = BrodenWriter(root, ["color"])
    w.add_label(1, "red")
    for i in range(3):
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        plane = (rng.random((4, 4)) < 0.5).astype(np.int32)
        w.add_image(f"im{i}", img, layers={"color": [plane]})
    w.close()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, f"{NAME}/{p.relative_to(root).as_posix()}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


class _Server:
    """Serve one payload at /data/broden1_224.zip with a selectable Range behaviour."""

    def __init__(self, payload: bytes, mode: str = "range", cut_after: int = 0):
        self.payload, self.mode, self.cut_after = payload, mode, cut_after
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(dict(self.headers))
                if server.mode.startswith("status"):  # e.g. "status503": that HTTP error, every time
                    self.send_error(int(server.mode[len("status"):]))
                    return
                if server.mode == "hang":  # accept, then answer too late for the client's timeout
                    time.sleep(2)
                if self.path != f"/data/{NAME}.zip":
                    self.send_error(404)
                    return
                data, rng = server.payload, self.headers.get("Range")
                first = len(server.requests) == 1
                if rng and server.mode != "norange":
                    start = int(rng.split("=")[1].rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    body = data[start:]
                else:
                    self.send_response(200)
                    body = data
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.mode == "cut" and first:
                    self.wfile.write(body[:server.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/data/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload(tmp_path) -> bytes:
    return _broden_zip(tmp_path)


@pytest.fixture
def serve():
    servers = []

    def start(payload, **kw):
        servers.append(_Server(payload, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def _get(srv, to, **kw):
    return download_dataset(NAME, to, mirrors=[srv.base], include_reference=False, progress=False,
                            timeout=5, **kw)


def _assert_extracted(out: Path, to: Path, payload: bytes):
    assert out == to / NAME
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        for info in zf.infolist():
            assert (to / info.filename).read_bytes() == zf.read(info)
    assert not [p for p in to.iterdir() if p.name.startswith(".")]  # temp dirs removed


def test_full_download_writes_files_and_manifest(tmp_path, payload, serve):
    srv = serve(payload)
    to = tmp_path / "dl"
    out = _get(srv, to)
    _assert_extracted(out, to, payload)
    entry = json.loads((to / MANIFEST_NAME).read_text())["files"][f"{NAME}.zip"]
    assert entry["sha256"] == hashlib.sha256(payload).hexdigest()
    assert entry["size"] == len(payload) and entry["url"] == srv.base + f"{NAME}.zip"
    assert (to / f"{NAME}.zip").read_bytes() == payload
    # a second run reuses the extraction without any request
    n = len(srv.requests)
    assert _get(srv, to) == out and len(srv.requests) == n


def test_interrupted_download_resumes_with_range(tmp_path, payload, serve):
    cut = len(payload) // 3
    srv = serve(payload, mode="cut", cut_after=cut)
    to = tmp_path / "dl"
    out = _get(srv, to)
    assert len(srv.requests) == 2
    assert "Range" not in srv.requests[0]
    assert srv.requests[1]["Range"] == f"bytes={cut}-"
    _assert_extracted(out, to, payload)
    assert json.loads((to / MANIFEST_NAME).read_text())["files"][f"{NAME}.zip"]["sha256"] == \
        hashlib.sha256(payload).hexdigest()


def test_part_file_from_an_earlier_run_is_resumed(tmp_path, payload, serve):
    cut = len(payload) // 2
    srv = serve(payload, mode="cut", cut_after=cut)
    to = tmp_path / "dl"
    with pytest.raises(DownloadError, match="interrupted"):
        _get(srv, to, retries=0)
    assert (to / f"{NAME}.zip.part").read_bytes() == payload[:cut]
    assert not (to / NAME).exists()
    out = _get(srv, to, retries=0)
    assert srv.requests[-1]["Range"] == f"bytes={cut}-"
    _assert_extracted(out, to, payload)


def test_server_without_range_support_restarts(tmp_path, payload, serve):
    srv = serve(payload, mode="norange")
    to = tmp_path / "dl"
    to.mkdir()
    (to / f"{NAME}.zip.part").write_bytes(b"stale bytes that must be discarded")
    out = _get(srv, to)
    assert srv.requests[0]["Range"] == "bytes=34-"
    _assert_extracted(out, to, payload)
    assert (to / f"{NAME}.zip").read_bytes() == payload


def test_wrong_sha256_is_rejected_and_not_extracted(tmp_path, payload, serve):
    srv = serve(payload)
    to = tmp_path / "dl"
    with pytest.raises(ArchiveError, match="does not match") as e:
        _get(srv, to, sha256="0" * 64)
    assert "--sha256" in str(e.value)
    assert not (to / NAME).exists()
    assert not (to / f"{NAME}.zip").exists() and not (to / MANIFEST_NAME).exists()
    assert (to / f"{NAME}.zip.rejected").read_bytes() == payload
    with pytest.raises(InputError, match="--sha256"):
        _get(srv, to, sha256="xyz")


def test_truncated_zip_is_rejected(tmp_path, payload, serve):
    srv = serve(payload[: len(payload) - 30])  # central directory cut short
    to = tmp_path / "dl"
    with pytest.raises(ArchiveError, match="not a valid zip"):
        _get(srv, to)
    assert not (to / NAME).exists() and (to / f"{NAME}.zip.rejected").exists()


def test_garbled_zip_fails_crc_and_leaves_nothing(tmp_path, payload):
    data = bytearray(payload)
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        info = max(zf.infolist(), key=lambda i: i.compress_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(start + 4, start + 12):
        data[k] ^= 0xFF
    to = tmp_path / "dl"
    to.mkdir()
    (to / f"{NAME}.zip").write_bytes(bytes(data))
    with pytest.raises(ArchiveError):
        download_dataset(NAME, to, include_reference=False, progress=False)
    assert sorted(p.name for p in to.iterdir()) == [f"{NAME}.zip.rejected"]


def test_zip_in_place_is_verified_against_manifest(tmp_path, payload, serve):
    srv = serve(payload)
    to = tmp_path / "dl"
    _get(srv, to)
    # user deletes the extraction, then swaps in another archive: the manifest catches it
    import shutil
    shutil.rmtree(to / NAME)
    other = _broden_zip(tmp_path / "other", extra={f"{NAME}/extra.txt": b"x"})
    (to / f"{NAME}.zip").write_bytes(other)
    n = len(srv.requests)
    with pytest.raises(ArchiveError, match=MANIFEST_NAME):
        _get(srv, to)
    assert len(srv.requests) == n and not (to / NAME).exists()
    # the original archive placed back is accepted offline
    (to / f"{NAME}.zip").write_bytes(payload)
    out = download_dataset(NAME, to, include_reference=False, progress=False)
    _assert_extracted(out, to, payload)


def test_path_traversal_member_rejected(tmp_path, serve):
    evil = _broden_zip(tmp_path, extra={"../evil.txt": b"pwned"})
    srv = serve(evil)
    to = tmp_path / "a" / "dl"
    with pytest.raises(ArchiveError, match=r"\.\./evil\.txt"):
        _get(srv, to)
    assert not (tmp_path / "a" / "evil.txt").exists()
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (to / NAME).exists()
    assert sorted(p.name for p in to.iterdir()) == [f"{NAME}.zip.rejected"]


def test_symlink_and_absolute_members_rejected(tmp_path):
    for name, attr in (("/etc/abs.txt", 0o644), (f"{NAME}/link", 0o120777)):
        payload = _broden_zip(tmp_path)
        buf = io.BytesIO(payload)
        with zipfile.ZipFile(buf, "a") as zf:
            info = zipfile.ZipInfo(name)
            info.external_attr = attr << 16
            zf.writestr(info, "/etc/passwd")
        to = tmp_path / f"dl{attr}"
        to.mkdir()
        (to / f"{NAME}.zip").write_bytes(buf.getvalue())
        with pytest.raises(ArchiveError, match=name.lstrip("/").split("/")[-1]):
            download_dataset(NAME, to, include_reference=False, progress=False)
        assert not (to / NAME).exists()


def test_unreachable_host_mentions_local_copy(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connection refused
    url = f"http://127.0.0.1:{port}/data/"
    with pytest.raises(DownloadError) as e:
        download_dataset(NAME, tmp_path, mirrors=[url], include_reference=False, progress=False,
                         timeout=2)
    msg = str(e.value)
    assert "could not be reached" in msg and url + f"{NAME}.zip" in msg
    assert "local copy" in msg and "--dataset" in msg and str(tmp_path / f"{NAME}.zip") in msg
    assert isinstance(e.value, InputError)


def test_mirror_order_and_env(monkeypatch):
    spec = get_spec(NAME)
    urls = candidate_urls(spec, ["http://a/x"], env={MIRRORS_ENV: "http://b/ , http://c/d/"})
    assert urls == ["http://a/x/broden1_224.zip", "http://b/broden1_224.zip",
                    "http://c/d/broden1_224.zip", "http://netdissect.csail.mit.edu/data/broden1_224.zip"]
    with pytest.raises(InputError, match="mirror"):
        candidate_urls(spec, ["ftp://x/"], env={})
    with pytest.raises(InputError, match="broden1_227"):
        get_spec("broden2")


def test_cli(tmp_path, payload, serve, capsys):
    srv = serve(payload)
    rc = cli_main(["download", NAME, "--to", str(tmp_path), "--mirror", srv.base, "--mirrors-only",
                   "--quiet"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / NAME)
    assert cli_main(["download", "nope", "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "broden1_224" in err and "broden1_384" in err


@pytest.mark.parametrize("extra", [0, 5])
def test_range_not_satisfiable_complete_or_stale(tmp_path, payload, serve, extra):
    srv = serve(payload)
    to = tmp_path / "dl"
    to.mkdir()
    # extra == 0: the .part already holds the whole file; extra > 0: a stale, longer .part
    (to / f"{NAME}.zip.part").write_bytes(payload + b"\0" * extra)
    out = _get(srv, to)
    assert srv.requests[0]["Range"] == f"bytes={len(payload) + extra}-"
    assert len(srv.requests) == (1 if extra == 0 else 2)
    assert "Range" not in srv.requests[-1] or extra == 0
    _assert_extracted(out, to, payload)


# --- exit codes of `dissect download`: 2 for bad usage or input, 1 for a network failure ---------

def _refused_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connection refused
    return f"http://127.0.0.1:{port}/data/"


def test_cli_to_an_existing_file_is_bad_usage(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("not a directory")
    for to in (target, target / "sub"):
        assert cli_main(["download", NAME, "--to", str(to), "--mirror", _refused_url(), "--mirrors-only",
                         "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "--to" in err and str(to) in err and "directory" in err and "Traceback" not in err
    assert target.read_text() == "not a directory"


def test_cli_connection_refused_exits_1(tmp_path, capsys):
    url = _refused_url()
    rc = cli_main(["download", NAME, "--to", str(tmp_path / "dl"), "--mirror", url, "--mirrors-only",
                   "--quiet", "--timeout", "2"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "could not be reached" in err and url + f"{NAME}.zip" in err and "Traceback" not in err
    assert not (tmp_path / "dl" / NAME).exists()


def test_cli_timeout_exits_1(tmp_path, payload, serve, capsys):
    srv = serve(payload, mode="hang")
    rc = cli_main(["download", NAME, "--to", str(tmp_path / "dl"), "--mirror", srv.base, "--mirrors-only",
                   "--quiet", "--timeout", "0.5"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "timed out" in err and "Traceback" not in err


def test_http_5xx_is_retried_then_exits_1(tmp_path, payload, serve, capsys, monkeypatch):
    monkeypatch.setattr(download_mod, "_RETRY_BACKOFF_S", 0.0, raising=False)
    srv = serve(payload, mode="status503")
    with pytest.raises(DownloadError, match="HTTP 503"):
        _get(srv, tmp_path / "a", retries=2)
    assert len(srv.requests) == 3  # the first try and two retries
    rc = cli_main(["download", NAME, "--to", str(tmp_path / "b"), "--mirror", srv.base, "--mirrors-only",
                   "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "HTTP 503" in err and "Traceback" not in err
    # a 404 is not retried: the file is not there
    srv404 = serve(payload, mode="status404")
    with pytest.raises(DownloadError, match="HTTP 404"):
        _get(srv404, tmp_path / "c", retries=2)
    assert len(srv404.requests) == 1


# --- an existing extraction is reused only when its manifest vouches for it ---------------------

EXTRACTION = f"{NAME}.extraction.json"


def _members(payload: bytes) -> dict[str, int]:
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        return {i.filename[len(NAME) + 1:]: i.file_size for i in zf.infolist() if not i.is_dir()}


def test_extraction_manifest_lists_the_extracted_files(tmp_path, payload, serve):
    srv = serve(payload)
    to = tmp_path / "dl"
    _get(srv, to)
    m = json.loads((to / EXTRACTION).read_text())
    assert m["format"] == "broden-extraction" and m["archive"] == f"{NAME}.zip"
    assert m["archive_sha256"] == hashlib.sha256(payload).hexdigest() and m["archive_size"] == len(payload)
    assert {rel: size for rel, size in m["files"]} == _members(payload)
    for rel, size in m["files"]:
        assert (to / NAME / rel).stat().st_size == size


def test_unvouched_extraction_without_archive_is_refused(tmp_path, payload, capsys):
    to = tmp_path / "dl"
    (to / NAME).mkdir(parents=True)
    (to / NAME / "index.csv").write_text("image,split\n")  # anyone's directory holding an index.csv
    digest = hashlib.sha256(payload).hexdigest()
    with pytest.raises(InputError) as e:
        download_dataset(NAME, to, sha256=digest, include_reference=False, progress=False)
    msg = str(e.value)
    assert str(to / NAME) in msg and EXTRACTION in msg and str(to / f"{NAME}.zip") in msg
    assert cli_main(["download", NAME, "--to", str(to), "--sha256", digest, "--mirrors-only", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(to / NAME) in err and "Traceback" not in err
    assert (to / NAME / "index.csv").read_text() == "image,split\n"  # nothing of the user's was touched


def test_unvouched_extraction_is_reextracted_from_the_verified_archive(tmp_path, payload):
    to = tmp_path / "dl"
    (to / NAME).mkdir(parents=True)
    (to / NAME / "index.csv").write_text("image,split\n")
    (to / NAME / "stray.txt").write_text("x")
    (to / f"{NAME}.zip").write_bytes(payload)
    out = download_dataset(NAME, to, sha256=hashlib.sha256(payload).hexdigest(), include_reference=False,
                           progress=False)
    _assert_extracted(out, to, payload)
    assert not (out / "stray.txt").exists()
    assert json.loads((to / EXTRACTION).read_text())["archive_sha256"] == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest-garbled", "manifest-deleted"])
def test_damaged_extraction_is_reextracted_offline(tmp_path, payload, serve, damage):
    srv = serve(payload)
    to = tmp_path / "dl"
    _get(srv, to)
    victim = to / NAME / "index.csv"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:10])
    elif damage == "delete":
        victim.unlink()
    elif damage == "manifest-garbled":
        (to / EXTRACTION).write_text('{"format": "broden-extr')
    else:
        (to / EXTRACTION).unlink()
    n = len(srv.requests)
    out = _get(srv, to)
    assert len(srv.requests) == n  # the zip in place was verified and used, nothing downloaded
    _assert_extracted(out, to, payload)


def test_damaged_extraction_without_archive_is_refused_naming_the_file(tmp_path, payload, serve, capsys):
    srv = serve(payload)
    to = tmp_path / "dl"
    _get(srv, to)
    (to / f"{NAME}.zip").unlink()
    victim = to / NAME / "index.csv"
    victim.write_bytes(victim.read_bytes()[:10])
    rc = cli_main(["download", NAME, "--to", str(to), "--mirror", srv.base, "--mirrors-only", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(to / NAME) in err and "index.csv" in err and "10 bytes" in err


def test_extraction_from_another_archive_is_not_reused(tmp_path, payload, serve):
    srv = serve(payload)
    to = tmp_path / "dl"
    _get(srv, to)
    with pytest.raises(ArchiveError, match="--sha256"):
        _get(srv, to, sha256="1" * 64)  # the zip in place does not match either: rejected
    assert (to / f"{NAME}.zip.rejected").is_file()


def test_a_directory_given_directly_needs_no_manifest(tmp_path, payload, serve):
    from broden.dataset import BrodenDataset

    srv = serve(payload)
    to = tmp_path / "dl"
    _get(srv, to)
    (to / EXTRACTION).unlink()
    assert len(BrodenDataset(to / NAME, cache="off")) == 3  # the offline path: a path, not a download
