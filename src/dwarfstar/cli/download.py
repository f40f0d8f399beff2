"""``ds4 download``: fetch a published DeepSeek V4 Flash GGUF from Hugging Face, resumably.

``ds4 download q2-imatrix`` (and the other names) fetches one of the files published for
this model; ``ds4 download OWNER/REPO [--include PATTERN]`` fetches the matching files of any
repo (a split model's shards, say).

A plain HTTP download goes to ``NAME.<etag>.part`` beside the final file and is renamed when
complete, so an interrupted run (Ctrl-C, a dropped network) continues where it stopped the
next time, and no half-written file ever carries the final name. Files the Hub keeps in Xet
storage go through ``hf_hub_download``, which assembles them (from its chunk cache on a rerun)
before moving them into place.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

from dwarfstar.cli.common import DEFAULT_MODEL
from dwarfstar.cli.main import CommandError

REPO = "antirez/deepseek-v4-gguf"
FILES = {
    "q2-imatrix": "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2-imatrix.gguf",
    "q4-imatrix": (
        "DeepSeek-V4-Flash-Q4KExperts-F16HC-F16Compressor-F16Indexer-Q8Attn-Q8Shared-Q8Out-chat-v2-imatrix.gguf"
    ),
    "q2": "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2.gguf",
    "q4": "DeepSeek-V4-Flash-Q4KExperts-F16HC-F16Compressor-F16Indexer-Q8Attn-Q8Shared-Q8Out-chat-v2.gguf",
    "mtp": "DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32.gguf",
}
_SHARD = re.compile(r"-\d{5}-of-\d{5}(?=\.gguf$)")
SIZES = {"q2-imatrix": "81 GB", "q4-imatrix": "153 GB", "q2": "81 GB", "q4": "153 GB", "mtp": "3.5 GB"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    targets = "; ".join(f"{name}: {SIZES[name]}" for name in FILES)
    p = sub.add_parser(
        "download",
        help="download the published DeepSeek V4 Flash GGUF files (resumable)",
        description=(
            f"Download a GGUF from the Hugging Face repo {REPO} ({targets}). q2-imatrix suits "
            "96-128 GB of memory, q4-imatrix 256 GB and more; q2 and q4 are the older files, mtp "
            "the optional draft head. Or give any repo OWNER/NAME and --include patterns. An "
            "interrupted download resumes when run again. Honours HF_TOKEN and HF_ENDPOINT."
        ),
    )
    p.add_argument("target", metavar="TARGET", help=f"{', '.join(FILES)}, or a repo OWNER/NAME")
    p.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="with a repo: fetch the files whose path matches this glob (repeatable; default *.gguf)",
    )
    p.add_argument("--revision", default="main", help="with a repo: branch, tag or commit (default main)")
    p.add_argument(
        "--dir",
        type=Path,
        help="where to keep the files (default: $DS4_GGUF_DIR, or ./gguf)",
    )
    p.add_argument("--token", help="Hugging Face token (default: $HF_TOKEN or a saved `hf auth login`)")
    p.add_argument(
        "--no-link",
        action="store_true",
        help=f"do not point ./{DEFAULT_MODEL} at the downloaded model",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    directory = args.dir or Path(os.environ.get("DS4_GGUF_DIR") or "gguf")
    if "/" in args.target:
        return _run_repo(args, directory)
    if args.target not in FILES:
        raise CommandError(
            f"unknown target {args.target!r}: give one of {', '.join(FILES)}, or a repo OWNER/NAME"
        )
    if args.include:
        raise CommandError(f"--include goes with a repo OWNER/NAME, not with {args.target}")
    path = fetch(REPO, FILES[args.target], directory, token=args.token)
    print(f"{path}: {path.stat().st_size:,} bytes")
    if args.target != "mtp" and not args.no_link:
        _link(DEFAULT_MODEL, path)
    return 0


def _run_repo(args: argparse.Namespace, directory: Path) -> int:
    """Every file of the repo matching ``--include``; link the model when they make exactly one."""
    files = _matching_files(args.target, args.revision, args.include or ["*.gguf"], args.token)
    missing = sum(size - _present(directory / name, size) for name, size in files)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"cannot create {directory}: {err.strerror or err}") from None
    _check_free_space(directory, missing, f"{len(files)} file(s) of {args.target}")
    paths = [fetch(args.target, name, directory, args.token, args.revision) for name, _ in files]
    for path in paths:
        print(f"{path}: {path.stat().st_size:,} bytes")
    models = [path for path in paths if path.suffix == ".gguf"]
    stems = {_SHARD.sub("", path.name) for path in models}
    if args.no_link or not models:
        return 0
    if len(stems) == 1:  # one file, or the shards of one split model (opened from its first)
        _link(DEFAULT_MODEL, min(models))
    else:
        print(f"{len(models)} models downloaded: open one with -m FILE", file=sys.stderr)
    return 0


def _matching_files(
    repo: str, revision: str, patterns: list[str], token: str | None
) -> list[tuple[str, int]]:
    """(path, size) of each file of ``repo`` whose path matches one of ``patterns``."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        entries = HfApi(token=token).list_repo_tree(repo, revision=revision, recursive=True)
        files = [(e.path, e.size) for e in entries if getattr(e, "size", None) is not None]
    except GatedRepoError:
        raise CommandError(f"{repo} is gated: accept its terms on the Hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise CommandError(f"no repository {repo} at {constants.ENDPOINT} (or it needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CommandError(f"{repo} has no revision {revision!r}") from None
    except (httpx2.HTTPError, OSError) as err:
        raise CommandError(f"cannot reach {constants.ENDPOINT} for {repo}: {_reason(err)}") from None
    chosen = [(path, size) for path, size in files if any(fnmatch.fnmatchcase(path, p) for p in patterns)]
    if not chosen:
        names = ", ".join(path for path, _ in files[:8]) + (", ..." if len(files) > 8 else "")
        raise CommandError(
            f"no file of {repo} matches {' or '.join(patterns)} (it has: {names or 'nothing'})"
        )
    return chosen


def _present(path: Path, size: int) -> int:
    """Bytes of ``path`` already here: all of a complete file, else those of its partial download."""
    if path.is_file() and path.stat().st_size == size:
        return size
    partials = list(path.parent.glob(f"{glob.escape(path.name)}.*.part")) if path.parent.is_dir() else []
    return min(size, max((p.stat().st_size for p in partials), default=0))


def fetch(
    repo: str, filename: str, directory: Path, token: str | None = None, revision: str = "main"
) -> Path:
    """Download ``filename`` of ``repo`` to ``directory/filename`` unless it is already there whole."""
    import httpx2
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    source = f"{repo}/{filename}"
    url = hf_hub_url(repo, filename, revision=revision)
    try:
        meta = get_hf_file_metadata(url, token=token)
    except GatedRepoError:
        raise CommandError(f"{repo} is gated: accept its terms on the Hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise CommandError(f"no repository {repo} at {constants.ENDPOINT} (or it needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CommandError(f"{repo} has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise CommandError(f"{repo} has no file {filename} (revision {revision})") from None
    except (httpx2.HTTPError, OSError) as err:
        raise CommandError(f"cannot reach {constants.ENDPOINT} for {source}: {_reason(err)}") from None

    final = directory / filename
    if meta.size is not None and final.is_file() and final.stat().st_size == meta.size:
        print(f"{final} is already complete", file=sys.stderr)
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"cannot create {final.parent}: {err.strerror or err}") from None

    # The etag names the partial file, so bytes of another revision are never resumed into it.
    partial = final.with_name(f"{final.name}.{re.sub(r'[^0-9A-Za-z]', '', meta.etag or 'x')[:16]}.part")
    for stale in final.parent.glob(f"{glob.escape(final.name)}.*.part"):
        if stale != partial:
            stale.unlink()
    have = partial.stat().st_size if partial.exists() else 0
    if meta.size is not None and have > meta.size:
        partial.unlink()
        have = 0
    if meta.size is not None:
        _check_free_space(final.parent, meta.size - have, filename)

    try:
        if meta.xet_file_data is not None:
            return Path(
                hf_hub_download(repo, filename, revision=meta.commit_hash, local_dir=directory, token=token)
            )
        if have:
            print(f"resuming {filename} at {have:,} of {meta.size or 0:,} bytes", file=sys.stderr)
        # The token goes to the Hub only, never to the CDN a file is redirected to.
        hub_token = token if _same_origin(url, meta.location) else False
        _fetch_http(meta.location, partial, meta.size, hub_token, final.name)
    except KeyboardInterrupt:
        _report_partial(partial, meta.size)
        raise
    except (httpx2.HTTPError, OSError, ValueError) as err:
        _report_partial(partial, meta.size)
        raise CommandError(f"downloading {source} failed: {_reason(err)}") from None
    partial.replace(final)
    return final


def _fetch_http(url: str, partial: Path, size: int | None, token: str | bool | None, name: str) -> None:
    """Append the missing bytes to ``partial`` (a Range request when some are there already)."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    with partial.open("ab") as out:
        http_get(
            url,
            out,
            resume_size=out.tell(),
            headers=build_hf_headers(token=token),
            expected_size=size,
            displayed_filename=name,
        )
    if size is not None and partial.stat().st_size != size:
        raise OSError(f"got {partial.stat().st_size:,} bytes of {size:,}")


def _same_origin(a: str, b: str) -> bool:
    return urlsplit(a)[:2] == urlsplit(b)[:2]


def _check_free_space(directory: Path, needed: int, filename: str) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise CommandError(
            f"{filename} needs {_gb(needed)} more, and {directory} has {_gb(free)} free; "
            "free some space or choose another --dir"
        )


def _report_partial(partial: Path, size: int | None) -> None:
    if partial.exists() and partial.stat().st_size:
        kept = f"{partial.stat().st_size:,}" + (f" of {size:,}" if size else "")
        print(f"kept {kept} bytes in {partial}: run the same command again to resume", file=sys.stderr)


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` (replacing an older link, never a real file)."""
    if link.exists() and not link.is_symlink():
        print(f"{link} is a file, not a link: left as it is (use -m {target})", file=sys.stderr)
        return
    staged = link.with_name(link.name + ".new")
    staged.unlink(missing_ok=True)
    staged.symlink_to(target if target.is_absolute() else os.path.relpath(target, link.parent))
    staged.replace(link)
    print(f"{link} -> {target}")


def _reason(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
