"""Where output files (and uploads) live once the proxy has them: a folder, or S3-compatible storage.

One small interface (`FileStore`), one module per kind: `folder` (a local or shared folder) and `s3`
(AWS S3, R2, MinIO, Ceph, GCS interoperability). The third kind of `outputs.store`, `backend`, has no
file store: files stay on the ComfyUI that wrote them. `open_files` builds the configured one.
"""

from proxy.files.base import FileStore, FileStoreUnavailable, StoredFile
from proxy.files.opening import open_files

__all__ = ["FileStore", "FileStoreUnavailable", "StoredFile", "open_files"]
