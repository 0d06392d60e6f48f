"""Download, verify and safely extract the Broden archives.

Flow of `download_dataset`: reuse an existing extraction only when its
extraction manifest (`to/<top_dir>.extraction.json`, written by
`extract_archive`) vouches for it: the archive's sha256 matches every known
expectation and every listed file exists with its listed size. An extraction
it cannot vouch for is re-extracted from the zip in place after verifying it,
or refused (InputError naming the directory) when no zip is there. Otherwise use a
zip already at `to/<file>` (verified, never downloaded again); else download
to `to/<file>.part`, resuming with HTTP Range, from the mirrors then the
reference host. The complete archive is verified (expected size when known,
SHA-256 against `--sha256` and against the manifest of an earlier good
download), extracted into a marked temporary directory inside `to`
(`.<top_dir>.extract-*`, see broden.tmpdirs) with every member checked, and
renamed into place. Each run first removes the stale temporary directories of
killed extractions (marker required; a live one is never touched). A rejected archive is renamed aside to
`<file>.rejected` (kept so the user can inspect it) and never extracted.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping, Sequence

from broden import tmpdirs
from broden.errors import InputError
from broden._fileio import write_json_atomic
from broden._progress import progress as _progress

__all__ = ["REFERENCE_BASE_URL", "MIRRORS_ENV", "MANIFEST_NAME", "EXTRACTION_FORMAT", "extraction_manifest_path",
           "DatasetSpec", "DATASETS",
           "DownloadError", "ArchiveError", "get_spec", "candidate_urls", "download_dataset",
           "extract_archive", "sha256_file", "prepare_directory", "remove_stale_extractions",
           "EXTRACT_STALE_AFTER_S"]

log = logging.getLogger(__name__)

REFERENCE_BASE_URL = "http://netdissect.csail.mit.edu/data/"
MIRRORS_ENV = "DISSECT_BRODEN_MIRRORS"
MANIFEST_NAME = "broden-manifest.json"
EXTRACTION_FORMAT = "broden-extraction"
EXTRACTION_VERSION = 1
# a leftover extraction whose owner cannot be checked (another host) is removed after this long unchanged
EXTRACT_STALE_AFTER_S = 24 * 3600.0
_CHUNK = 1 << 16
_RETRY_BACKOFF_S = 1.0  # wait before retry k (1-based) after an HTTP 5xx: k times this


@dataclass(frozen=True)
class DatasetSpec:
    """One downloadable archive: `file` under each base URL unpacks to `top_dir/`."""

    name: str
    file: str
    top_dir: str
    size: int | None = None     # bytes; None: not published, so not checked
    sha256: str | None = None   # no official checksum exists (netdissect.md section 1)
    base_url: str = REFERENCE_BASE_URL


DATASETS: dict[str, DatasetSpec] = {
    f"broden1_{s}": DatasetSpec(f"broden1_{s}", f"broden1_{s}.zip", f"broden1_{s}")
    for s in (224, 227, 384)
}


class DownloadError(InputError):
    """No URL delivered the archive; the message lists what was tried and how to use a local copy.

    A network failure is not bad input: `dissect download` exits 1 on it. It stays an
    InputError for library callers that already catch those.
    """


class ArchiveError(InputError):
    """An archive failed verification or holds an unsafe member; it was not extracted."""


def get_spec(name: str) -> DatasetSpec:
    """Look up a dataset by name; unknown names raise InputError listing the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise InputError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}") from None


def _split_mirrors(text: str) -> list[str]:
    return [m for m in re.split(r"[\s,]+", text) if m]


