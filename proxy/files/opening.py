"""The configured file store: `outputs.store` names the kind."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.config import OutputsConfig
from proxy.files.base import FileStore
from proxy.files.folder import FolderStore
from proxy.files.s3 import S3Settings, S3Store


def data_dir() -> Path:
    """Where `outputs.store: dir` keeps files unless `outputs.dir` says: the XDG data folder."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "comfy-proxy"


def open_files(config: OutputsConfig) -> FileStore | None:
    """The store outputs are copied into; None for `backend` (files stay where ComfyUI wrote them)."""
    if config.store == "dir":
        return FolderStore(config.dir or data_dir())
    if config.store == "s3":
        s3 = config.s3
        return S3Store(S3Settings(bucket=s3.bucket or "", endpoint_url=s3.endpoint_url, region=s3.region,
                                  path_style=s3.path_style, access_key_id=s3.access_key_id,
                                  secret_access_key=s3.secret_access_key, create_bucket=s3.create_bucket,
                                  public_endpoint_url=s3.public_endpoint_url))
    return None


def key_prefix(config: OutputsConfig) -> str:
    """What every key of this deployment starts with (`outputs.s3.prefix`; a folder is its own prefix)."""
    return config.s3.prefix.strip("/") if config.store == "s3" else ""
