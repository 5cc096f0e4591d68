"""`dsca-store convert --out s3://...`: a convert into object storage through a local staging store.

Object stores have no folders to rename, no flock and no partial writes, so the local writer
(:mod:`dsca.store.write`) runs unchanged on a staging copy and :class:`RemotePublisher` keeps
the remote store in step with it, in an order that keeps convert's guarantee (a reader never
sees a slide as complete before all its bytes are there):

1. :meth:`~RemotePublisher.mirror`: the remote store's metadata documents (root, ``slides/``,
   each slide's group and its arrays' zarr.json; no chunk bytes) are copied into the staging
   store, so that skip / reconvert / relabel / shard checks read exactly what the remote holds.
2. :meth:`~RemotePublisher.publish_metadata`, before any slide is touched: the root document
   as the run has it (without consolidated metadata: readers then list slides one by one, so a
   slide being replaced is not listed from a stale summary; a shard's root with the
   ``sharded_convert`` marker), then ``slides/zarr.json``, then the group documents that the
   run changed (new patient ids).
3. :meth:`~RemotePublisher.publish_slide`, for each slide converted into the staging store:
   the remote slide's group zarr.json is deleted first (a replaced slide stops counting as
   complete), then its stale objects, then the new chunk objects and array documents are
   uploaded, and the group zarr.json (``"complete": true``) goes last. A failure on the way
   leaves a slide without a group document: not complete, redone by the next run.
4. :meth:`~RemotePublisher.finish`: the root zarr.json with the consolidated metadata, last of
   all (or, for a new store left without any complete slide, its root documents removed).

Shards of a sharded convert each mirror, then upload the same root document (identical bytes
from shards of the same settings; a shard whose root another shard's settings overwrote stops:
:meth:`~RemotePublisher.check_shard_marker`) and their own slides; ``dsca-store finalize URL`` mirrors the
remote slide documents, consolidates them and uploads the root. There is no lock on object
storage: one convert (or the shards of one) at a time per store is the user's to ensure.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from dsca.store._layout import ARRAYS, SHARDED, SLIDES, slide_folder, slide_id_problem
from dsca.store.errors import ConvertError
from dsca.store.remote import RemoteLocation

__all__ = ["RemotePublisher"]

log = logging.getLogger(__name__)


class RemotePublisher:
    """The staging store of one convert (or finalize) into `remote`, and its uploads.

    Args:
        staging: a local folder to stage in (a fresh temp folder is made inside it and removed
            by :meth:`close`); None: the system's temp folder. It holds the slides being
            uploaded (one slide's chunk files at a time, per process) and every slide's metadata.
    """

    def __init__(self, remote: RemoteLocation, staging: str | Path | None = None) -> None:
        self.remote = remote
        if staging is not None:
            Path(staging).mkdir(parents=True, exist_ok=True)
        try:
            self.folder = Path(tempfile.mkdtemp(prefix="dsca-store-staging-", dir=staging))
        except OSError as exc:
            raise ConvertError(f"cannot create a staging folder in {staging or tempfile.gettempdir()} "
                               f"({exc.strerror or exc})") from None
        self.store = self.folder / "store.zarr"
        # key -> bytes of every metadata document as the remote store holds it
        self._remote_docs: dict[str, bytes] = {}
        self.existed = False

    def _fail(self, what: str, exc: BaseException) -> ConvertError:
        return ConvertError(f"{self.remote.url}: {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")

    def message(self, text: str) -> str:
        """`text` (an error of the local writer) naming the remote store, not the staging copy."""
        return text.replace(str(self.store), self.remote.url)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- 1. mirror --------------------------------------------------------------------------
    def mirror(self) -> bool:
        """Copy the remote store's metadata documents into the staging store; whether it exists.

        ConvertError when the URL cannot be reached, or holds objects but no zarr store.
        """
        remote = self.remote
        try:
            root = remote.read("zarr.json")
            if root is None:
                # objects under slides/ alone: what a failed first run left (uploads without
                # their group document); anything else is not ours
                others = set(remote.children("")) - {SLIDES}
                if others == {"zarr.json"}:
                    # another shard created the store between the read and the listing
                    root = remote.read("zarr.json")
                elif others:
                    raise ConvertError(f"{remote.url} exists and is not a zarr store; refusing to write into it")
                if root is None:
                    return False
            docs = {"zarr.json": root}
            slides_doc = remote.read(f"{SLIDES}/zarr.json")
            if slides_doc is not None:
                docs[f"{SLIDES}/zarr.json"] = slides_doc
            groups = remote.slide_documents()
            docs.update({f"{SLIDES}/{sid}/zarr.json": body for sid, body in groups.items() if body is not None})
            arrays = remote.read_many(f"{SLIDES}/{sid}/{name}/zarr.json" for sid, body in groups.items()
                                      if body is not None for name in ARRAYS)
            docs.update({key: body for key, body in arrays.items() if body is not None})
        except ConvertError:
            raise
        except Exception as exc:  # noqa: BLE001 - no bucket, no credentials, no server: many types
            raise self._fail("cannot read the store", exc) from None
        try:
            for key, body in docs.items():
                path = self.store / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(body)
        except OSError as exc:  # a full or read-only staging disk
            raise ConvertError(f"{self.remote.url}: cannot stage its metadata in {self.folder} "
                               f"({exc.strerror or exc})") from None
        self._remote_docs = dict(docs)
        self.existed = True
        log.info("%s: mirrored %d metadata documents (%d slides) into %s", remote.url, len(docs), len(groups),
                 self.store)
        return True

    # --- 2. metadata before any slide -------------------------------------------------------
    def _changed(self, key: str) -> bytes | None:
        """The staging store's document `key` if the remote does not hold these bytes yet."""
        path = self.store / key
        if not path.is_file():
            return None
        body = path.read_bytes()
        return None if self._remote_docs.get(key) == body else body

    def _upload_doc(self, key: str, body: bytes) -> None:
        self.remote.write(key, body)
        self._remote_docs[key] = body

    def publish_metadata(self) -> None:
        """Root, ``slides/`` and changed slide groups, as the run has them before converting."""
        try:
            for key in ("zarr.json", f"{SLIDES}/zarr.json"):
                body = self._changed(key)
                if body is not None:
                    self._upload_doc(key, body)
            for key in sorted(k for k in self._remote_docs if k.count("/") == 2 and k.endswith("/zarr.json")):
                body = self._changed(key)
                if body is not None:  # e.g. a patient id from this run's labels
                    self._upload_doc(key, body)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("cannot write the store's metadata", exc) from None

    def check_shard_marker(self) -> None:
        """For a shard: ConvertError unless the remote root still carries this shard's marker.

        Object storage has no exclusive create, so shards that start together and find no
        store each upload a root; with the same settings the bytes are identical, with other
        settings (another N, dtype, codec, extractor) the last upload wins, and the shards
        it overwrote stop here (checked after the root is uploaded and again at the end).
        """
        try:
            remote = json.loads(self.remote.read("zarr.json") or b"null")
            mine = json.loads((self.store / "zarr.json").read_bytes())
        except Exception as exc:  # noqa: BLE001
            raise self._fail("cannot read the store's root back", exc) from None
        theirs = remote.get("attributes", {}).get(SHARDED) if isinstance(remote, dict) else None
        wanted = mine.get("attributes", {}).get(SHARDED)
        if theirs != wanted:
            raise ConvertError(f"{self.remote.url}: another convert rewrote the store's root with other settings "
                               f"({theirs!r}, this shard: {wanted!r}); run every shard with the same options")

    # --- 3. one slide -----------------------------------------------------------------------
    def publish_slide(self, slide_id: str) -> None:
        """Upload a slide the staging store holds complete; the remote copy counts as complete
        only once everything else of it is there. Raises ConvertError (the slide is then
        neither complete remotely nor in the staging store)."""
        folder = slide_folder(self.store, slide_id)
        prefix = f"{SLIDES}/{slide_id}"
        group_key = f"{prefix}/zarr.json"
        try:
            group_doc = (folder / "zarr.json").read_bytes()
            files = {f"{prefix}/{p.relative_to(folder).as_posix()}": p for p in sorted(folder.rglob("*"))
                     if p.is_file() and p != folder / "zarr.json"}
            old = set(self.remote.keys_under(prefix))
            if group_key in old:  # first: a replaced slide stops counting as complete
                self.remote.delete([group_key])
                self._remote_docs.pop(group_key, None)
            self.remote.delete(sorted(old - set(files) - {group_key}))
            self.remote.put(files)
            self._upload_doc(group_key, group_doc)  # last: now it is complete
        except Exception as exc:  # noqa: BLE001 - object stores raise many types
            # the staging store must say what the remote holds: this slide, not complete
            shutil.rmtree(folder, ignore_errors=True)
            raise self._fail(f"slide {slide_id}: upload failed; it is not complete in the store", exc) from None
        for name in ARRAYS:  # uploaded: only the metadata stays staged (for the consolidation)
            shutil.rmtree(folder / name / "c", ignore_errors=True)
        self._remote_docs.update({key: path.read_bytes() for key, path in files.items() if key.endswith("zarr.json")})

    # --- 4. the end -------------------------------------------------------------------------
    def finish(self, quiet: bool = False) -> None:
        """After the local finish: the root zarr.json (consolidated) last; for a store this run
        created and left without any complete slide, its root documents removed.
        `quiet`: failures are logged, not raised (another error is on its way)."""
        try:
            if not (self.store / "zarr.json").is_file():
                if not self.existed:  # the local finish removed the new, empty store
                    self.remote.delete([f"{SLIDES}/zarr.json", "zarr.json"])
                return
            body = self._changed(f"{SLIDES}/zarr.json")
            if body is not None:
                self._upload_doc(f"{SLIDES}/zarr.json", body)
            body = self._changed("zarr.json")
            if body is not None:
                self._upload_doc("zarr.json", body)
        except Exception as exc:  # noqa: BLE001
            error = self._fail("the converted slides are complete, but writing the store's summary metadata failed; "
                               "rerun to finish it", exc)
            if not quiet:
                raise error from None
            log.warning("%s", error)

    def match_remote(self) -> None:
        """Before the local finish consolidates the staging store: every slide there as the
        remote store holds it. A slide written into the staging store but not uploaded (a
        Ctrl-C or an error between the two) goes back to the remote's version (its mirrored
        documents) or goes, so that the summary uploaded last lists only what is there."""
        folder = self.store / SLIDES
        for child in sorted(folder.iterdir()) if folder.is_dir() else ():
            if slide_id_problem(child.name) is not None or not child.is_dir():
                continue
            key = f"{SLIDES}/{child.name}/zarr.json"
            doc = child / "zarr.json"
            if (doc.read_bytes() if doc.is_file() else None) == self._remote_docs.get(key):
                continue
            log.info("%s: slide %s was not uploaded; left out of the summary", self.remote.url, child.name)
            shutil.rmtree(child, ignore_errors=True)
            for mirrored, body in self._remote_docs.items():
                if mirrored.startswith(f"{SLIDES}/{child.name}/"):
                    path = self.store / mirrored
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(body)