def candidate_urls(spec: DatasetSpec, mirrors: Sequence[str] = (), include_reference: bool = True,
                   env: Mapping[str, str] | None = None) -> list[str]:
    """URLs to try, in order: `mirrors`, then $DISSECT_BRODEN_MIRRORS, then the reference host."""
    env = os.environ if env is None else env
    bases = list(mirrors) + _split_mirrors(env.get(MIRRORS_ENV, ""))
    if include_reference:
        bases.append(spec.base_url)
    urls: list[str] = []
    for base in bases:
        if not re.match(r"^https?://[^/]+", base):
            raise InputError(f"mirror {base!r} (from --mirror or ${MIRRORS_ENV}) must be an "
                             "http:// or https:// base URL, e.g. http://host/data/")
        url = base.rstrip("/") + "/" + spec.file
        if url not in urls:
            urls.append(url)
    return urls


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256_arg(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise InputError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return value


def _bar(show: bool, iterable: Iterable | None = None, **kwargs):
    """The toolkit's progress bar, forced off when `show` is False."""
    if not show:
        kwargs["disable"] = True
    return _progress(iterable, **kwargs)


# ---------------------------------------------------------------- manifest

def _read_manifest(to: Path) -> dict:
    path = to / MANIFEST_NAME
    if not path.exists():
        return {"format": "broden-manifest", "version": 1, "files": {}}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("files"), dict):
            raise ValueError("no 'files' object")
    except (ValueError, AttributeError) as e:
        raise InputError(f"{path}: unreadable download manifest ({e}); delete it to start afresh") from None
    return data


