"""Files of one hub repository into the Hugging Face cache, each checked against the hub's own hashes.

Why on top of huggingface_hub and not beside it: it already does the cache
(``HF_HOME``/``HF_HUB_CACHE``, shared with every other tool), the token
(``HF_TOKEN``), offline mode (``HF_HUB_OFFLINE=1``), progress bars, locks and
atomic blob writes.  What it does not do is check the bytes it wrote against the
hub's hashes, and a model we convert and run must be the one the repository
holds.  So, per file:

* online, ``model_info(files_metadata=True)`` lists the repository at one commit
  with each file's LFS sha256 (binary files) or git blob id (small text files);
  ``snapshot_download`` of the chosen files fetches what the cache lacks (nothing
  the second time: a file cached at that commit needs no request) and records the
  branch → commit ref that offline use needs;
* offline, the cached snapshot is used, and the expected hash is the ETag the
  hub sent when the file was downloaded, which huggingface_hub keeps as the
  blob's file name (``blobs/<sha256>`` for LFS files, ``blobs/<git sha1>``);
* either way the file is hashed here, after the download, and a file whose hash
  differs is removed from the cache (blob and snapshot link, so that the next
  try downloads it again) and refused with ``DownloadIntegrityError``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltamem_edge.errors import DownloadIntegrityError, HubError, HubOfflineError

CHUNK = 1 << 22
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Expected:
    """What the hub says a file is: its size and its sha256 (LFS files) or git blob sha1 (the others)."""

    size: int | None
    sha256: str | None = None
    git_sha1: str | None = None


@dataclass(frozen=True)
class Fetched:
    """Verified local copies of some files of ``repo`` at ``commit`` (paths inside the hub cache's snapshot)."""

    repo: str
    commit: str
    files: dict[str, Path]


def hub():  # noqa: ANN201 - the huggingface_hub module
    """huggingface_hub, or an error that says which extra to install."""
    try:
        import huggingface_hub
    except ModuleNotFoundError:
        raise HubError("pulling models needs huggingface_hub",
                       hint="pip install 'deltamem-edge[hub]'") from None
    return huggingface_hub


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    hub()
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check()) if callable(check) else bool(constants.HF_HUB_OFFLINE)