def _record_manifest(to: Path, spec: DatasetSpec, size: int, digest: str, url: str) -> None:
    manifest = _read_manifest(to)
    manifest["files"][spec.file] = {
        "file": spec.file, "size": size, "sha256": digest, "url": url,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(to / MANIFEST_NAME, manifest)


# ---------------------------------------------------------------- verification

def _move_aside(archive: Path) -> Path:
    """Rename a bad archive to `<file>.rejected` (kept for inspection, replaced by the next one)."""
    aside = archive.with_name(archive.name.removesuffix(".part") + ".rejected")
    os.replace(archive, aside)
    return aside


def _reject(archive: Path, reason: str) -> ArchiveError:
    """Move a bad archive aside and build the error to raise."""
    aside = _move_aside(archive)
    log.warning("rejected %s: %s (moved to %s)", archive, reason, aside)
    return ArchiveError(f"{archive.name}: {reason}; the archive was not extracted and was moved "
                        f"aside to {aside}")


def _verify(archive: Path, spec: DatasetSpec, sha256: str | None, manifest_entry: dict | None) -> str:
    """Return the archive's sha256 after every check passes; otherwise reject it."""
    size = archive.stat().st_size
    if spec.size is not None and size != spec.size:
        raise _reject(archive, f"size {size} bytes, expected {spec.size}")
    if manifest_entry and manifest_entry.get("size") not in (None, size):
        raise _reject(archive, f"size {size} bytes, but {MANIFEST_NAME} recorded "
                               f"{manifest_entry['size']} from the first good download")
    digest = sha256_file(archive)
    expected = [(sha256, "--sha256"), (spec.sha256, "the dataset table"),
                ((manifest_entry or {}).get("sha256"), MANIFEST_NAME)]
    for want, source in expected:
        if want is not None and digest != want:
            raise _reject(archive, f"sha256 {digest} does not match {want} from {source}")
    if not zipfile.is_zipfile(archive):
        raise _reject(archive, "not a valid zip file (truncated or garbled)")
    return digest


# ---------------------------------------------------------------- extraction

# extract_archive's temporary directories: mkdtemp(prefix=f".{top_dir}.extract-")
_EXTRACT_NAME = re.compile(
    r"^\.(?:" + "|".join(re.escape(s.top_dir) for s in DATASETS.values()) + r")\.extract-[A-Za-z0-9_]+$")


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_member(info: zipfile.ZipInfo, dest: Path, archive: Path) -> None:
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(f"{archive.name}: member {name!r} has an absolute path; refusing to extract")
    if ".." in parts:
        raise ArchiveError(f"{archive.name}: member {name!r} contains a '..' component; refusing to extract")
    if _is_symlink(info):
        raise ArchiveError(f"{archive.name}: member {name!r} is a symbolic link; refusing to extract")
    target = (dest / name).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise ArchiveError(f"{archive.name}: member {name!r} would be written outside {dest}; "
                           "refusing to extract")


def extraction_manifest_path(to: Path, top_dir: str) -> Path:
    """Where the manifest of the extraction `to/top_dir/` lives: beside it, `to/<top_dir>.extraction.json`."""
    return Path(to) / f"{top_dir}.extraction.json"


def _listing(members: list[zipfile.ZipInfo], top_dir: str) -> list[list]:
    """[relpath under top_dir, size] of every file member that lands in `top_dir/`."""
    prefix = top_dir + "/"
    return [[m.filename[len(prefix):], m.file_size] for m in members
            if not m.is_dir() and m.filename.startswith(prefix)]


def _write_extraction_manifest(to: Path, top_dir: str, archive: Path, digest: str, files: list[list]) -> None:
    write_json_atomic(extraction_manifest_path(to, top_dir), {
        "format": EXTRACTION_FORMAT, "version": EXTRACTION_VERSION, "archive": archive.name,
        "archive_size": archive.stat().st_size, "archive_sha256": digest, "top_dir": top_dir,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": files,
    })


def _swap_into_place(new: Path, final: Path, aside: Path) -> None:
    """Put the tree `new` at `final`; an existing `final` is moved to `aside` (removed with the temp dir)."""
    if not (final.exists() or final.is_symlink()):
        os.rename(new, final)
        return
    os.rename(final, aside)
    try:
        os.rename(new, final)
    except OSError:
        os.rename(aside, final)  # put the old tree back rather than leave nothing
        raise


def extract_archive(archive: Path, to: Path, top_dir: str, show_progress: bool = True, *,
                    archive_sha256: str | None = None) -> Path:
    """Extract `archive` safely and atomically; returns `to/top_dir`.

    Every member is checked before anything is written; extraction goes to a
    temporary directory inside `to` and only `top_dir/` is renamed into place,
    replacing an earlier tree there. Then the extraction manifest (archive
    sha256, computed unless given, and every extracted file with its size) is
    written atomically beside it. A CRC error or unsafe member raises
    ArchiveError and leaves nothing behind.
    """
    final = to / top_dir
    manifest = extraction_manifest_path(to, top_dir)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise ArchiveError(f"{archive.name}: not a valid zip file ({e})") from None
    with zf:
        members = zf.infolist()
        tmp, lock_fd = tmpdirs.make_marked_tempdir(to, f".{top_dir}.extract-", "extraction")
        content = tmp / "content"  # members go one level down: none can clobber the marker or the lock
        try:
            for info in members:
                _check_member(info, content, archive)
            names = {i.filename.rstrip("/") for i in members}
            if f"{top_dir}/index.csv" not in names:
                raise ArchiveError(f"{archive.name}: expected a top-level folder {top_dir}/ holding "
                                   "index.csv; this does not look like a Broden archive")
            for info in _bar(show_progress, members, desc=f"extract {archive.name}", unit="file"):
                zf.extract(info, content)
            digest = archive_sha256 or sha256_file(archive)
            # no manifest may vouch for a tree while it changes: drop it before the swap
            manifest.unlink(missing_ok=True)
            _swap_into_place(content / top_dir, final, tmp / "replaced")
            _write_extraction_manifest(to, top_dir, archive, digest, _listing(members, top_dir))
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # CRC or stream damage
            raise ArchiveError(f"{archive.name}: extraction failed ({e}); nothing was extracted") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            tmpdirs.release(lock_fd)
    return final


def remove_stale_extractions(to: Path, max_age: float = EXTRACT_STALE_AFTER_S) -> list[Path]:
    """Remove the temporary directories of killed extractions in `to` (broden.tmpdirs rules: name pattern
    and marker required, a live one never touched); return the removed paths."""
    candidates = [p for p in Path(to).glob(".*.extract-*") if _EXTRACT_NAME.match(p.name)]
    return tmpdirs.remove_stale(candidates, max_age, what="temporary extraction")


def _extraction_problem(to: Path, spec: DatasetSpec, expected: list[tuple[str | None, str]]) -> str | None:
    """Why the manifest cannot vouch for the extraction `to/top_dir/`, or None when it does.

    `expected` lists (sha256 or None, where that expectation comes from).
    """
    path = extraction_manifest_path(to, spec.top_dir)
    if not path.is_file():
        return (f"no {path.name} vouches for it (not extracted by this tool, or its extraction was "
                "interrupted)")
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        digest = data["archive_sha256"]
        if data.get("format") != EXTRACTION_FORMAT or not isinstance(files, list):
            raise ValueError(f"not a {EXTRACTION_FORMAT} manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest {path} is unreadable ({e})"
    for want, source in expected:
        if want is not None and digest != want:
            return f"{path.name} says it was extracted from an archive with sha256 {digest}, not {want} from {source}"
    return _listed_files_problem(to / spec.top_dir, files, path.name)


def _listed_files_problem(final: Path, files: list, manifest_name: str) -> str | None:
    """The first listed file that is missing or has another size, with a count of the others."""
    bad: list[str] = []
    for entry in files:
        try:
            rel, size = entry
            st = os.stat(final / rel)
        except FileNotFoundError:
            bad.append(f"{rel} is missing")
            continue
        except (OSError, TypeError, ValueError):
            bad.append(f"entry {entry!r} of {manifest_name} cannot be checked")
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            bad.append(f"{rel} has {st.st_size} bytes, {manifest_name} lists {size}")
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"it differs from what was extracted: {bad[0]}{more}"


# ---------------------------------------------------------------- transfer

class _Unreachable(Exception):
    """The host could not be contacted (no byte was exchanged)."""


class _Interrupted(Exception):
    """The transfer stopped before the announced length."""


def _content_range_total(value: str | None) -> tuple[int | None, int | None]:
    """Parse `bytes a-b/total` or `bytes */total` into (start, total)."""
    m = re.match(r"bytes\s+(\d+|\*)(?:-\d+)?/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = None if m.group(1) == "*" else int(m.group(1))
    total = None if m.group(2) == "*" else int(m.group(2))
    return start, total


def _fetch_once(url: str, part: Path, timeout: float, show_progress: bool) -> None:
    """One HTTP request that appends to (206) or rewrites (200) `part`; returns when it is complete."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "dissect-broden-downloader"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            _, total = _content_range_total(e.headers.get("Content-Range"))
            e.close()
            if total == offset:
                return  # the .part already holds the whole file
            log.info("%s: server refused the resume range (stale .part of %d bytes); restarting", url, offset)
            part.unlink()
            raise _Interrupted("stale partial download discarded") from None
        e.close()
        raise
    except (urllib.error.URLError, TimeoutError, ConnectionError, socket.timeout) as e:
        raise _Unreachable(str(getattr(e, "reason", e))) from None
    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None else None
        if status == 206:
            start, total = _content_range_total(resp.headers.get("Content-Range"))
            if start != offset:
                log.info("%s: server resumed at byte %s, not %d; restarting", url, start, offset)
                part.unlink()
                raise _Interrupted("misaligned resume")
            mode = "ab"
        else:
            if offset:
                log.info("%s: server ignored the Range header (HTTP %d); restarting from byte 0", url, status)
            offset, total, mode = 0, length, "wb"
        received = 0
        bar = _bar(show_progress, total=total, initial=offset, unit="B", unit_scale=True,
                   unit_divisor=1024, desc=part.name.removesuffix(".part"))
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except (http.client.IncompleteRead, ConnectionError, TimeoutError, socket.timeout) as e:
                        raise _Interrupted(f"connection lost after {offset + received} bytes ({e})") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
        if length is not None and received < length:
            raise _Interrupted(f"connection closed after {offset + received} of {offset + length} bytes")


def _fetch(url: str, part: Path, timeout: float, retries: int, show_progress: bool) -> None:
    """Download `url` into `part`, resuming after interruptions and retrying HTTP 5xx, up to `retries` times."""
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, show_progress)
            return
        except _Interrupted as e:
            if attempt == retries:
                raise
            log.warning("%s: %s; resuming (retry %d of %d)", url, e, attempt + 1, retries)
        except urllib.error.HTTPError as e:
            if not 500 <= e.code < 600 or attempt == retries:
                raise  # 4xx: the file is not there, asking again will not help
            log.warning("%s: HTTP %d %s; retrying (retry %d of %d)", url, e.code, e.reason, attempt + 1, retries)
            time.sleep(_RETRY_BACKOFF_S * (attempt + 1))


def prepare_directory(to: Path, option: str = "") -> Path:
    """Create `to` if needed; InputError naming `option` (or the path) when it is a file or cannot be made."""
    name = f"{option} {to}" if option else str(to)
    if to.exists() and not to.is_dir():
        raise InputError(f"{name}: exists and is not a directory; expected a directory to receive the "
                         "archive and the extracted dataset")
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{name}: cannot create the directory ({e.strerror or e})") from None
    return to


def _local_copy_hint(spec: DatasetSpec, to: Path) -> str:
    return (f"To use a local copy instead: pass an extracted dataset directly "
            f"(dissect run ... --dataset /path/to/{spec.top_dir}), or give another base URL with "
            f"--mirror URL (or ${MIRRORS_ENV}), or place the zip at {to / spec.file} and rerun "
            f"(a zip already in place is verified and used without downloading).")


def _reusable_extraction(to: Path, spec: DatasetSpec, sha256: str | None, manifest_entry: dict | None,
                         archive: Path) -> bool:
    """True when `to/top_dir/` exists and its manifest vouches for it; False when there is none, or one to
    re-extract from `archive`. InputError, naming the directory and the problem, when no archive can."""
    final = to / spec.top_dir
    if not (final.exists() or final.is_symlink()):
        return False
    expected = [(sha256, "--sha256"), (spec.sha256, "the dataset table"),
                ((manifest_entry or {}).get("sha256"), MANIFEST_NAME)]
    problem = _extraction_problem(to, spec, expected)
    if problem is None:
        return True
    if not archive.is_file():
        raise InputError(
            f"{final}: {problem}; there is no archive {archive} to verify it against. Delete {final} to "
            f"download it afresh, put the archive at {archive} to re-extract it, or pass the directory to "
            f"the loader directly (dissect run ... --dataset {final}) to use it as it is")
    log.warning("%s: %s; re-extracting it from %s once that is verified", final, problem, archive)
    return False


def download_dataset(name: str, to: Path, mirrors: Iterable[str] = (), sha256: str | None = None,
                     progress: bool = True, timeout: float = 60, *, include_reference: bool = True,
                     retries: int = 3) -> Path:
    """Make `to/<name>/` hold the extracted dataset (downloading if needed) and return that path.

    `mirrors` are base URLs tried before $DISSECT_BRODEN_MIRRORS and the
    reference host (skipped when `include_reference` is False). `sha256`
    enforces the archive's digest. `retries` bounds resumes per URL after a
    dropped connection and retries after an HTTP 5xx. An existing extraction
    is reused only when its extraction manifest vouches for it (module docstring).
    """
    spec = get_spec(name)
    sha256 = _check_sha256_arg(sha256)
    to = prepare_directory(Path(to))
    remove_stale_extractions(to)
    final = to / spec.top_dir
    manifest_entry = _read_manifest(to)["files"].get(spec.file)

    archive = to / spec.file
    if _reusable_extraction(to, spec, sha256, manifest_entry, archive):
        log.info("reusing the existing extraction %s", final)
        return final

    url_used = f"file://{archive.resolve()}"
    if archive.exists():
        log.info("verifying the archive already at %s (no download)", archive)
        digest = _verify(archive, spec, sha256, manifest_entry)
        url_used = (manifest_entry or {}).get("url", url_used)
    else:
        urls = candidate_urls(spec, list(mirrors), include_reference)
        if not urls:
            raise InputError("no URL to download from: give --mirror URL or allow the reference host")
        part = to / (spec.file + ".part")
        failures: list[str] = []
        rejected = False
        digest = ""
        for url in urls:
            log.info("downloading %s", url)
            try:
                _fetch(url, part, timeout, retries, progress)
            except _Unreachable as e:
                failures.append(f"{url}: host could not be reached ({e})")
                continue
            except _Interrupted as e:
                failures.append(f"{url}: transfer interrupted ({e}); {part} is kept for resuming")
                continue
            except urllib.error.HTTPError as e:
                failures.append(f"{url}: HTTP {e.code} {e.reason}")
                continue
            except (OSError, http.client.HTTPException) as e:
                failures.append(f"{url}: {e}")
                continue
            try:
                digest = _verify(part, spec, sha256, manifest_entry)
            except ArchiveError as e:
                failures.append(f"{url}: {e}")
                rejected = True
                continue
            os.replace(part, archive)
            url_used = url
            break
        else:
            reached = not all("could not be reached" in f for f in failures)
            head = ("the download failed" if reached else "the host could not be reached")
            # a delivered-but-bad archive is the more telling failure: report it as such
            error = ArchiveError if rejected else DownloadError
            raise error(f"{spec.file}: {head}. Tried:\n  " + "\n  ".join(failures) + "\n"
                        + _local_copy_hint(spec, to))

    try:
        result = extract_archive(archive, to, spec.top_dir, progress, archive_sha256=digest)
    except ArchiveError as e:
        aside = _move_aside(archive)
        raise ArchiveError(f"{e}; the archive was moved aside to {aside}") from None
    _record_manifest(to, spec, archive.stat().st_size, digest, url_used)
    return result