def file_digests(path: Path) -> tuple[int, str, str]:
    """(size, sha256, git blob sha1) of a file, read once."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {size}\0".encode())  # noqa: S324 - git's object id, compared, not trusted for security
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha256.update(chunk)
            git.update(chunk)
    return size, sha256.hexdigest(), git.hexdigest()


def expected_from_blob(path: Path) -> Expected | None:
    """The hash huggingface_hub named the cached blob after (the ETag the hub sent), if the cache uses links."""
    real = Path(os.path.realpath(path))
    etag = real.name.lower()
    if real.parent.name != "blobs" or not _HEX.match(etag):
        return None
    if len(etag) == 64:
        return Expected(None, sha256=etag)
    if len(etag) == 40:
        return Expected(None, git_sha1=etag)
    return None


def _discard(path: Path) -> None:
    """Remove a bad file from the hub cache: its blob and its snapshot link, so that a retry downloads it anew."""
    real = Path(os.path.realpath(path))
    for p in {real, Path(path)}:
        with contextlib.suppress(OSError):
            p.unlink()


def verify(repo: str, name: str, path: Path, expected: list[Expected]) -> None:
    """Hash ``path`` and compare with every expectation; on a mismatch remove it from the cache and raise."""
    size, sha256, git_sha1 = file_digests(path)
    for exp in expected:
        problem = None
        if exp.size is not None and exp.size != size:
            problem = f"is {size} bytes; the hub says {exp.size}"
        elif exp.sha256 is not None and exp.sha256.lower() != sha256:
            problem = f"has sha256 {sha256[:16]}…; the hub says {exp.sha256.lower()[:16]}…"
        elif exp.git_sha1 is not None and exp.git_sha1.lower() != git_sha1:
            problem = f"has git blob id {git_sha1[:16]}…; the hub says {exp.git_sha1.lower()[:16]}…"
        if problem:
            _discard(path)
            raise DownloadIntegrityError(
                f"{repo}: downloaded file {name} {problem}: the download is corrupt or was altered, so it was "
                "removed from the cache and nothing was installed",
                hint="pull again; if it happens again, the repository or a proxy serves other bytes than it lists")


def _hub_error(repo: str, revision: str | None, e: Exception) -> HubError:
    """One HubError naming the repository for whatever huggingface_hub raised."""
    import huggingface_hub.errors as errors
    at = f" at revision {revision!r}" if revision else ""
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(f"{repo}: no revision {revision!r} in this repository", hint="check --revision")
    if isinstance(e, errors.GatedRepoError):
        return HubError(f"{repo}: the repository is gated", hint="accept its terms on the hub and set HF_TOKEN")
    if isinstance(e, errors.RepositoryNotFoundError):
        return HubError(f"{repo}: no such model repository on the hub (or it is private)",
                        hint="check the name; for a private repository set HF_TOKEN")
    if isinstance(e, errors.EntryNotFoundError):
        return HubError(f"{repo}{at}: a listed file is missing on the hub ({e})".splitlines()[0])
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return HubOfflineError(f"{repo}: not in the local Hugging Face cache, and the hub cannot be used (offline)",
                               hint="pull it once with network access (HF_HUB_OFFLINE unset)")
    if isinstance(e, errors.HfHubHTTPError):
        first = str(e).splitlines()[0]
        return HubError(f"{repo}: the hub refused the request ({first})")
    return HubError(f"{repo}: cannot reach the hub ({type(e).__name__}: {e})".splitlines()[0],
                    hint="check the network (HF_ENDPOINT, proxies), or set HF_HUB_OFFLINE=1 to use the cache")


def _online_listing(repo: str, revision: str | None) -> tuple[str, dict[str, Expected]]:
    h = hub()
    try:
        info = h.HfApi().model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - mapped to one typed error below
        raise _hub_error(repo, revision, e) from e
    if not info.sha or not info.siblings:
        raise HubError(f"{repo}: the hub sent no commit or no file list for this repository")
    listing = {}
    for s in info.siblings:
        lfs = s.lfs
        if lfs is not None:
            sha, size = (lfs.get("sha256"), lfs.get("size")) if isinstance(lfs, dict) else (lfs.sha256, lfs.size)
            listing[s.rfilename] = Expected(size, sha256=sha)
        else:
            listing[s.rfilename] = Expected(s.size, git_sha1=s.blob_id)
    return info.sha, listing


def _offline_snapshot(repo: str, revision: str | None) -> Path:
    """The cached snapshot folder of ``repo`` at ``revision`` (a branch or tag goes through the cache's refs).

    ``allow_patterns=[]``: locate the snapshot without asking for every file of the
    repository (we only ever download the few we need, e.g. one quantization).
    """
    h = hub()
    try:
        return Path(h.snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=[]))
    except Exception as e:  # noqa: BLE001 - mapped to one typed error below
        err = _hub_error(repo, revision, e)
        if not isinstance(err, HubOfflineError):
            err = HubOfflineError(f"{repo}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                                  "downloading it", hint="pull it once with network access (HF_HUB_OFFLINE unset)")
        raise err from e


def _snapshot_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def fetch(repo: str, revision: str | None, choose: Callable[[list[str]], list[str]],
          *, echo: Callable[[str], None] = lambda _: None) -> Fetched:
    """Download (or find in the cache) the files ``choose`` picks from ``repo``'s listing, all verified.

    ``choose`` gets the repository's file names and returns those wanted (it raises
    HubError when the repository does not hold what it needs).  Offline, it gets the
    files of the cached snapshot instead.
    """
    h = hub()
    if offline():
        folder = _offline_snapshot(repo, revision)
        names = choose(_snapshot_files(folder))
        files = {}
        for name in names:
            path = folder / name
            exp = expected_from_blob(path)
            if exp is None:
                echo(f"  warning: {repo}/{name}: the cache keeps no hash to check it against offline")
            else:
                verify(repo, name, path, [exp])
            files[name] = path
        return Fetched(repo, folder.name, files)

    commit, listing = _online_listing(repo, revision)
    names = choose(sorted(listing))
    try:  # the library's own download: cache, refs (for offline use later), locks, progress bars
        folder = Path(h.snapshot_download(repo, revision=revision, allow_patterns=[glob.escape(n) for n in names]))
    except Exception as e:  # noqa: BLE001 - mapped to one typed error below
        raise _hub_error(repo, revision, e) from e
    if folder.name != commit:
        raise HubError(f"{repo}: the repository changed while it was being pulled ({commit[:8]} → {folder.name[:8]})",
                       hint="pull again")
    files = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise HubError(f"{repo}: {name} is listed but was not downloaded")
        checks = [listing[name]]
        blob = expected_from_blob(path)
        if blob is not None:  # the ETag of the download itself (X-Linked-Etag for LFS files)
            checks.append(blob)
        verify(repo, name, path, checks)
        files[name] = path
    return Fetched(repo, commit, files)
